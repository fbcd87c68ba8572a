"""TorchScript archives (``torch.jit.save``): :class:`TorchScript`, and the tensor plumbing it shares
with :mod:`ember.models.exported`.

Deploy time splits the archive in two: its tensors (parameters and buffers) go to the store as
weights, and the program with every such tensor emptied (a few kilobytes of code and constants) is
the ``program.pt`` asset. Load time reads the program from the asset bytes and assigns the store's
tensors into it, so the weights are never copied twice nor read outside the store's loader.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.api import Batch, ModelAPI, TensorSpec

__all__ = ["TorchScript"]

#: torch dtype -> Open Inference Protocol datatype.
DATATYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.uint8: "UINT8",
    torch.uint16: "UINT16",
    torch.uint32: "UINT32",
    torch.uint64: "UINT64",
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}
_DTYPES = {datatype: dtype for dtype, datatype in DATATYPES.items()}


class TorchScript(ModelAPI):
    """Serve a TorchScript archive (``torch.jit.script``/``trace`` + ``torch.jit.save``).

    ``inputs``/``outputs`` are ``{"name", "datatype", "shape"}`` dicts, in the order ``forward``
    takes and returns them. Without ``inputs``, every required ``forward`` argument must be a tensor
    and is served as FP32 of shape (-1, -1) under its own name; without ``outputs``, the returned
    tensor (or each tensor of a returned tuple) is ``output__0``, ``output__1``... FP32 (-1, -1).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        inputs: Sequence[Mapping[str, Any]] | None = None,
        outputs: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self._given_inputs = specs(inputs)
        self._given_outputs = specs(outputs)
        self.inputs = self._given_inputs if self._given_inputs is not None else ()
        self.outputs = self._given_outputs if self._given_outputs is not None else ()

    # -- deploy time -------------------------------------------------------------------------------

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        with _quiet():
            module = torch.jit.load(str(self.path), map_location="cpu")  # type: ignore[no-untyped-call]
        return independent(module.state_dict())

    def source_assets(self) -> Mapping[str, bytes]:
        with _quiet():
            module = torch.jit.load(str(self.path), map_location="cpu")  # type: ignore[no-untyped-call]
            self._describe(module)
            for name, tensor in module.state_dict().items():
                _set(module, name, torch.empty(0, dtype=tensor.dtype))
            program = io.BytesIO()
            torch.jit.save(module, program)
        return {"program.pt": program.getvalue()}

    # -- load time ---------------------------------------------------------------------------------

    def setup(self, weights: Mapping[str, torch.Tensor], assets: Mapping[str, bytes], device: torch.device) -> None:
        with _quiet():
            module = torch.jit.load(io.BytesIO(assets["program.pt"]), map_location=device)  # type: ignore[no-untyped-call]
        assign(module, weights, expected=module.state_dict().keys())
        self._describe(module)
        self._module = module.eval()
        self._device = device

    # -- request time ------------------------------------------------------------------------------

    def predict(self, batch: Batch) -> Batch:
        args = tensors_in(batch, self.inputs, self._device)
        with torch.inference_mode():
            return arrays_out(self._module(*args), self.outputs)

    # -- helpers -----------------------------------------------------------------------------------

    def _describe(self, module: torch.jit.ScriptModule) -> None:
        schema = module.forward.schema  # type: ignore[attr-defined]
        given_inputs, given_outputs = self._given_inputs, self._given_outputs
        self.inputs = given_inputs if given_inputs is not None else _inputs_from_schema(schema, self.path)
        self.outputs = given_outputs if given_outputs is not None else _outputs_from_schema(schema, self.path)


def _inputs_from_schema(schema: Any, path: Path) -> tuple[TensorSpec, ...]:
    arguments = [a for a in schema.arguments[1:] if not a.has_default_value()]  # [0] is self
    untyped = [f"{a.name}: {a.type}" for a in arguments if not isinstance(a.type, torch.TensorType)]
    if untyped or not arguments:
        raise ValueError(
            f"{path}: forward takes {untyped or 'no tensors'}; pass inputs=[{{'name': ..., 'datatype': ..., "
            "'shape': [-1, ...]}, ...] naming the tensors it takes, in order"
        )
    return tuple(TensorSpec(a.name, "FP32", (-1, -1)) for a in arguments)


