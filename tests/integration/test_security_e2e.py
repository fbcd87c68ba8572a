"""Keys and tenants against a real ``ember serve``, spoken by real clients: the CLI, tritonclient, openai.

A server of its own (2 workers: models of different tenants never share one, and the shared server's
workers hold the default tenant's models). A deployer of tenant ``acme`` deploys through the CLI with
its own key; the admin deploys MiniLM into the default tenant; keys of ``acme`` and ``globex`` call.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton_http
from harness import EXAMPLES, REPO, Server, child_env, error_of, free_port, served, wait_until
from tritonclient.utils import InferenceServerException

MODEL = "linear"
#: Its name outside acme's namespace (what lists show; acme's keys may use either).
FULL = "acme+linear"


def make_key(server: Server, role: str, tenant: str | None = None) -> tuple[str, str]:
    """(key, id) of a new key, made with ``ember keys create``."""
    args = ["keys", "create", "--role", role] + (["--tenant", tenant] if tenant else [])
    done = server.cli(*args)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    key_id = done.stderr.split()[2]
    assert key.startswith("ember_") and len(key_id) == 12, (done.stdout, done.stderr)
    return key, key_id


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Started as the quick start starts it: deploying a model (the default tenant's ``linear``)."""
    home = tmp_path_factory.mktemp("security") / "home"
    with served(Server(home, workers=2, args=("--deploy", f"{EXAMPLES / 'linear.py'}:Linear"))) as running:
        yield running


@pytest.fixture(scope="module")
def minilm(server: Server) -> str:
    server.deploy(f"{EXAMPLES / 'minilm.py'}:MiniLM")
    return "minilm"


@pytest.fixture(scope="module")
def keys(server: Server) -> dict[str, str]:
    made = {
        "deployer": make_key(server, "deployer", "acme")[0],
        "invoker": make_key(server, "invoker", "acme")[0],
        "other": make_key(server, "invoker", "globex")[0],
    }
    done = server.cli("deploy", f"{EXAMPLES / 'linear.py'}:Linear", "--name", MODEL, key=made["deployer"])
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert f"deployed {FULL} v1" in done.stdout
    return made


def triton_infer(server: Server, key: str | None, model: str = MODEL) -> np.ndarray:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=120.0)
    try:
        x = triton_http.InferInput("x", [1, 16], "FP32")
        x.set_data_from_numpy(np.ones((1, 16), np.float32))
        headers = None if key is None else {"Authorization": f"Bearer {key}"}
        out = client.infer(model, [x], headers=headers).as_numpy("y")
        assert isinstance(out, np.ndarray)
        return out
    finally:
        client.close()


def test_the_admin_key_file_is_private(server: Server) -> None:
    path = server.home / "admin.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == server.key


def test_a_scraper_reads_metrics_with_the_metrics_key_and_nothing_else(server: Server) -> None:
    path = server.home / "metrics.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    scraper = {"Authorization": f"Bearer {path.read_text().strip()}"}
    metrics = httpx.get(f"{server.url}/metrics", headers=scraper, timeout=30)
    assert metrics.status_code == 200 and "nv_inference_request_duration_us" in metrics.text
    for path_ in ("/admin/models", "/admin/keys", f"/v2/models/{MODEL}"):
        refused = httpx.get(f"{server.url}{path_}", headers=scraper, timeout=30)
        assert refused.status_code == 403 and "metrics key" in refused.json()["error"], path_


def test_the_printed_curl_sends_the_key_and_works(server: Server) -> None:
    def printed() -> str | None:
        lines = server.log_path.read_text().splitlines()
        return next((line.strip() for line in lines if line.strip().startswith("curl ")), None)

    curl = wait_until(printed, 180, "ember serve to print how to call the model")
    assert f'-H "Authorization: Bearer $(cat {server.home / "admin.key"})"' in curl
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"][0]["shape"] == [1, 16]
    keyless = subprocess.run(
        ["bash", "-c", curl.replace("Authorization", "X-Nothing")], capture_output=True, text=True, timeout=120
    )
    assert "API key" in json.loads(keyless.stdout)["error"]


