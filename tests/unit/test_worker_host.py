"""The worker's host: a batch that fails is split, so one bad request fails alone."""

from __future__ import annotations

import numpy as np
import torch

from ember.api import Batch, ModelAPI, TensorSpec
from ember.worker.host import ModelHost


class Picky(ModelAPI):
    """``y = 2 * x``; raises for a whole batch holding a negative row, and counts its calls."""

    inputs = (TensorSpec("x", "FP32", (-1, 2)),)
    outputs = (TensorSpec("y", "FP32", (-1, 2)),)

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, batch: Batch) -> Batch:
        x = batch["x"]
        self.calls.append(len(x))
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return {"y": 2 * x}


def test_a_batch_broken_by_one_request_fails_only_that_request() -> None:
    host = ModelHost(torch.device("cpu"))
    model = Picky()
    host.models["picky@1"] = model
    rows = [np.array([[1.0, 2.0]], np.float32), np.array([[-1.0, 0.0]], np.float32), np.ones((2, 2), np.float32)]

    batch = host.infer("picky@1", [{"x": x} for x in rows])

    first, second, third = batch.outputs
    assert not isinstance(first, str) and not isinstance(third, str)
    np.testing.assert_array_equal(first["y"], 2 * rows[0])
    np.testing.assert_array_equal(third["y"], 2 * rows[2])
    assert second == "predict failed: ValueError: negative input"
    assert model.calls == [4, 1, 1, 2]  # the batch once, then each request alone


def test_a_batch_that_works_runs_once() -> None:
    host = ModelHost(torch.device("cpu"))
    model = Picky()
    host.models["picky@1"] = model
    batch = host.infer("picky@1", [{"x": np.ones((1, 2), np.float32)} for _ in range(3)])
    assert all(not isinstance(out, str) for out in batch.outputs)
    assert model.calls == [3]
