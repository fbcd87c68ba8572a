"""The safetensors codec: how Ember imports safetensors files and exports its checkpoints back.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON naming each
tensor's dtype, shape and ``[begin, end)`` byte range within the data that follows, then the data.
Users are never locked in: any safetensors reader opens what :func:`write_safetensors` writes, and
:func:`map_safetensors` opens what any safetensors writer wrote. Ember stores weights in its own
format (:mod:`ember.store.format`); this module is the door in and out.

:func:`map_safetensors` checks the whole header before it builds a single tensor, so a damaged file
raises :class:`~ember.errors.CorruptCheckpoint` instead of returning part of its tensors. On the CPU
the tensors are views over one private (copy-on-write) memory map of the file: loading costs page
faults, not copies, and writing into a tensor never reaches the file. ``torch.frombuffer`` holds a
reference to the ``mmap`` object, so the mapping lives exactly as long as the last tensor over it.

torch is imported inside the functions: only worker code imports it at module level.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import CorruptCheckpoint
from ember.store.format import atomic_file

if TYPE_CHECKING:
    import torch

__all__ = ["map_safetensors", "write_safetensors"]

# safetensors dtype code -> name of the torch dtype; codes this torch lacks are left out at run time.
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_HEADER_ALIGN = 8  # pad the JSON so the data starts 8-byte aligned
_REPAIR = "delete it and import the model again from its source"


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)}


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> int:
    """Write ``tensors`` to ``path`` as safetensors, atomically; return the bytes written.

    The file appears complete or not at all: it is written to ``path`` + ``".tmp"``, synced
    and renamed. Tensors are moved to the CPU and made contiguous; views that share storage are
    fine (each is written as its own bytes). Tensors are laid out widest element first, so every
    tensor starts aligned to its element size and a CPU mapping of the file needs no copy.
    """
    import torch

    codes = {dtype: code for code, dtype in _torch_dtypes().items()}
    prepared: list[tuple[str, torch.Tensor]] = []
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"checkpoint tensor names must be str, got {name!r}; name it with a string")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved by safetensors; rename that tensor")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"'{name}' is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype not in codes:
            raise TypeError(
                f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store here; "
                f"convert it (for example with .float()) before writing"
            )
        prepared.append((name, tensor.detach().to("cpu").contiguous()))
    prepared.sort(key=lambda item: (-item[1].element_size(), item[0]))

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data_bytes = 0
    for name, tensor in prepared:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": codes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [data_bytes, data_bytes + nbytes],
        }
        data_bytes += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % _HEADER_ALIGN)

    with atomic_file(Path(path)) as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for _, tensor in prepared:
            if tensor.numel():
                out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return 8 + len(blob) + data_bytes


def map_safetensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Return the tensors of the safetensors file at ``path``, in the file's order.

    On the CPU they are zero-copy views over a private memory map of the file (writes to them stay
    in this process). On another device they are mapped on the CPU, then copied there.
    A malformed or truncated file raises ``CorruptCheckpoint``; an absent one, ``FileNotFoundError``.
    """
    import torch

    path = Path(path)
    with open(path, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        if size < 8:
            raise _corrupt(path, f"it is {size} bytes long, too short to hold the 8-byte header length")
        mapped = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        entries, data_start = _parse_header(path, mapped)
    except BaseException:
        mapped.close()
        raise

    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        numel = math.prod(entry.shape)
        offset = data_start + entry.begin
        if numel == 0:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
        elif offset % entry.dtype.itemsize == 0:
            tensor = torch.frombuffer(mapped, dtype=entry.dtype, count=numel, offset=offset)
        else:  # another writer left it misaligned: copy rather than hand kernels a skewed pointer
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=entry.end - entry.begin, offset=offset)
            tensor = raw.clone().view(entry.dtype)
        tensors[entry.name] = tensor.view(entry.shape)
    del mapped  # from here on only the tensors keep the mapping alive

    if torch.device(device).type != "cpu":
        tensors = {name: tensor.to(device, non_blocking=False) for name, tensor in tensors.items()}
    return tensors


def _parse_header(path: Path, buf: mmap.mmap) -> tuple[list[_Entry], int]:
    """Validate the header of ``buf`` in full; return its entries and where the data starts."""
    (header_len,) = struct.unpack_from("<Q", buf, 0)
    if header_len > MAX_HEADER_BYTES:
        raise _corrupt(path, f"its header claims {header_len} bytes, over the {MAX_HEADER_BYTES} limit")
    if 8 + header_len > len(buf):
        raise _corrupt(path, f"its header claims {header_len} bytes but only {len(buf) - 8} follow")
    try:
        header = json.loads(buf[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(path, f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _corrupt(path, "its __metadata__ is not an object of strings")

    dtypes = _torch_dtypes()
    entries = [_entry(path, name, info, dtypes) for name, info in header.items()]
    data_len = len(buf) - 8 - header_len
    cursor = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin < cursor:
            raise _corrupt(path, f"tensor '{entry.name}' overlaps the tensor before it")
        if entry.begin > cursor:
            raise _corrupt(path, f"bytes {cursor}..{entry.begin} of the data belong to no tensor")
        cursor = entry.end
    if cursor > data_len:
        raise _corrupt(path, f"its tensors need {cursor} bytes of data but only {data_len} are there (truncated)")
    if cursor < data_len:
        raise _corrupt(path, f"{data_len - cursor} bytes after the last tensor belong to no tensor")
    return entries, 8 + header_len


def _entry(path: Path, name: str, info: object, dtypes: dict[str, torch.dtype]) -> _Entry:
    if not isinstance(info, dict):
        raise _corrupt(path, f"the header entry of tensor '{name}' is not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or code not in dtypes:
        raise _corrupt(path, f"tensor '{name}' has dtype {code!r}, which is not one torch can hold")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _corrupt(path, f"tensor '{name}' has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise _corrupt(path, f"tensor '{name}' has data_offsets {offsets!r}, not two non-negative integers")
    begin, end = offsets
    dtype = dtypes[code]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise _corrupt(
            path,
            f"tensor '{name}' spans {end - begin} bytes but shape {shape} of {code} needs "
            f"{math.prod(shape) * dtype.itemsize}",
        )
    return _Entry(name, dtype, tuple(shape), begin, end)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a name appears twice")
    return result


def _corrupt(path: Path, problem: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint {path} is damaged: {problem}; {_REPAIR}")