def test_requests_without_a_valid_key_are_refused(server: Server, keys: dict[str, str]) -> None:
    for headers in ({}, {"Authorization": "Bearer ember_wrong"}):
        response = httpx.get(f"{server.url}/admin/models", headers=headers, timeout=30)
        assert response.status_code == 401 and "API key" in error_of(response)
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 200


def test_tritonclient_calls_with_its_tenants_key_only(server: Server, keys: dict[str, str]) -> None:
    assert triton_infer(server, keys["invoker"]).shape == (1, 16)
    assert triton_infer(server, keys["deployer"], FULL).shape == (1, 16)
    assert triton_infer(server, server.key, FULL).shape == (1, 16)  # the admin names it in full
    with pytest.raises(InferenceServerException, match="API key"):
        triton_infer(server, None)
    for name in (MODEL, FULL):  # globex's key names globex+linear, or globex+acme+linear: neither exists
        with pytest.raises(InferenceServerException, match="is not deployed"):
            triton_infer(server, keys["other"], name)


def test_openai_lists_and_calls_only_its_tenants_models(server: Server, keys: dict[str, str], minilm: str) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=keys["invoker"], max_retries=0, timeout=120) as acme:
        assert [m.id for m in acme.models.list()] == [FULL]
        with pytest.raises(openai.NotFoundError, match=f"model 'acme\\+{minilm}' is not deployed"):
            acme.embeddings.create(model=minilm, input=["hello"])  # names acme+minilm: the default's is out of reach
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120) as admin:
        assert {FULL, minilm} <= {m.id for m in admin.models.list()}
        assert len(admin.embeddings.create(model=minilm, input=["hello"]).data[0].embedding) == 384
    with (
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="ember_wrong", max_retries=0, timeout=120) as nobody,
        pytest.raises(openai.AuthenticationError),
    ):
        nobody.models.list()


def test_an_invoker_cannot_remove_and_another_tenant_cannot_see(server: Server, keys: dict[str, str]) -> None:
    refused = server.cli("rm", MODEL, key=keys["invoker"])
    assert refused.returncode == 1 and "deployer key" in refused.stderr
    hidden = server.cli("ls", "--json", key=keys["other"])
    assert hidden.returncode == 0 and hidden.stdout.strip() == "[]"
    assert server.cli("rm", MODEL, key=keys["other"]).returncode == 1
    assert triton_infer(server, keys["invoker"]).shape == (1, 16)  # still there


def test_a_revoked_key_stops_working_at_once(server: Server, keys: dict[str, str]) -> None:
    key, key_id = make_key(server, "invoker", "acme")
    assert triton_infer(server, key).shape == (1, 16)
    listed = server.cli("keys", "ls")
    assert listed.returncode == 0 and key_id in listed.stdout and key not in listed.stdout
    assert server.cli("keys", "revoke", key_id).returncode == 0
    with pytest.raises(InferenceServerException, match="not valid"):
        triton_infer(server, key)
    assert server.cli("keys", "ls", key=keys["invoker"]).returncode == 1  # not an admin


def test_a_deployer_cannot_deploy_what_is_on_the_server(server: Server, keys: dict[str, str]) -> None:
    """The deployer's CLI deploy uploaded its model (the fixture); naming a server path is refused alike
    for the default tenant's stored code, any file, and a path that does not exist."""
    stored = next((server.home / "code").glob("linear@*/linear.py"))
    headers = {"Authorization": f"Bearer {keys['deployer']}"}
    answers = set()
    for source in (f"{stored}:Linear", f"{EXAMPLES / 'linear.py'}:Linear", "/nowhere/x.py:X", "os:getcwd"):
        r = httpx.post(f"{server.url}/admin/models", json={"source": source, "name": "stolen"}, headers=headers)
        assert r.status_code == 403 and "admin key" in error_of(r), source
        answers.add(r.content)
    assert len(answers) == 1
    assert not (server.home / "uploads").exists() or not any((server.home / "uploads").iterdir())


def test_insecure_is_refused_off_loopback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "serve", "--insecure", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "loopback" in done.stderr
