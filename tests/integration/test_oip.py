"""Open Inference Protocol v2 against a real server, spoken by ``tritonclient.http`` (and httpx for raw JSON).

The tests that take ``backend`` run twice: on the shared server (worker processes of this machine)
and on a server whose workers are Ray actors (``--cluster``) on Ray's test cluster, one for the
module (marked ``ray``; skipped without Ray).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as triton_http
from harness import (
    EXAMPLES,
    MODELS,
    BearerAuth,
    Server,
    cosine,
    embed_binary,
    json_output,
    linear_weights,
    ray_cluster,
    served,
)

import ember

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an acoustic guitar.",
    "The central bank raised interest rates again.",
]

DATATYPES = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]
DATATYPES += ["FP16", "FP32", "FP64", "BYTES"]


# -- the backends -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """A server, a tritonclient for it, and the names MiniLM (SLO 250 ms) and Linear are deployed as."""

    server: Server
    triton: triton_http.InferenceServerClient
    minilm: str
    linear: str


@pytest.fixture(scope="module")
def ray_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """``ember serve --cluster`` on a head and two nodes of one CPU, MiniLM and Linear deployed as the
    shared server's fixtures deploy them."""
    home = tmp_path_factory.mktemp("oip-ray") / "home"
    with ray_cluster(nodes=2) as cluster, served(Server(home, args=("--cluster", cluster.address))) as server:
        server.deploy_many(
            {
                "minilm": (f"{EXAMPLES / 'minilm.py'}:MiniLM", "--slo-ms", "250"),
                "linear": (f"{EXAMPLES / 'linear.py'}:Linear", "--on-unmeetable", "best-effort"),
            }
        )
        triton = triton_http.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=120.0)
        triton.register_plugin(BearerAuth(server.key))
        try:
            yield Backend(server, triton, "minilm", "linear")
        finally:
            triton.close()


@pytest.fixture(scope="module", params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "ray":
        ray: Backend = request.getfixturevalue("ray_backend")
        return ray
    return Backend(*(request.getfixturevalue(name) for name in ("server", "triton", "minilm", "linear")))


# -- server -------------------------------------------------------------------------------------------


def test_server_is_live_and_ready_and_describes_itself(backend: Backend) -> None:
    triton = backend.triton
    assert triton.is_server_live()
    assert triton.is_server_ready()
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "ember"
    assert metadata["version"] == ember.__version__
    assert {"binary_tensor_data", "model_repository"} <= set(metadata["extensions"])


# -- MiniLM -------------------------------------------------------------------------------------------


def test_minilm_metadata_and_config(backend: Backend) -> None:
    triton, server, minilm = backend.triton, backend.server, backend.minilm
    assert triton.is_model_ready(minilm)
    metadata = triton.get_model_metadata(minilm)
    version = str(server.model(minilm)["version"])
    assert metadata["name"] == minilm
    assert metadata["versions"] == [version]
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]

    config = triton.get_model_config(minilm)
    assert config["name"] == minilm
    assert config["max_batch_size"] >= 1
    assert config["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": []}]
    assert config["output"] == [{"name": "embedding", "data_type": "TYPE_FP32", "dims": [384]}]
    # The fixture deployed it with --slo-ms 250: the deploy option reaches the served config.
    assert float(config["parameters"]["slo_ms"]["string_value"]) == 250.0


def test_minilm_embeddings_binary(backend: Backend) -> None:
    vectors = embed_binary(backend.triton, backend.minilm, SENTENCES)
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    guitar, guitar_too, bank = vectors
    # The two sentences about guitars are closer to each other than either is to the one about banks.
    assert cosine(guitar, guitar_too) > cosine(guitar, bank)
    assert cosine(guitar, guitar_too) > cosine(guitar_too, bank)


