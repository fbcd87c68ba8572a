"""examples/configured.py: models built from a config with seeded weights, as the GPU benchmarks deploy them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ember.worker.host import ModelHost, instantiate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def ref(cls: str) -> str:
    return f"{EXAMPLES / 'configured.py'}:{cls}"


@pytest.mark.parametrize("cls", ["ResNetTiny", "DecoderTiny"])
def test_weights_come_from_the_seed_alone(cls: str) -> None:
    first, second = instantiate(ref(cls), {}).source_weights(), instantiate(ref(cls), {}).source_weights()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert all(t.device.type == "cpu" for t in first.values())


def test_a_tied_head_is_stored_once_and_tied_again_at_setup() -> None:
    model = instantiate(ref("DecoderTiny"), {})
    weights = model.source_weights()
    assert "model.embed_tokens.weight" in weights and "lm_head.weight" not in weights
    model.setup(weights, {}, torch.device("cpu"))
    assert model.model.lm_head.weight is model.model.model.embed_tokens.weight


def test_the_decoder_answers_as_the_same_network_built_the_usual_way() -> None:
    from transformers import LlamaForCausalLM

    model = instantiate(ref("DecoderTiny"), {})
    weights = model.source_weights()
    model.setup(weights, {}, torch.device("cpu"))
    ids = np.arange(30, dtype=np.int64).reshape(3, 10) % 512
    usual = LlamaForCausalLM(model.config())
    usual.load_state_dict(weights, strict=False)
    usual.tie_weights()
    with torch.inference_mode():
        expected = usual(torch.from_numpy(ids)).logits[:, -1].argmax(-1).numpy()
    np.testing.assert_array_equal(model.predict({"input_ids": ids})["next_token"], expected)


@pytest.mark.parametrize(
    ("cls", "name", "batch"),
    [
        ("ResNetTiny", "image", np.ones((2, 3, 224, 224), np.float32)),
        ("DecoderTiny", "input_ids", np.arange(20, dtype=np.int64).reshape(2, 10)),
    ],
)
def test_a_host_imports_loads_and_runs_them(tmp_path: Path, cls: str, name: str, batch: np.ndarray) -> None:
    (tmp_path / "staging").mkdir()
    host = ModelHost(torch.device("cpu"))
    host.import_model(ref(cls), {}, tmp_path / "staging")
    host.load(f"{cls}@1", ref(cls), {}, tmp_path / "staging" / "weights.ember", {})
    (out,) = host.infer(f"{cls}@1", [{name: batch}]).outputs
    assert not isinstance(out, str), out
    (answer,) = out.values()
    assert answer.shape == (2,) and answer.dtype == np.int64
