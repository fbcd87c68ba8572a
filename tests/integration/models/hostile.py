"""Models that misbehave the ways issue 5 lists: ``y = x`` (INT64, one column), except that

* :class:`Hangs` never returns from ``predict`` when a row holds ``marker``;
* :class:`Leaks` keeps ``leak_mb`` MiB more of resident memory after every batch.
"""

import time

import numpy as np

from ember.api import Batch, ModelAPI, TensorSpec


class Hangs(ModelAPI):
    inputs = (TensorSpec("x", "INT64", (-1, 1)),)
    outputs = (TensorSpec("y", "INT64", (-1, 1)),)

    def __init__(self, marker: int = -1) -> None:
        self.marker = marker

    def predict(self, batch: Batch) -> Batch:
        x = batch["x"]
        if bool(np.any(x == self.marker)):
            while True:  # stuck for good, the way a deadlocked model is
                time.sleep(3600)
        return {"y": x.copy()}


class Leaks(ModelAPI):
    inputs = (TensorSpec("x", "INT64", (-1, 1)),)
    outputs = (TensorSpec("y", "INT64", (-1, 1)),)

    def __init__(self, leak_mb: int = 64) -> None:
        self.leak_mb = leak_mb
        self.kept: list[np.ndarray] = []

    def predict(self, batch: Batch) -> Batch:
        self.kept.append(np.ones(self.leak_mb << 20, dtype=np.uint8))  # written, so resident
        return {"y": batch["x"].copy()}
