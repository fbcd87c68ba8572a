"""GPU checks: run where CUDA is present (a lent GPU machine); skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ember.store import map_checkpoint, write_checkpoint
from ember.worker.host import ModelHost

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_checkpoint_maps_onto_the_device(tmp_path):
    tensors = {"a": torch.randn(64, 64, dtype=torch.float16), "b": torch.arange(10)}
    write_checkpoint(tmp_path / "w.ember", tensors)
    mapped = map_checkpoint(tmp_path / "w.ember", "cuda:0")
    for name, tensor in tensors.items():
        assert mapped[name].device.type == "cuda"
        assert torch.equal(mapped[name].cpu(), tensor)


def test_a_model_built_on_the_device_answers_like_on_the_cpu(tmp_path):
    ref = f"{EXAMPLES / 'linear.py'}:Linear"
    (tmp_path / "staging").mkdir()
    ModelHost(torch.device("cpu")).import_model(ref, {}, tmp_path / "staging")
    weights = tmp_path / "staging" / "weights.ember"
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    answers = []
    for device in ("cpu", "cuda:0"):
        host = ModelHost(torch.device(device))
        host.load("linear@1", ref, {}, weights, {})
        (out,) = host.infer("linear@1", [{"x": x}]).outputs
        assert not isinstance(out, str)
        answers.append(out["y"])
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-4, atol=1e-5)
