"""Echo: returns its input unchanged, in the datatype it was deployed with.

ember deploy tests/integration/models/echo.py:Echo --name echo-int8 --option datatype='"INT8"'
"""

from ember.api import Batch, ModelAPI, TensorSpec


class Echo(ModelAPI):
    def __init__(self, datatype: str = "FP32") -> None:
        self.inputs = (TensorSpec("x", datatype, (-1, -1)),)
        self.outputs = (TensorSpec("y", datatype, (-1, -1)),)

    def predict(self, batch: Batch) -> Batch:
        return {"y": batch["x"]}