def test_minilm_json_matches_binary(backend: Backend) -> None:
    triton, server, minilm = backend.triton, backend.server, backend.minilm
    binary = embed_binary(triton, minilm, SENTENCES)

    text = triton_http.InferInput("text", [len(SENTENCES)], "BYTES")
    text.set_data_from_numpy(np.array(SENTENCES, dtype=object), binary_data=False)
    wanted = triton_http.InferRequestedOutput("embedding", binary_data=False)
    as_json = triton.infer(minilm, [text], outputs=[wanted]).as_numpy("embedding")
    assert as_json is not None
    np.testing.assert_allclose(as_json.astype(np.float32), binary, rtol=0, atol=1e-6)

    # The same request without tritonclient: a plain JSON body gets a plain JSON answer.
    response = server.infer_json(minilm, {"text": np.array(SENTENCES, dtype=object)})
    assert response.headers["content-type"].startswith("application/json")
    assert "inference-header-content-length" not in response.headers
    np.testing.assert_allclose(json_output(response, "embedding"), binary, rtol=0, atol=1e-6)


# -- every datatype -----------------------------------------------------------------------------------


def sample(datatype: str, binary: bool) -> np.ndarray:
    """A (2, 3) array with the datatype's edge values; BYTES sent as binary also carries non-UTF-8 bytes."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BYTES":
        items = ["hello", "", "ünïcødé ✓", "x" * 300, "tab\tand\nnewline", '{"json": "text"}']
        raw = [s.encode() for s in items]
        if binary:
            raw[1] = b"\x00\xff\xfe not utf-8"
        return np.array(raw, dtype=object).reshape(2, 3)
    dtype = np.dtype(datatype.lower().replace("fp", "float"))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values: list[Any] = [info.min, info.max, 0, 1, info.max - 1, info.min + 1 if dtype.kind == "i" else 7]
    else:
        finfo = np.finfo(dtype)
        values = [finfo.max, finfo.min, finfo.tiny, -0.0, 1 / 3, -2.5]
    return np.array(values, dtype=dtype).reshape(2, 3)


@pytest.fixture(scope="module")
def echoes(server: Server) -> dict[str, str]:
    """One Echo per datatype, all deployed at once through ``ember deploy ... --option datatype='"X"'``."""
    names = {datatype: f"echo-{datatype.lower()}" for datatype in DATATYPES}
    server.deploy_many(
        {
            name: (f"{MODELS / 'echo.py'}:Echo", "--name", name, "--option", f'datatype="{datatype}"')
            for datatype, name in names.items()
        }
    )
    return names


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips(
    triton: triton_http.InferenceServerClient, echoes: dict[str, str], datatype: str, binary: bool
) -> None:
    name = echoes[datatype]
    metadata = triton.get_model_metadata(name)
    assert metadata["inputs"] == [{"name": "x", "datatype": datatype, "shape": [-1, -1]}]

    sent = sample(datatype, binary)
    x = triton_http.InferInput("x", list(sent.shape), datatype)
    x.set_data_from_numpy(sent, binary_data=binary)
    result = triton.infer(name, [x], outputs=[triton_http.InferRequestedOutput("y", binary_data=binary)])
    output = next(o for o in result.get_response()["outputs"] if o["name"] == "y")
    assert output["datatype"] == datatype
    assert ("binary_data_size" in output.get("parameters", {})) == binary
    got = result.as_numpy("y")
    assert got is not None
    assert got.shape == sent.shape
    if datatype == "BYTES":
        # tritonclient hands JSON BYTES back as str; binary ones as bytes.
        expected = sent if binary else np.vectorize(bytes.decode, otypes=[object])(sent)
        assert got.tolist() == expected.tolist()
    else:
        assert got.dtype == sent.dtype
        np.testing.assert_array_equal(got, sent, strict=True)
        if sent.dtype.kind == "f":
            assert np.signbit(got).tolist() == np.signbit(sent).tolist()  # -0.0 stays negative


# -- Linear -------------------------------------------------------------------------------------------


def fp32(name: str, x: np.ndarray) -> triton_http.InferInput:
    tensor = triton_http.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def infer_linear(triton: triton_http.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    y = triton.infer(model, [fp32("x", x)]).as_numpy("y")
    assert y is not None
    return y


def test_linear_matches_local_computation(backend: Backend) -> None:
    weight, bias = linear_weights()
    x = np.random.default_rng(7).standard_normal((5, 16)).astype(np.float32)
    y = infer_linear(backend.triton, backend.linear, x)
    np.testing.assert_allclose(y, x @ weight.T + bias, rtol=1e-5, atol=1e-5)


def test_repository_index_load_and_unload(backend: Backend) -> None:
    triton, server, linear = backend.triton, backend.server, backend.linear
    index = triton.get_model_repository_index()
    deployed = server.get_json("/admin/models")
    assert sorted(m["name"] for m in index) == sorted(m["name"] for m in deployed)
    entry = next(m for m in index if m["name"] == linear)
    assert entry["state"] == "READY"
    assert entry["version"] == str(server.model(linear)["version"])

    x = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    by_version = triton.infer(linear, [fp32("x", x)], model_version=entry["version"]).as_numpy("y")
    np.testing.assert_array_equal(by_version, infer_linear(triton, linear, x))

    triton.unload_model(linear)
    assert server.tier(linear) == "cool"
    assert triton.is_model_ready(linear)  # still deployed and callable
    triton.load_model(linear)
    assert server.tier(linear) == "hot"

    triton.unload_model(linear)
    assert server.tier(linear) == "cool"
    cold_starts = server.model(linear)["cold_starts"]
    weight, bias = linear_weights()
    x = np.random.default_rng(8).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(infer_linear(triton, linear, x), x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    after = server.model(linear)
    assert after["tier"] == "hot"
    assert after["cold_starts"] == cold_starts + 1
    assert after["last_cold_start"]["tier"] == "cool"


def test_repository_calls_on_unknown_model_fail(triton: triton_http.InferenceServerClient) -> None:
    from tritonclient.utils import InferenceServerException

    for call in (triton.load_model, triton.unload_model, triton.get_model_metadata):
        with pytest.raises(InferenceServerException, match="not deployed"):
            call("no-such-model")


# -- artifacts: torch.export and TorchScript ----------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Any]]:
    """examples/make_artifacts.py's MLP as .pt2 and .pt, both deployed through ``ember deploy``."""
    spec = importlib.util.spec_from_file_location("make_artifacts", EXAMPLES / "make_artifacts.py")
    assert spec is not None and spec.loader is not None
    make_artifacts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_artifacts)
    folder: Path = tmp_path_factory.mktemp("artifacts")
    eager = make_artifacts.make_exported(folder / "mlp.pt2")
    make_artifacts.make_torchscript(folder / "mlp.pt")
    names = {"exported": "mlp-export", "torchscript": "mlp-script"}
    server.deploy_many(
        {
            names["exported"]: (str(folder / "mlp.pt2"), "--name", names["exported"]),
            names["torchscript"]: (str(folder / "mlp.pt"), "--name", names["torchscript"]),
        }
    )
    yield names, eager


@pytest.mark.parametrize("kind", ["exported", "torchscript"])
def test_artifact_answers_like_the_eager_module(
    triton: triton_http.InferenceServerClient, artifacts: tuple[dict[str, str], Any], kind: str
) -> None:
    names, eager = artifacts
    name = names[kind]
    metadata = triton.get_model_metadata(name)
    (spec_in,) = metadata["inputs"]
    (spec_out,) = metadata["outputs"]
    assert spec_in["datatype"] == spec_out["datatype"] == "FP32"

    x = np.random.default_rng(9).standard_normal((6, 8)).astype(np.float32)
    got = triton.infer(name, [fp32(spec_in["name"], x)]).as_numpy(spec_out["name"])
    with torch.inference_mode():
        expected = eager(torch.from_numpy(x)).numpy()
    assert got is not None and got.shape == (6, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
