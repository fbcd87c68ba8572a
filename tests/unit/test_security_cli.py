"""The command line's side of security: --insecure stays on loopback, keys are found and sent."""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from ember import cli_keys
from ember.cli import app, curl_example, is_loopback
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
    monkeypatch.setattr(cli_keys, "Client", lambda url: Client(url, transport=httpx.MockTransport(handler)))


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
