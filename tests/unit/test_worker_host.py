"""The worker's host: a batch that fails is split, so one bad request fails alone."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.api import ANSWER_MISMATCH, Batch, ModelAPI, TensorSpec
from ember.cluster.channel import error_from as local_error_from
from ember.errors import InvalidInput
from ember.worker.host import ClassNotFound, ModelHost, resolve_class
from ember.worker.protocol import Reply


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


def _model_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"models_{abs(hash(text))}.py"
    path.write_text(text)
    return path


LINEAR = "from ember import ModelAPI\n\nclass Linear(ModelAPI):\n    pass\n\nclass Other(ModelAPI):\n    pass\n"


def test_a_class_name_typo_is_not_found_with_the_closest_model_class(tmp_path: Path) -> None:
    path = _model_file(tmp_path, LINEAR)
    with pytest.raises(ClassNotFound) as caught:
        resolve_class(f"{path}:Linaer")
    message = str(caught.value)
    assert "class 'Linaer' not found" in message and "did you mean 'Linear'?" in message
    assert "subclass" not in message
    with pytest.raises(ClassNotFound, match="its model classes are Linear, Other"):
        resolve_class(f"{path}:Zebra")
    assert resolve_class(f"{path}:Linear").__name__ == "Linear"


def test_a_name_that_is_not_a_model_class_says_so(tmp_path: Path) -> None:
    path = _model_file(tmp_path, "helper = 3\n")
    with pytest.raises(ValueError, match="helper is not a model class"):
        resolve_class(f"{path}:helper")
    with pytest.raises(ClassNotFound, match=r"defines no subclass of ember\.ModelAPI"):
        resolve_class(f"{path}:Model")


def test_the_worker_reply_for_a_typo_is_invalid_input_without_the_exception_name() -> None:
    reply = Reply(
        1,
        False,
        error="ember.worker.host.ClassNotFound: class 'Linaer' not found in m.py; did you mean 'Linear'?",
        error_kind="ClassNotFound",
    )
    error = local_error_from(reply)
    assert isinstance(error, InvalidInput)
    assert error.message == "class 'Linaer' not found in m.py; did you mean 'Linear'?"


class Declared(ModelAPI):
    """Declares ``y`` FP32 of 2 columns; answers whatever ``answer`` makes of the batch."""

    inputs = (TensorSpec("x", "FP32", (-1, 2)),)
    outputs = (TensorSpec("y", "FP32", (-1, 2)),)

    def __init__(self, answer: Callable[[np.ndarray], dict[str, np.ndarray]]) -> None:
        self.answer = answer

    def predict(self, batch: Batch) -> Batch:
        return self.answer(batch["x"])


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (lambda x: {"y": x.astype(np.float64)}, "output 'y' is float64 but declared FP32"),
        (lambda x: {"y": np.ones((len(x), 3), np.float32)}, "output 'y' has shape (1, 3) for 1 input rows"),
        (lambda x: {"y": x[:, 0]}, "output 'y' has shape (1,) for 1 input rows"),
        (lambda x: {"z": x}, "output 'y' is missing (predict returned z)"),
        (lambda x: {"y": x, "z": x}, "predict returned z, which the model does not declare (y)"),
        (lambda x: {"y": np.ones((1, 2), np.float32)}, "output 'y' has shape (1, 2) for a batch of 3 rows"),
    ],
)
def test_an_answer_that_breaks_the_declared_outputs_fails_naming_the_output(
    answer: Callable[[np.ndarray], dict[str, np.ndarray]], fragment: str
) -> None:
    host = ModelHost(torch.device("cpu"))
    host.models["m@1"] = Declared(answer)
    requests = [{"x": np.ones((1, 2), np.float32)}, {"x": np.ones((2, 2), np.float32)}]
    if "batch of 3" not in fragment:
        requests = requests[:1]
    batch = host.infer("m@1", requests)
    for result in batch.outputs:
        assert isinstance(result, str)
        assert result.startswith(ANSWER_MISMATCH) and fragment in result


def test_an_answer_as_declared_passes() -> None:
    host = ModelHost(torch.device("cpu"))
    host.models["m@1"] = Declared(lambda x: {"y": 2 * x})
    (result,) = host.infer("m@1", [{"x": np.ones((3, 2), np.float32)}]).outputs
    assert not isinstance(result, str)
    np.testing.assert_array_equal(result["y"], np.full((3, 2), 2, np.float32))


def test_an_import_tells_the_parent_its_progress_before_its_reply(tmp_path: Path) -> None:
    from ember.worker.main import handle
    from ember.worker.protocol import Import, Progress, recv_message

    path = _model_file(
        tmp_path,
        "import torch\nfrom ember import ModelAPI, TensorSpec\n\n"
        "class Big(ModelAPI):\n"
        "    inputs = (TensorSpec('x', 'FP32', (-1, 1)),)\n"
        "    outputs = (TensorSpec('x', 'FP32', (-1, 1)),)\n\n"
        "    def source_weights(self):\n"
        "        return {'w': torch.zeros(5 << 20)}  # 20 MiB: several 8 MiB chunks\n",
    )
    (tmp_path / "staging").mkdir()
    parent, child = socket.socketpair()
    with parent, child:
        reply = handle(ModelHost(torch.device("cpu")), Import(7, f"{path}:Big", {}, str(tmp_path / "staging")), child)
        child.shutdown(socket.SHUT_WR)
        heard = []
        while (message := recv_message(parent)) is not None:
            heard.append(message)
    assert reply.ok, reply.error
    assert all(isinstance(m, Progress) and m.id == 7 for m in heard)
    total = 20 << 20
    assert len(heard) >= 3 and {m.total_bytes for m in heard} == {total}
    assert [m.done_bytes for m in heard] == sorted(m.done_bytes for m in heard) and heard[-1].done_bytes == total
