"""A 16 -> 16 linear layer: the smallest model with weights, used by the benchmarks.

    ember deploy examples/linear.py:Linear

The weights are made at deploy time from a fixed seed; every start after that builds the layer on
the ``meta`` device and takes its tensors from Ember's store.
"""

from collections.abc import Mapping

import torch

from ember.api import Batch, ModelAPI, TensorSpec


class Linear(ModelAPI):
    inputs = (TensorSpec("x", "FP32", (-1, 16)),)
    outputs = (TensorSpec("y", "FP32", (-1, 16)),)
    max_batch_size = 64

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        with torch.random.fork_rng():  # seed without disturbing anyone else's random stream
            torch.manual_seed(0)
            return torch.nn.Linear(16, 16).state_dict()

    def setup(self, weights: Mapping[str, torch.Tensor], assets: Mapping[str, bytes], device: torch.device) -> None:
        with torch.device("meta"):
            layer = torch.nn.Linear(16, 16)
        layer.load_state_dict(weights, assign=True)
        self.layer = layer.eval()
        self.device = device

    def predict(self, batch: Batch) -> Batch:
        with torch.inference_mode():
            y = self.layer(torch.as_tensor(batch["x"], device=self.device))
        return {"y": y.cpu().numpy()}
