"""Faulty: ``y = 2 * x`` (FP32, 4 columns), except that a row holding ``marker`` makes predict raise;
OneRow: always one row of ``y``, whatever the batch."""

import numpy as np

from ember.api import Batch, ModelAPI, TensorSpec


class Faulty(ModelAPI):
    inputs = (TensorSpec("x", "FP32", (-1, 4)),)
    outputs = (TensorSpec("y", "FP32", (-1, 4)),)

    def __init__(self, marker: float = -999.0) -> None:
        self.marker = marker

    def predict(self, batch: Batch) -> Batch:
        x = batch["x"]
        if bool(np.any(x == self.marker)):
            raise ValueError(f"poisoned input: a row holds the marker {self.marker:g}")
        return {"y": 2 * x}


class OneRow(ModelAPI):
    """Answers one row whatever the batch holds: right for one request of one row, wrong for any more."""

    inputs = (TensorSpec("x", "FP32", (-1, 4)),)
    outputs = (TensorSpec("y", "FP32", (-1, 4)),)

    def predict(self, batch: Batch) -> Batch:
        return {"y": 2 * batch["x"][:1]}
