"""FirstSlow: answers ``y = x`` (INT64, one column); its first ``slow_calls`` predict calls in a process
sleep ``seconds`` (3x the default 100 ms SLO), as a first inference after a load often is; the rest
return at once."""

import time

from ember.api import Batch, ModelAPI, TensorSpec


class FirstSlow(ModelAPI):
    inputs = (TensorSpec("x", "INT64", (-1, 1)),)
    outputs = (TensorSpec("y", "INT64", (-1, 1)),)

    def __init__(self, seconds: float = 0.3, slow_calls: int = 3) -> None:
        self.seconds = seconds
        self.slow_left = slow_calls

    def predict(self, batch: Batch) -> Batch:
        if self.slow_left > 0:
            self.slow_left -= 1
            time.sleep(self.seconds)
        return {"y": batch["x"].copy()}
