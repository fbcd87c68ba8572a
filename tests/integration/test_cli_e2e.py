"""The ``ember`` command line as a user runs it: a subprocess talking to the shared server."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.http as triton_http
from harness import MODELS, REPO, Server, child_env, embed_binary, free_port, linear_weights


def test_ls_shows_models_as_a_table_and_as_json(server: Server, minilm: str, linear: str) -> None:
    table = server.cli("ls")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "version", "tier"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    for name in (minilm, linear):
        model = server.model(name)
        assert rows[name][1:3] == [str(model["version"]), model["tier"]]

    listed = server.cli("ls", "--json")
    assert listed.returncode == 0, listed.stderr
    models = json.loads(listed.stdout)
    assert {m["name"] for m in models} == {m["name"] for m in server.get_json("/admin/models")}
    shown = next(m for m in models if m["name"] == minilm)
    assert shown["task"] == "embeddings"
    assert shown["slo_ms"] == 250.0


def test_status_shows_the_server_and_its_workers(server: Server) -> None:
    assert server.proc is not None
    done = server.cli("status")
    assert done.returncode == 0, done.stderr
    assert f"pid {server.proc.pid}" in done.stdout
    assert f"{server.workers}/{server.workers} ready" in done.stdout
    for pid in server.worker_pids():
        assert re.search(rf"\b{pid}\b", done.stdout), done.stdout

    as_json = server.cli("status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    state = json.loads(as_json.stdout)
    assert state["ready"] is True
    assert state["pid"] == server.proc.pid
    assert state["workers"]["size"] == server.workers


def test_invoke_text_prints_the_embedding(
    server: Server, minilm: str, triton: triton_http.InferenceServerClient
) -> None:
    done = server.cli("invoke", minilm, "--text", "hello")
    assert done.returncode == 0, done.stderr
    assert "1 vectors of dimension 384" in done.stdout
    row = re.search(r"^\[0\] (.*?) …$", done.stdout, re.MULTILINE)
    assert row is not None, done.stdout
    printed = np.array([float(v) for v in row.group(1).split()])
    expected = embed_binary(triton, minilm, ["hello"])[0][: len(printed)]
    assert len(printed) == 8
    np.testing.assert_allclose(printed, expected, atol=5.1e-5)  # printed with 4 decimals


def test_invoke_data_prints_json_outputs(server: Server, linear: str) -> None:
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    done = server.cli("invoke", linear, "--data", json.dumps({"x": [x.tolist()]}))
    assert done.returncode == 0, done.stderr
    y = np.array(json.loads(done.stdout)["y"], dtype=np.float32)
    weight, bias = linear_weights()
    np.testing.assert_allclose(y, (x @ weight.T + bias)[np.newaxis], rtol=1e-5, atol=1e-5)


def test_unload_and_load(server: Server, linear: str) -> None:
    unloaded = server.cli("unload", linear)
    assert unloaded.returncode == 0, unloaded.stderr
    assert f"{linear} is cool" in unloaded.stdout
    assert server.tier(linear) == "cool"
    loaded = server.cli("load", linear)
    assert loaded.returncode == 0, loaded.stderr
    assert f"{linear} is hot" in loaded.stdout
    assert server.tier(linear) == "hot"


def test_rm_then_invoke_fails(server: Server) -> None:
    server.deploy(f"{MODELS / 'echo.py'}:Echo", "--name", "doomed", "--option", 'datatype="INT32"')
    data = json.dumps({"x": [[1, -2, 3]]})
    served = server.cli("invoke", "doomed", "--data", data)
    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout) == {"y": [[1, -2, 3]]}

    removed = server.cli("rm", "doomed")
    assert removed.returncode == 0, removed.stderr
    assert "removed doomed" in removed.stdout

    after = server.cli("invoke", "doomed", "--data", data)
    assert after.returncode == 1
    assert after.stderr.startswith("error:")
    assert "doomed" in after.stderr and "not deployed" in after.stderr
    assert "doomed" not in {m["name"] for m in server.get_json("/admin/models")}
    again = server.cli("rm", "doomed")
    assert again.returncode == 1
    assert "error:" in again.stderr


def test_deploy_piped_prints_import_and_load_progress_in_bytes_and_percent(server: Server) -> None:
    done = server.deploy(f"{MODELS / 'heavy.py'}:Sized", "--name", "progress-24mb", "--option", "mb=24")
    lines = done.stdout.splitlines()
    imported = [line for line in lines if line.startswith("importing progress-24mb: ")]
    loaded = [line for line in lines if line.startswith("loading progress-24mb: ")]
    total = "25.2 MB"  # 24 MiB
    assert len(imported) >= 3 and imported[-1] == f"importing progress-24mb: {total} of {total} (100%)", done.stdout
    assert loaded and loaded[-1].endswith(f"of {total} (100%)"), done.stdout
    assert all(re.fullmatch(r"\w+ progress-24mb: [\d.]+ [kMG]?B of 25\.2 MB \(\d+%\)", x) for x in imported + loaded)
    server.cli("rm", "progress-24mb")


def test_a_class_name_typo_is_not_found_with_the_closest_name(server: Server) -> None:
    done = server.cli("deploy", f"{REPO / 'examples' / 'linear.py'}:Linaer", "--name", "typo")
    assert done.returncode == 1
    assert "class 'Linaer' not found" in done.stderr and "did you mean 'Linear'?" in done.stderr, done.stderr
    assert "subclass" not in done.stderr and "Traceback" not in done.stderr
    assert "typo" not in {m["name"] for m in server.get_json("/admin/models")}


def test_a_model_that_answers_one_row_for_many_fails_its_deploy(server: Server) -> None:
    done = server.cli("deploy", f"{MODELS / 'faulty.py'}:OneRow", "--name", "one-row")
    assert done.returncode == 1
    assert "does not match the declared outputs" in done.stderr and "output 'y'" in done.stderr, done.stderr
    assert "one-row" not in {m["name"] for m in server.get_json("/admin/models")}


def test_deploying_a_taken_name_fails(server: Server, linear: str) -> None:
    version = server.model(linear)["version"]
    done = server.cli("deploy", f"{REPO / 'examples' / 'linear.py'}:Linear", "--name", linear)
    assert done.returncode == 1
    assert "error:" in done.stderr and "already deployed" in done.stderr
    assert server.model(linear)["version"] == version


@pytest.fixture(scope="module")
def poisoned(server: Server) -> str:
    """A Faulty model that has just failed on a request: what the CLI printed for it."""
    server.deploy(f"{MODELS / 'faulty.py'}:Faulty", "--name", "faulty-logs", "--option", "marker=4242")
    done = server.cli("invoke", "faulty-logs", "--data", json.dumps({"x": [[4242, 0, 0, 0]]}))
    assert done.returncode == 1
    return done.stderr


def test_model_error_reaches_the_cli(poisoned: str) -> None:
    assert poisoned.startswith("error:")
    assert "faulty-logs" in poisoned
    assert "ValueError: poisoned input: a row holds the marker 4242" in poisoned


def test_logs_print_every_worker_log(server: Server) -> None:
    logs = server.cli("logs", "--home", str(server.home), with_url=False)
    assert logs.returncode == 0, logs.stderr
    sections = re.findall(r"^==> (.*) <==$", logs.stdout, re.MULTILINE)
    assert sections == [str(server.home / "logs" / f"worker-{n}.log") for n in range(len(sections))]
    assert len(sections) >= server.workers
    one = server.cli("logs", "--home", str(server.home), "--worker", "0", with_url=False)
    assert one.returncode == 0, one.stderr
    assert "==>" not in one.stdout
    missing = server.cli("logs", "--home", str(server.home), "--worker", "999", with_url=False)
    assert missing.returncode == 1
    assert "error:" in missing.stderr and "worker-999.log" in missing.stderr


def test_logs_show_the_model_traceback(server: Server, poisoned: str) -> None:
    logs = server.cli("logs", "--home", str(server.home), "--lines", "400", with_url=False)
    assert logs.returncode == 0, logs.stderr
    assert "ValueError: poisoned input: a row holds the marker 4242" in logs.stdout
    assert "Traceback" in logs.stdout


def test_cli_without_a_server_says_so() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "ls", "--url", url],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert f"cannot reach Ember at {url}" in done.stderr
