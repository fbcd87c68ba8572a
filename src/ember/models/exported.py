"""``torch.export`` programs (``torch.export.save``, ``.pt2``): :class:`ExportedProgram`.

As for TorchScript, deploy time splits the file: parameters, buffers and tensor constants go to
the store as weights; the program with those tensors emptied is the ``program.pt2`` asset. Load
time rebuilds the module from the asset bytes and assigns the store's tensors into it.

Inputs and outputs come from the program itself: ``input__0``, ``input__1``... in the order of
its flattened user inputs, ``output__0``... in the order of its flattened outputs; the datatype is
the tensor's dtype; a dimension exported as dynamic is -1, and the first is always the batch (-1).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

from ember.api import Batch, ModelAPI, TensorSpec
from ember.models.torchscript import arrays_out, assign, datatype, independent, tensors_in

__all__ = ["ExportedProgram"]


class ExportedProgram(ModelAPI):
    """Serve a program written by ``torch.export.save`` (export it with a dynamic batch dimension)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    # -- deploy time -------------------------------------------------------------------------------

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        return independent(_tensors(torch.export.load(self.path)))

    def source_assets(self) -> Mapping[str, bytes]:
        program = torch.export.load(self.path)
        self._describe(program)
        for table in (program.state_dict, program.constants):
            for name, value in table.items():
                if isinstance(value, torch.Tensor):
                    empty = torch.empty(0, dtype=value.dtype)
                    is_parameter = isinstance(value, torch.nn.Parameter)
                    table[name] = torch.nn.Parameter(empty, value.requires_grad) if is_parameter else empty
        file = io.BytesIO()
        torch.export.save(program, file)
        return {"program.pt2": file.getvalue()}

    # -- load time ---------------------------------------------------------------------------------

    def setup(self, weights: Mapping[str, torch.Tensor], assets: Mapping[str, bytes], device: torch.device) -> None:
        program = torch.export.load(io.BytesIO(assets["program.pt2"]))
        self._describe(program)
        module = program.module()
        assign(module, weights, expected=_tensors(program).keys())
        self._module = module
        self._in_spec = program.call_spec.in_spec
        self._device = device

    # -- request time ------------------------------------------------------------------------------

    def predict(self, batch: Batch) -> Batch:
        args, kwargs = pytree.tree_unflatten(tensors_in(batch, self.inputs, self._device), self._in_spec)
        with torch.inference_mode():
            return arrays_out(self._module(*args, **kwargs), self.outputs)

    # -- helpers -----------------------------------------------------------------------------------

    def _describe(self, program: torch.export.ExportedProgram) -> None:
        nodes = {node.name: node for node in program.graph.nodes}
        signature = program.graph_signature
        user_inputs = [spec.arg for spec in signature.input_specs if spec.kind == InputKind.USER_INPUT]
        user_outputs = [spec.arg for spec in signature.output_specs if spec.kind == OutputKind.USER_OUTPUT]
        self.inputs = tuple(self._spec(f"input__{i}", arg, nodes) for i, arg in enumerate(user_inputs))
        self.outputs = tuple(self._spec(f"output__{i}", arg, nodes) for i, arg in enumerate(user_outputs))

    def _spec(self, name: str, arg: Any, nodes: Mapping[str, torch.fx.Node]) -> TensorSpec:
        value = nodes[arg.name].meta.get("val") if isinstance(arg, TensorArgument) else None
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise ValueError(
                f"{self.path}: {name} is {arg}, not a tensor with a batch dimension; export a module whose "
                "forward takes and returns tensors of shape (batch, ...)"
            )
        shape = [d if isinstance(d, int) else -1 for d in value.shape]
        return TensorSpec(name, datatype(value.dtype, f"{self.path}: {name}"), (-1, *shape[1:]))


def _tensors(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Parameters, buffers (persistent or not) and tensor constants, by the module's dotted names."""
    constants = {name: value for name, value in program.constants.items() if isinstance(value, torch.Tensor)}
    return {**program.state_dict, **constants}
