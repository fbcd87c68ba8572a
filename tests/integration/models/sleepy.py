"""Sleepy: answers ``y = x`` (INT64, one column) after holding each batch, to build a backlog.

``seconds`` is simulated compute per batch. With ``gate_dir``, every row waits until the file
``gate_dir/<its value>`` exists: a test decides exactly when a batch may finish, so it can act
(fill the queue, kill the worker) while the batch is known to be in flight. A gate that never opens
fails the batch after ``gate_timeout_s``, so a broken test cannot wedge a worker for ever.
"""

import time
from pathlib import Path

from ember.api import Batch, ModelAPI, TensorSpec


class Sleepy(ModelAPI):
    inputs = (TensorSpec("x", "INT64", (-1, 1)),)
    outputs = (TensorSpec("y", "INT64", (-1, 1)),)

    def __init__(self, seconds: float = 0.0, gate_dir: str | None = None, gate_timeout_s: float = 60.0) -> None:
        self.seconds = seconds
        self.gate_dir = None if gate_dir is None else Path(gate_dir)
        self.gate_timeout_s = gate_timeout_s

    def predict(self, batch: Batch) -> Batch:
        x = batch["x"]
        if self.gate_dir is not None:
            for value in sorted({int(v) for v in x.ravel()}):
                self._wait_gate(self.gate_dir / str(value))
        if self.seconds:
            time.sleep(self.seconds)
        return {"y": x.copy()}

    def _wait_gate(self, gate: Path) -> None:
        give_up = time.monotonic() + self.gate_timeout_s
        while not gate.exists():
            if time.monotonic() > give_up:
                raise TimeoutError(f"gate {gate} stayed closed for {self.gate_timeout_s} s")
            time.sleep(0.01)
