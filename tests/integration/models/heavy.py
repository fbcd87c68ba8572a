"""Models whose import is the point: ``y = x`` (FP32, any width), with ``mb`` MiB of weights.

* :class:`Sized` has ``mb`` MiB of weights (zeros; their size is what matters).
* :class:`GatedImport` writes ``gate_dir/started`` when its import begins, then holds it until the
  file ``gate_dir/go`` exists: a test knows the import is under way and can act on the server.
"""

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from ember.api import Batch, ModelAPI, TensorSpec


class Sized(ModelAPI):
    inputs = (TensorSpec("x", "FP32", (-1, -1)),)
    outputs = (TensorSpec("y", "FP32", (-1, -1)),)

    def __init__(self, mb: int = 1) -> None:
        self.mb = mb

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        return {"w": torch.zeros(self.mb << 18, dtype=torch.float32)}

    def predict(self, batch: Batch) -> Batch:
        return {"y": batch["x"]}


class GatedImport(Sized):
    def __init__(self, gate_dir: str, mb: int = 1, gate_timeout_s: float = 120.0) -> None:
        super().__init__(mb)
        self.gate_dir = Path(gate_dir)
        self.gate_timeout_s = gate_timeout_s

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        (self.gate_dir / "started").touch()
        give_up = time.monotonic() + self.gate_timeout_s
        while not (self.gate_dir / "go").exists():
            if time.monotonic() > give_up:
                raise TimeoutError(f"gate {self.gate_dir / 'go'} stayed closed for {self.gate_timeout_s} s")
            time.sleep(0.01)
        return super().source_weights()
