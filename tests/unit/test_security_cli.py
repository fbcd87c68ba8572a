"""The command line's side of security: --insecure stays on loopback, keys are found and sent."""

from __future__ import annotations

import inspect
import json

import httpx
import pytest
import typer
from typer.testing import CliRunner

from ember.cli import app, curl_example, is_loopback
from ember.cli import commands as cli
from ember.cli import keys as cli_keys
from ember.client import Client, find_api_key

runner = CliRunner()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "192.168.1.20", "example.invalid"])
def test_other_hosts_are_not_loopback(host):
    assert not is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1"])
def test_serve_refuses_insecure_off_loopback_before_starting_anything(tmp_path, host):
    result = runner.invoke(app, ["serve", "--insecure", "--host", host, "--port", "0", "--home", str(tmp_path)])
    assert result.exit_code == 1
    assert "--insecure" in result.output and "loopback" in result.output and host in result.output
    assert list(tmp_path.iterdir()) == []  # nothing was started, no home was made


def test_the_printed_curl_sends_the_key_file(tmp_path):
    key_file = tmp_path / "admin.key"
    line = curl_example("http://127.0.0.1:8000", "minilm", "embeddings", [], key_file)
    assert f'-H "Authorization: Bearer $(cat {key_file})"' in line
    assert "Authorization" not in curl_example("http://127.0.0.1:8000", "minilm", "embeddings", [])


def test_the_client_finds_its_key_in_the_environment_then_the_home(tmp_path, monkeypatch):
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    assert find_api_key() is None
    (tmp_path / "admin.key").write_text("ember_fromfile\n")
    assert find_api_key() == "ember_fromfile"
    assert find_api_key("http://[::1]:8000") == "ember_fromfile"
    assert find_api_key("http://localhost:8000") == "ember_fromfile"
    assert find_api_key("http://10.1.2.3:8000") is None  # the local admin key never leaves the machine
    assert find_api_key("https://ember.example.com") is None
    monkeypatch.setenv("EMBER_API_KEY", "ember_fromenv")
    assert find_api_key() == "ember_fromenv"


def _serve_with(monkeypatch, handler):
    monkeypatch.setenv("EMBER_API_KEY", "ember_admin")
    monkeypatch.setattr(cli_keys, "Client", lambda url, **kw: Client(url, transport=httpx.MockTransport(handler), **kw))


def test_keys_create_ls_revoke_speak_the_admin_api(monkeypatch):
    seen: list[tuple[str, str, bytes, str]] = []
    key = {"id": "abc123abc123", "role": "invoker", "tenant": "acme", "label": "ci", "created_at": 0.0}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.content, request.headers["authorization"]))
        if request.method == "POST":
            return httpx.Response(201, json={"key": "ember_secret", **key, "revoked_at": None})
        if request.method == "DELETE":
            return httpx.Response(200, json={"revoked": "abc123abc123"})
        return httpx.Response(200, json=[{**key, "revoked_at": None}])

    _serve_with(monkeypatch, handler)
    made = runner.invoke(app, ["keys", "create", "--role", "invoker", "--tenant", "acme", "--label", "ci"])
    assert made.exit_code == 0, made.output
    assert made.stdout.splitlines()[0] == "ember_secret"
    listed = runner.invoke(app, ["keys", "ls"])
    assert listed.exit_code == 0 and "abc123abc123" in listed.output and "ember_secret" not in listed.output
    assert runner.invoke(app, ["keys", "revoke", "abc123abc123"]).exit_code == 0
    assert [(m, p) for m, p, _, _ in seen] == [
        ("POST", "/admin/keys"),
        ("GET", "/admin/keys"),
        ("DELETE", "/admin/keys/abc123abc123"),
    ]
    assert json.loads(seen[0][2]) == {"role": "invoker", "tenant": "acme", "label": "ci"}
    assert {auth for _, _, _, auth in seen} == {"Bearer ember_admin"}


def test_keys_commands_print_the_servers_refusal(monkeypatch):
    _serve_with(monkeypatch, lambda request: httpx.Response(403, json={"error": "/admin/keys is for admin keys"}))
    result = runner.invoke(app, ["keys", "ls"])
    assert result.exit_code == 1 and "for admin keys" in result.output
    bad_role = runner.invoke(app, ["keys", "create", "--role", "root"])
    assert bad_role.exit_code == 2


def test_serve_refuses_an_admin_key_file_others_can_read(tmp_path):
    key_file = tmp_path / "admin.key"
    key_file.write_text("ember_" + "k" * 43 + "\n")
    key_file.chmod(0o644)
    result = runner.invoke(app, ["serve", "--host", "127.0.0.1", "--port", "0", "--home", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert f"chmod 600 {key_file}" in result.output


def _commands(group: typer.Typer, prefix: str = "") -> list[tuple[str, inspect.Signature]]:
    found = [
        (f"{prefix}{c.name or c.callback.__name__}", inspect.signature(c.callback)) for c in group.registered_commands
    ]
    for sub in group.registered_groups:
        found += _commands(sub.typer_instance, f"{prefix}{sub.name or sub.typer_instance.info.name} ")
    return found


def test_every_command_that_talks_to_the_server_takes_home():
    talking = [name for name, signature in _commands(app) if "url" in signature.parameters]
    assert len(talking) >= 12, talking
    assert [
        name
        for name, signature in _commands(app)
        if "url" in signature.parameters and "home" not in signature.parameters
    ] == []


def test_home_finds_the_admin_key_of_a_server_started_with_it(tmp_path, monkeypatch):
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    monkeypatch.delenv("EMBER_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # ~/.ember holds no key
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "admin.key").write_text("ember_srvkey\n")
    sent: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization"))
        return httpx.Response(200, json=[])

    monkeypatch.setattr(cli, "Client", lambda url, **kw: Client(url, transport=httpx.MockTransport(handler), **kw))
    _serve_with_keys(monkeypatch, handler)
    assert runner.invoke(app, ["ls", "--home", str(tmp_path / "srv")]).exit_code == 0
    assert runner.invoke(app, ["keys", "ls", "--home", str(tmp_path / "srv")]).exit_code == 0
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "srv"))
    assert runner.invoke(app, ["tenants", "ls"]).exit_code == 0
    assert sent == ["Bearer ember_srvkey"] * 3


def test_a_refused_key_names_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    refuse = lambda request: httpx.Response(401, json={"error": "this request needs an API key"})  # noqa: E731
    monkeypatch.setattr(cli, "Client", lambda url, **kw: Client(url, transport=httpx.MockTransport(refuse), **kw))
    missing = runner.invoke(app, ["ls"])
    assert missing.exit_code == 1
    assert "EMBER_HOME" in missing.output and "--home" in missing.output and "EMBER_API_KEY" in missing.output
    assert str(tmp_path / "admin.key") in missing.output
    (tmp_path / "admin.key").write_text("ember_stale\n")
    stale = runner.invoke(app, ["ls"])
    assert stale.exit_code == 1 and "was refused" in stale.output and "EMBER_HOME" in stale.output
    monkeypatch.setenv("EMBER_API_KEY", "ember_wrong")
    wrong = runner.invoke(app, ["ls"])
    assert wrong.exit_code == 1 and "EMBER_API_KEY was refused" in wrong.output


def _serve_with_keys(monkeypatch, handler):
    monkeypatch.setattr(cli_keys, "Client", lambda url, **kw: Client(url, transport=httpx.MockTransport(handler), **kw))