def _outputs_from_schema(schema: Any, path: Path) -> tuple[TensorSpec, ...]:
    returned = schema.returns[0].type if len(schema.returns) == 1 else None
    if isinstance(returned, torch.TensorType):
        count = 1
    elif isinstance(returned, torch.TupleType) and all(isinstance(t, torch.TensorType) for t in returned.elements()):
        count = len(returned.elements())
    else:
        raise ValueError(
            f"{path}: forward returns {returned}, not tensors; pass outputs=[{{'name': ..., 'datatype': ..., "
            "'shape': [-1, ...]}, ...] in the order it returns them"
        )
    return tuple(TensorSpec(f"output__{i}", "FP32", (-1, -1)) for i in range(count))


# -- shared with ember.models.exported ---------------------------------------------------------------


def specs(options: Sequence[Mapping[str, Any]] | None) -> tuple[TensorSpec, ...] | None:
    """TensorSpecs from their JSON form (``None`` stays ``None``: derive them from the program)."""
    if options is None:
        return None
    return tuple(TensorSpec.from_json(option) for option in options)


def datatype(dtype: torch.dtype, what: str) -> str:
    try:
        return DATATYPES[dtype]
    except KeyError:
        raise ValueError(
            f"{what} has dtype {dtype}, which the Open Inference Protocol cannot carry; use one of "
            f"{sorted(DATATYPES.values())} at the model's edge"
        ) from None


def independent(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors that share no storage (tied weights), as the store expects."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor.contiguous()
        seen.add(pointer)
    return out


def assign(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], expected: Any) -> None:
    """Put each tensor of ``weights`` in place in ``module``, by dotted name; no copy, nothing left out."""
    missing = sorted(set(expected) - weights.keys())
    unexpected = sorted(weights.keys() - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit the program: missing {missing[:3]}, unexpected {unexpected[:3]} "
            f"({len(missing)} and {len(unexpected)} in all); deploy the model again"
        )
    for name, tensor in weights.items():
        _set(module, name, tensor)


def tensors_in(batch: Batch, inputs: Sequence[TensorSpec], device: torch.device) -> list[torch.Tensor]:
    """The batch's arrays as tensors on ``device``, in the order of ``inputs``."""
    tensors = []
    for spec in inputs:
        if spec.datatype == "BYTES":
            raise ValueError(f"input {spec.name!r} is BYTES; a torch program takes numeric tensors only")
        array = np.asarray(batch[spec.name])
        tensor = torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
        tensors.append(tensor.to(device=device, dtype=_DTYPES[spec.datatype]))
    return tensors


def arrays_out(result: Any, outputs: Sequence[TensorSpec]) -> dict[str, np.ndarray[Any, Any]]:
    """Name what ``forward`` returned: a tensor, a (nested) tuple or list in order, or a dict by name."""
    leaves = [result[spec.name] for spec in outputs] if isinstance(result, Mapping) else list(_leaves(result))
    if len(leaves) != len(outputs):
        raise ValueError(
            f"forward returned {len(leaves)} tensors for {len(outputs)} outputs {[s.name for s in outputs]}"
        )
    return {spec.name: tensor.detach().cpu().numpy() for spec, tensor in zip(outputs, leaves, strict=True)}


def _leaves(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _leaves(item)
    else:
        raise ValueError(f"forward returned a {type(value).__name__}; return tensors, tuples or dicts of tensors")


def _set(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner: Any = module
    for part in path:
        owner = getattr(owner, part)
    if isinstance(getattr(owner, leaf, None), torch.nn.Parameter):
        tensor = torch.nn.Parameter(tensor, requires_grad=False)
    setattr(owner, leaf, tensor)


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.jit warns that it is deprecated on every call; whoever deploys an archive knows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
