"""The CLI's pure pieces and the client's HTTP mapping, against httpx's own MockTransport.

The real server behind the CLI is exercised by the integration suite; here nothing starts a server.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from ember.cli import commands as cli
from ember.cli.common import size_text
from ember.cli.progress import DeployProgress
from ember.client import Client, _error_from
from ember.config import DeploySpec
from ember.errors import (
    DeadlineUnmeetable,
    EmberError,
    InvalidInput,
    ModelExists,
    ModelNotFound,
    Overloaded,
    Refused,
)
from ember.gateway.tensors import encode_infer_response, parse_infer_request
from ember.packaging import PACKAGE_MEDIA_TYPE, SPEC_HEADER

Handler = Callable[[httpx.Request], httpx.Response]
HEADER = "Inference-Header-Content-Length"

MODEL = {
    "name": "double",
    "version": 1,
    "tier": "hot",
    "instances": 1,
    "requests": 7,
    "succeeded": 7,
    "failed": 0,
    "queued": 0,
    "slo_ms": 50.0,
    "slo_attainment": None,
    "cold_starts": 1,
    "last_cold_start": {"tier": "cool", "seconds": 0.0123, "at": 1.0},
    "bytes": 2_500_000,
    "source": "/abs/double.py:Double",
    "created_at": 1.0,
}
DOUBLE_INPUTS = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]


def client_for(handler: Handler) -> Client:
    return Client("http://ember.test", transport=httpx.MockTransport(handler))


def ndjson(*events: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


# -- source paths ----------------------------------------------------------------------------------


def test_absolute_source_makes_a_relative_class_file_absolute(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "double.py").write_text("class Double: ...\n")
    assert cli.absolute_source("models/double.py:Double", tmp_path) == f"{tmp_path}/models/double.py:Double"


def test_absolute_source_makes_folders_and_artifacts_absolute(tmp_path: Path) -> None:
    (tmp_path / "minilm").mkdir()
    (tmp_path / "resnet.pt2").write_bytes(b"")
    (tmp_path / "net.pt").write_bytes(b"")
    assert cli.absolute_source("minilm", tmp_path) == str(tmp_path / "minilm")
    assert cli.absolute_source("./minilm/", tmp_path) == str(tmp_path / "minilm")
    assert cli.absolute_source("resnet.pt2", tmp_path) == str(tmp_path / "resnet.pt2")
    assert cli.absolute_source("net.pt", tmp_path) == str(tmp_path / "net.pt")


def test_absolute_source_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.py").write_text("")
    assert cli.absolute_source("~/m.py:M", Path("/")) == f"{tmp_path}/m.py:M"


@pytest.mark.parametrize(
    "source",
    ["ember.models.embedding:SentenceEmbedding", "missing.py:Model", "missing.pt2", "/abs/elsewhere.py:M"],
)
def test_absolute_source_leaves_modules_and_paths_it_cannot_see(tmp_path: Path, source: str) -> None:
    assert cli.absolute_source(source, tmp_path) == source


# -- --option --------------------------------------------------------------------------------------


def test_parse_options_reads_json_values() -> None:
    options = cli.parse_options(['revision="main"', "dim=384", "scale=0.5", "flags=[1, 2]", 'extra={"a": "b=c"}'])
    assert options == {"revision": "main", "dim": 384, "scale": 0.5, "flags": [1, 2], "extra": {"a": "b=c"}}
    assert cli.parse_options([]) == {}


@pytest.mark.parametrize(
    ("items", "hint"),
    [
        (["dim"], "KEY=JSON"),
        (["=3"], "KEY=JSON"),
        (["revision=main"], "not JSON"),
        (["dim="], "not JSON"),
        (["dim=1", "dim=2"], "twice"),
    ],
)
def test_parse_options_rejects_what_is_not_key_equals_json(items: list[str], hint: str) -> None:
    with pytest.raises(typer.BadParameter, match=hint):
        cli.parse_options(items)


# -- error mapping ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, InvalidInput),
        (413, InvalidInput),
        (404, ModelNotFound),
        (409, ModelExists),
        (429, DeadlineUnmeetable),
        (503, Overloaded),
        (500, EmberError),
        (502, EmberError),
    ],
)
def test_error_statuses_come_back_as_their_classes(status: int, kind: type[EmberError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": f"it went wrong ({status})"})

    with client_for(handler) as client, pytest.raises(kind) as caught:
        client.models()
    assert type(caught.value) is kind
    assert caught.value.message == f"it went wrong ({status})"
    assert str(caught.value) == f"it went wrong ({status})"


def test_model_not_found_keeps_the_servers_message() -> None:
    error = _error_from(404, "model 'x' is not deployed; `ember ls` lists the deployed models")
    assert isinstance(error, ModelNotFound)
    assert error.message == "model 'x' is not deployed; `ember ls` lists the deployed models"
    assert error.args == (error.message,)


def test_refusals_carry_retry_after() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": "the queue is full"}, headers={"Retry-After": "7"})

    with client_for(handler) as client, pytest.raises(Overloaded) as caught:
        client.model("double")
    assert caught.value.retry_after_s == 7.0
    deadline = _error_from(429, "too late", "not-a-number")
    assert isinstance(deadline, Refused)
    assert deadline.retry_after_s == 1.0


def test_an_error_body_that_is_not_json_still_says_something() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="Bad Gateway from the proxy")

    with client_for(handler) as client, pytest.raises(EmberError, match="Bad Gateway from the proxy"):
        client.status()


def test_requests_go_to_the_admin_routes() -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        if request.method == "DELETE":
            return httpx.Response(200, json={"removed": "double"})
        if request.url.path == "/admin/models":
            return httpx.Response(200, json=[MODEL])
        if request.url.path == "/admin/status":
            return httpx.Response(200, json={"ready": True})
        return httpx.Response(200, json=MODEL)

    with client_for(handler) as client:
        assert client.models() == [MODEL]
        assert client.model("double") == MODEL
        assert client.load("double") == MODEL
        assert client.unload("double") == MODEL
        client.remove("double")
        assert client.status() == {"ready": True}
    assert seen == [
        ("GET", "/admin/models"),
        ("GET", "/admin/models/double"),
        ("POST", "/admin/models/double/load"),
        ("POST", "/admin/models/double/unload"),
        ("DELETE", "/admin/models/double"),
        ("GET", "/admin/status"),
    ]


# -- deploy progress -------------------------------------------------------------------------------


def test_deploy_follows_the_progress_stream() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        body = ndjson(
            {"stage": "importing", "model": "double", "source": "/abs/double.py:Double"},
            {"stage": "stored", "model": "double", "bytes": 2_500_000},
            {"stage": "loading", "model": "double"},
            {"stage": "ready", "model": "double", "load_s": 0.0123},
            {"stage": "done", "model": MODEL},
        )
        return httpx.Response(200, content=body, headers={"Content-Type": "application/x-ndjson"})

    events: list[dict[str, Any]] = []
    with client_for(handler) as client:
        model = client.deploy("/abs/double.py:Double", on_progress=events.append, slo_ms=50, name=None, options={})
    assert model == MODEL
    assert [e["stage"] for e in events] == ["importing", "stored", "loading", "ready", "done"]
    (request,) = sent
    assert (request.method, request.url.path, request.url.params.get("load")) == ("POST", "/admin/models", None)
    assert json.loads(request.content) == {"source": "/abs/double.py:Double", "slo_ms": 50, "options": {}}


def test_deploy_without_load_says_so() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["load"] == "false"
        return httpx.Response(200, content=ndjson({"stage": "done", "model": MODEL}))

    with client_for(handler) as client:
        assert client.deploy("x.py:X", load=False) == MODEL


@pytest.mark.parametrize(
    ("status", "kind"), [(400, InvalidInput), (409, ModelExists), (503, Overloaded), (500, EmberError)]
)
def test_an_error_event_raises_its_class(status: int, kind: type[EmberError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = ndjson(
            {"stage": "importing", "model": "double", "source": "x.py:X"},
            {"stage": "error", "status": status, "error": "importing x.py:X failed: boom"},
        )
        return httpx.Response(200, content=body)

    events: list[dict[str, Any]] = []
    with client_for(handler) as client, pytest.raises(kind, match="boom") as caught:
        client.deploy("x.py:X", on_progress=events.append)
    assert type(caught.value) is kind
    assert [e["stage"] for e in events] == ["importing"]


def test_a_refused_deploy_body_raises_before_any_progress() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "invalid deployment: slo_ms: must be > 0"})

    with client_for(handler) as client, pytest.raises(InvalidInput, match="slo_ms"):
        client.deploy("x.py:X", slo_ms=-1)


def test_a_stream_that_stops_early_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=ndjson({"stage": "importing", "model": "x"}) + b"\n")

    with client_for(handler) as client, pytest.raises(EmberError, match="ended the deploy stream"):
        client.deploy("x.py:X")


def test_a_garbled_stream_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>proxy page</html>\n")

    with client_for(handler) as client, pytest.raises(EmberError, match="not JSON"):
        client.deploy("x.py:X")


def test_deploy_rejects_unknown_options_before_sending() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing should be sent")

    with client_for(handler) as client, pytest.raises(TypeError, match="slo"):
        client.deploy("x.py:X", slo=50)


# -- infer, embed, readiness -----------------------------------------------------------------------


def test_infer_sends_binary_tensors_and_the_timeout_in_microseconds() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        header_length = int(request.headers[HEADER])
        parsed = parse_infer_request(request.content, header_length)
        assert parsed.parameters == {"timeout": 250_000}
        assert parsed.binary_output
        outputs = {"y": parsed.inputs["x"] * 2, "label": np.array([b"big", b"small"], dtype=object)}
        body, length = encode_infer_response("double", "1", None, outputs, parsed)
        assert length is not None
        return httpx.Response(200, content=body, headers={HEADER: str(length)})

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with client_for(handler) as client:
        out = client.infer("double", {"x": x}, timeout_s=0.25)
    np.testing.assert_array_equal(out["y"], x * 2)
    assert out["y"].dtype == np.float32
    assert out["label"].tolist() == [b"big", b"small"]


def test_infer_errors_map_like_the_rest() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert "timeout" not in json.loads(request.content[: int(request.headers[HEADER])])
        return httpx.Response(429, json={"error": "cannot meet 5 ms"}, headers={"Retry-After": "2"})

    with client_for(handler) as client, pytest.raises(DeadlineUnmeetable) as caught:
        client.infer("double", {"x": np.zeros((1, 4), dtype=np.float32)})
    assert caught.value.retry_after_s == 2.0


def test_embed_asks_for_floats_and_orders_rows_by_index() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/embeddings"
        assert json.loads(request.content) == {"model": "minilm", "input": ["a", "b"], "encoding_format": "float"}
        data = [
            {"object": "embedding", "index": 1, "embedding": [0.0, 1.0]},
            {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]},
        ]
        return httpx.Response(200, json={"object": "list", "data": data, "model": "minilm"})

    with client_for(handler) as client:
        vectors = client.embed("minilm", ["a", "b"])
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, [[1.0, 0.0], [0.0, 1.0]])


def test_wait_ready_polls_until_ready() -> None:
    answers = iter([503, 503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v2/health/ready"
        return httpx.Response(next(answers), json={})

    with client_for(handler) as client:
        client.wait_ready(timeout_s=30, interval_s=0.001)


def test_wait_ready_gives_up_when_nobody_answers() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with client_for(handler) as client, pytest.raises(TimeoutError, match="ember serve"):
        client.wait_ready(timeout_s=0.0)


# -- invoke's inputs and outputs -------------------------------------------------------------------


def test_arrays_from_json_takes_the_models_datatypes() -> None:
    inputs = [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, 2]},
        {"name": "text", "datatype": "BYTES", "shape": [-1]},
        {"name": "mask", "datatype": "BOOL", "shape": [-1, 2]},
    ]
    arrays = cli.arrays_from_json(
        {"x": [[1, 2, 3, 4]], "ids": [[1, 2]], "text": ["héllo"], "mask": [[True, False]]}, inputs
    )
    assert arrays["x"].dtype == np.float32 and arrays["x"].shape == (1, 4)
    assert arrays["ids"].dtype == np.int64
    assert arrays["text"].dtype == object and arrays["text"].tolist() == ["héllo".encode()]
    assert arrays["mask"].dtype == np.bool_


def test_arrays_from_json_adds_a_missing_batch_axis() -> None:
    (array,) = cli.arrays_from_json({"x": [1, 2, 3, 4]}, DOUBLE_INPUTS).values()
    assert array.shape == (1, 4)


@pytest.mark.parametrize(
    ("data", "inputs", "hint"),
    [
        ([1, 2], DOUBLE_INPUTS, "JSON object"),
        ({"y": [[1, 2, 3, 4]]}, DOUBLE_INPUTS, "unknown y.*missing x.*x \\(FP32 \\[-1, 4\\]\\)"),
        ({"x": [["a", "b", "c", "d"]]}, DOUBLE_INPUTS, "FP32: give numbers"),
        ({"x": [[1.5]]}, [{"name": "x", "datatype": "INT8", "shape": [-1, 1]}], "INT8: give integers"),
        ({"x": [[300]]}, [{"name": "x", "datatype": "UINT8", "shape": [-1, 1]}], "within \\[0, 255\\]"),
        ({"x": [1]}, [{"name": "x", "datatype": "BYTES", "shape": [-1]}], "BYTES: give strings"),
    ],
)
def test_arrays_from_json_says_what_is_wrong(data: Any, inputs: list[dict[str, Any]], hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        cli.arrays_from_json(data, inputs)


def test_outputs_to_json_writes_nested_lists_and_text() -> None:
    outputs = {"y": np.array([[1.5, 2.0]], dtype=np.float32), "label": np.array([[b"a"], [b"\xff"]], dtype=object)}
    assert cli.outputs_to_json(outputs) == {"y": [[1.5, 2.0]], "label": [["a"], ["\ufffd"]]}


def test_curl_example_fits_the_model() -> None:
    embed = cli.curl_example("http://127.0.0.1:8000", "minilm", "embeddings", [])
    assert embed.startswith("curl -s http://127.0.0.1:8000/v1/embeddings ")
    assert '"model": "minilm"' in embed
    infer = cli.curl_example("http://127.0.0.1:8000", "double", None, DOUBLE_INPUTS)
    body = json.loads(infer.split(" -d ", 1)[1].strip("'"))
    assert "/v2/models/double/infer" in infer
    assert body == {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]}


# -- logs ------------------------------------------------------------------------------------------


def test_tail_lines_reads_the_end(tmp_path: Path) -> None:
    path = tmp_path / "worker-0.log"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert cli.tail_lines(path, 3) == ["line 997", "line 998", "line 999"]
    assert cli.tail_lines(path, 3, block_bytes=5) == ["line 997", "line 998", "line 999"]
    assert len(cli.tail_lines(path, 5000, block_bytes=7)) == 1000
    path.write_text("first\nno newline at the end")
    assert cli.tail_lines(path, 1, block_bytes=4) == ["no newline at the end"]
    path.write_text("")
    assert cli.tail_lines(path, 10) == []


# -- commands, with httpx's MockTransport behind the Client --------------------------------------


@pytest.fixture
def serve_with(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Handler], None]]:
    def install(handler: Handler) -> None:
        monkeypatch.setattr(cli, "Client", lambda url, **kw: Client(url, transport=httpx.MockTransport(handler), **kw))

    yield install


runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "deploy", "ls", "describe", "rm", "load", "unload", "status", "invoke", "logs"):
        assert command in result.output


def test_ls_shows_a_table_and_json(serve_with: Callable[[Handler], None]) -> None:
    serve_with(lambda request: httpx.Response(200, json=[MODEL]))
    table = runner.invoke(cli.app, ["ls"])
    assert table.exit_code == 0, table.output
    assert "double" in table.output and "cool 12 ms" in table.output and "2.5" in table.output
    as_json = runner.invoke(cli.app, ["ls", "--json"])
    assert json.loads(as_json.output) == [MODEL]


def test_models_table_marks_missing_attainment() -> None:
    out = io.StringIO()
    Console(file=out, width=200).print(cli.models_table([MODEL, {**MODEL, "name": "b", "slo_attainment": 0.987}]))
    text = out.getvalue()
    assert "\N{EN DASH}" in text and "98.7%" in text


def test_models_table_shows_a_generative_models_ttft_and_tpot_attainment_and_tokens_per_second() -> None:
    llm = {
        **MODEL,
        "name": "llm",
        "slo_attainment": 0.9,
        "generation": {"ttft_slo_ms": 800.0, "tpot_slo_ms": 60.0, "ttft_attainment": 0.95,
                       "tpot_attainment": 0.925, "tokens_per_s": 41.25},
    }  # fmt: skip
    out = io.StringIO()
    Console(file=out, width=250).print(cli.models_table([MODEL, llm]))
    header, one_shot, generative = out.getvalue().splitlines()[:3]
    assert "TTFT met" in header and "TPOT met" in header and "tok/s" in header
    assert "800/60" in generative and "95.0%" in generative and "92.5%" in generative and "41.2" in generative
    assert one_shot.count("\N{EN DASH}") >= 3  # the one-shot model has none of them
    only = io.StringIO()
    Console(file=only, width=250).print(cli.models_table([MODEL]))
    assert "TTFT" not in only.getvalue()


def uploaded(request: httpx.Request) -> dict[str, Any]:
    """The deployment of a packaged deploy (from its header), with the files the package held."""
    assert request.headers["content-type"] == PACKAGE_MEDIA_TYPE
    with tarfile.open(fileobj=io.BytesIO(request.read())) as tar:
        names = sorted(tar.getnames())
    spec: dict[str, Any] = json.loads(request.headers[SPEC_HEADER])
    return {**spec, "files": names}


def test_deploy_uploads_the_models_folder_and_prints_a_summary(
    serve_with: Callable[[Handler], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "double.py").write_text("")
    monkeypatch.chdir(tmp_path)
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(uploaded(request))
        return httpx.Response(
            200,
            content=ndjson(
                {"stage": "stored", "model": "double", "bytes": 2_500_000},
                {"stage": "ready", "model": "double", "load_s": 0.0123},
                {"stage": "done", "model": MODEL},
            ),
        )

    serve_with(handler)
    result = runner.invoke(
        cli.app, ["deploy", "double.py:Double", "--slo-ms", "50", "--option", "dim=4", "--kind", "class"]
    )
    assert result.exit_code == 0, result.output
    assert bodies == [
        {"source": "double.py:Double", "kind": "class", "slo_ms": 50.0, "options": {"dim": 4}, "files": ["double.py"]}
    ]
    assert "stored 2.5 MB" in result.output and "ready in 12 ms" in result.output
    assert "deployed double v1: hot, 2.5 MB, SLO 50 ms" in result.output


def test_deploy_sends_the_slo_policy_options(
    serve_with: Callable[[Handler], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "double.py").write_text("")
    monkeypatch.chdir(tmp_path)
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(uploaded(request))
        return httpx.Response(200, content=ndjson({"stage": "done", "model": MODEL}))

    serve_with(handler)
    args = ["deploy", "double.py:Double", "--on-unmeetable", "best-effort", "--no-warmup", "--max-instances", "2"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert bodies[0]["on_unmeetable"] == "best_effort"
    assert bodies[0]["warmup"] is False and bodies[0]["max_instances"] == 2
    DeploySpec.model_validate({k: v for k, v in bodies[0].items() if k != "files"})  # what the server accepts
    bad = runner.invoke(cli.app, ["deploy", "double.py:Double", "--on-unmeetable", "drop"])
    assert bad.exit_code != 0


def test_deploy_sends_the_generative_options(
    serve_with: Callable[[Handler], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "llm.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(uploaded(request))
        return httpx.Response(200, content=ndjson({"stage": "done", "model": MODEL}))

    serve_with(handler)
    args = ["deploy", "llm.gguf", "--ttft-slo-ms", "800", "--tpot-slo-ms", "60"]
    result = runner.invoke(cli.app, [*args, "--max-num-seqs", "8", "--max-model-len", "1024"])
    assert result.exit_code == 0, result.output
    sent = bodies[0]
    assert (sent["ttft_slo_ms"], sent["tpot_slo_ms"], sent["max_num_seqs"], sent["max_model_len"]) == (800, 60, 8, 1024)
    spec = DeploySpec.model_validate({k: v for k, v in sent.items() if k != "files"})  # what the server accepts
    assert spec.max_num_seqs == 8 and spec.max_model_len == 1024
    assert runner.invoke(cli.app, ["deploy", "llm.gguf", "--max-num-seqs", "0"]).exit_code != 0


def test_deploy_error_event_prints_one_red_line(serve_with: Callable[[Handler], None]) -> None:
    serve_with(
        lambda request: httpx.Response(
            200, content=ndjson({"stage": "error", "status": 409, "error": "model 'double' already exists"})
        )
    )
    result = runner.invoke(cli.app, ["deploy", "pkg.models:Double"])
    assert result.exit_code == 1
    assert "error: model 'double' already exists" in result.output
    assert "Traceback" not in result.output


def test_connection_refused_suggests_ember_serve(serve_with: Callable[[Handler], None]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    serve_with(handler)
    result = runner.invoke(cli.app, ["status"])
    assert result.exit_code == 1
    assert "error: cannot reach Ember" in result.output and "ember serve" in result.output


def test_status_says_why_a_node_takes_no_new_models(serve_with: Callable[[Handler], None]) -> None:
    reason = "its store at /srv/ember/nodes/ab12 cannot be written (No space left on device)"
    node = {"id": "ab12cd34ef56", "address": "10.0.0.7", "alive": True, "workers": ["ab12cd-w0"]}
    state = {
        "ready": True,
        "workers": {
            "backend": "ray",
            "nodes": [
                {**node, "store": {"models": {"warm": ["linear@1"], "cool": []}, "refusing": reason}},
                {**node, "id": "ff00ee11dd22", "store": {"models": {"warm": [], "cool": []}, "refusing": None}},
            ],
        },
    }
    serve_with(lambda request: httpx.Response(200, json=state))
    result = runner.invoke(cli.app, ["status"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("node ")]
    assert len(lines) == 2, result.output
    assert "warm: linear@1" in lines[0] and f"takes no new models: {reason}" in lines[0], lines[0]
    assert "takes no new models" not in lines[1], lines[1]


def test_unload_names_the_tier_to_demote_to(serve_with: Callable[[Handler], None]) -> None:
    seen: list[tuple[str, str, dict[str, str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen.append((request.method, request.url.path, params))
        return httpx.Response(200, json={**MODEL, "tier": params["tier"]})

    serve_with(handler)
    warm = runner.invoke(cli.app, ["unload", "double", "--to", "warm"])
    assert warm.exit_code == 0, warm.output
    assert "double is warm" in warm.output
    cool = runner.invoke(cli.app, ["unload", "double"])
    assert cool.exit_code == 0, cool.output
    assert "double is cool" in cool.output
    assert seen == [
        ("POST", "/admin/models/double/unload", {"tier": "warm"}),
        ("POST", "/admin/models/double/unload", {"tier": "cool"}),
    ]
    bad = runner.invoke(cli.app, ["unload", "double", "--to", "hot"])
    assert bad.exit_code == 2  # refused by the CLI's own parser: nothing sent
    assert "hot" in bad.output and len(seen) == 2


def test_client_unload_passes_the_tier_and_raises_the_servers_refusal() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        tier = request.url.params["tier"]
        if tier not in ("warm", "cool"):
            return httpx.Response(400, json={"error": f"cannot unload to tier '{tier}'; use 'warm' or 'cool'"})
        return httpx.Response(200, json={**MODEL, "tier": tier})

    with client_for(handler) as client:
        assert client.unload("double", tier="warm")["tier"] == "warm"
        assert client.unload("double")["tier"] == "cool"
        with pytest.raises(InvalidInput, match="cannot unload to tier 'hot'"):
            client.unload("double", tier="hot")


def test_invoke_with_data_prints_outputs_as_json(serve_with: Callable[[Handler], None]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"name": "double", "inputs": DOUBLE_INPUTS, "outputs": []})
        parsed = parse_infer_request(request.content, int(request.headers[HEADER]))
        body, length = encode_infer_response("double", "1", None, {"y": parsed.inputs["x"] * 2}, parsed)
        return httpx.Response(200, content=body, headers={HEADER: str(length)})

    serve_with(handler)
    result = runner.invoke(cli.app, ["invoke", "double", "--data", '{"x": [[1, 2, 3, 4]]}'])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"y": [[2.0, 4.0, 6.0, 8.0]]}


def test_invoke_needs_text_or_data() -> None:
    result = runner.invoke(cli.app, ["invoke", "double"])
    assert result.exit_code == 2


def test_logs_prints_the_tail_of_each_worker(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "worker-0.log").write_text("a\nb\nc\n")
    (tmp_path / "logs" / "worker-10.log").write_text("x\n")
    (tmp_path / "logs" / "worker-2.log").write_text("y\n")
    result = runner.invoke(cli.app, ["logs", "--home", str(tmp_path), "--lines", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if line.startswith("==>")] == [
        f"==> {tmp_path}/logs/worker-{n}.log <==" for n in (0, 2, 10)
    ]
    assert lines[1:3] == ["b", "c"]
    only = runner.invoke(cli.app, ["logs", "--home", str(tmp_path), "--worker", "2"])
    assert only.output == "y\n"
    missing = runner.invoke(cli.app, ["logs", "--home", str(tmp_path), "--worker", "5"])
    assert missing.exit_code == 1 and "error:" in missing.output


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [(0, "0 B"), (612, "612 B"), (4_200, "4.2 kB"), (999_000, "999.0 kB"), (2_500_000, "2.5 MB"), (3.2e9, "3.20 GB")],
)
def test_sizes_below_a_megabyte_are_not_zero(num_bytes: float, text: str) -> None:
    assert size_text(num_bytes) == text


def test_ls_to_a_pipe_keeps_every_column_whole(serve_with: Callable[[Handler], None]) -> None:
    long_name = "a-model-with-a-rather-long-name-for-a-narrow-terminal"
    small = {**MODEL, "name": long_name, "bytes": 612, "slo_attainment": 0.5}
    serve_with(lambda request: httpx.Response(200, json=[small]))
    result = runner.invoke(cli.app, ["ls"])  # CliRunner's output is not a terminal: a pipe
    assert result.exit_code == 0, result.output
    assert "\N{HORIZONTAL ELLIPSIS}" not in result.output
    assert long_name in result.output and "612 B" in result.output and "cool 12 ms" in result.output


def test_inputs_that_do_not_fit_the_model_are_an_error_sentence_and_exit_1(
    serve_with: Callable[[Handler], None],
) -> None:
    metadata = {"name": "double", "inputs": DOUBLE_INPUTS, "outputs": []}
    serve_with(lambda request: httpx.Response(200, json=metadata))
    wrong_name = runner.invoke(cli.app, ["invoke", "double", "--data", '{"y": [[1, 2, 3, 4]]}'])
    assert wrong_name.exit_code == 1
    assert wrong_name.output.startswith("error: --data for model 'double': unknown y, missing x")
    texts = runner.invoke(cli.app, ["invoke", "double", "--text", "hello"])
    assert texts.exit_code == 1
    assert texts.output.startswith("error: model 'double' takes x (FP32), not texts")
    for result in (wrong_name, texts):
        assert "Usage:" not in result.output and "Traceback" not in result.output


def test_a_server_error_is_one_sentence_and_exit_1(serve_with: Callable[[Handler], None]) -> None:
    serve_with(lambda request: httpx.Response(400, json={"error": "invalid deployment: slo_ms must be greater than 0"}))
    result = runner.invoke(cli.app, ["load", "double"])
    assert result.exit_code == 1
    assert result.output == "error: invalid deployment: slo_ms must be greater than 0\n"


def _progress(stage: str, done: int, total: int) -> dict[str, Any]:
    return {"stage": stage, "model": "double", "bytes": done, "total_bytes": total, "percent": 100 * done // total}


DEPLOY_EVENTS = [
    {"stage": "importing", "model": "double", "source": "pkg.models:Double"},
    *(_progress("importing", n * 25_000, 2_500_000) for n in range(0, 101)),  # every percent, as the server sends
    {"stage": "stored", "model": "double", "bytes": 2_500_000},
    {"stage": "loading", "model": "double"},
    _progress("loading", 1_250_000, 2_500_000),
    _progress("loading", 2_500_000, 2_500_000),
    {"stage": "ready", "model": "double", "load_s": 0.0123},
    {"stage": "done", "model": MODEL},
]


def test_deploy_piped_prints_progress_lines_in_bytes_and_percent(serve_with: Callable[[Handler], None]) -> None:
    serve_with(lambda request: httpx.Response(200, content=ndjson(*DEPLOY_EVENTS)))
    result = runner.invoke(cli.app, ["deploy", "pkg.models:Double"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    imported = [line for line in lines if line.startswith("importing double:")]
    assert imported[0] == "importing double: 0 B of 2.5 MB (0%)"
    assert imported[5] == "importing double: 1.2 MB of 2.5 MB (50%)"
    assert imported[-1] == "importing double: 2.5 MB of 2.5 MB (100%)" and len(imported) == 11  # one a tenth
    assert "loading double: 1.2 MB of 2.5 MB (50%)" in lines and "loading double: 2.5 MB of 2.5 MB (100%)" in lines
    order = [
        next(i for i, line in enumerate(lines) if line.startswith(p))
        for p in ("importing", "✓ stored", "loading", "✓ ready", "deployed")
    ]
    assert order == sorted(order)


def test_deploy_on_a_terminal_draws_bars_with_bytes_and_percent() -> None:
    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, width=120)
    with DeployProgress(terminal, "pkg.models:Double") as progress:
        for event in DEPLOY_EVENTS[:-1]:
            progress(event)
    drawn = out.getvalue()
    assert "importing pkg.models:Double" in drawn and "1.2/2.5 MB" in drawn and "50%" in drawn
    assert "loading double" in drawn and "2.5/2.5 MB" in drawn and "100%" in drawn
    assert "stored 2.5 MB" in drawn and "ready in 12 ms" in drawn


def test_update_sends_only_what_changes() -> None:
    seen: list[tuple[str, str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, json.loads(request.content)))
        return httpx.Response(200, json={**MODEL, "slo_ms": 250.0})

    with client_for(handler) as client:
        assert client.update("double", slo_ms=250, on_unmeetable="best_effort")["slo_ms"] == 250.0
    assert seen == [("PATCH", "/admin/models/double", {"slo_ms": 250, "on_unmeetable": "best_effort"})]


def test_the_update_command_needs_something_to_change() -> None:
    result = CliRunner().invoke(cli.app, ["update", "double"])
    assert result.exit_code == 2 and "--slo-ms" in result.output
