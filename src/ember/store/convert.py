"""Into and out of Ember's format: torch tensors, safetensors files, torch state dicts, HF folders.

    write_checkpoint(path, tensors)      torch tensors -> an Ember checkpoint
    import_source(source, path)          a .safetensors file, a .pt/.bin/.pth state dict, or a folder
                                         (Hugging Face layout, sharded or not) -> an Ember checkpoint
    export_safetensors(path, out)        an Ember checkpoint -> safetensors, so no one is locked in

Sources are mapped, not read into memory, where their format allows (safetensors always,
``torch.load(mmap=True)`` for the zip format), and ``torch.load`` runs with ``weights_only=True``:
loading a pickle never runs code from it. torch is imported inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.store.format import dtype_name, write_raw
from ember.store.safetensors_io import map_safetensors, write_safetensors

if TYPE_CHECKING:
    import torch

__all__ = ["export_safetensors", "import_source", "read_source", "write_checkpoint"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def write_checkpoint(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write ``tensors`` to ``path`` in Ember's format, atomically; return the bytes written.

    Tensors are moved to the CPU and made contiguous one at a time; views sharing storage are fine.
    TypeError for a name that is not a string, a value that is not a tensor or a dtype Ember cannot hold.
    ``progress(done, total)`` hears the tensor bytes written so far, out of all of them, as it goes.
    """
    import torch

    for name, tensor in tensors.items():  # check everything before writing anything
        if not isinstance(name, str):
            raise TypeError(f"checkpoint tensor names must be str, got {name!r}; name it with a string")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"'{name}' is a {type(tensor).__name__}, not a torch.Tensor")
        dtype_name(tensor.dtype)

    def contents() -> Iterator[tuple[str, str, tuple[int, ...], memoryview]]:
        for name, tensor in tensors.items():
            flat = tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
            raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
            yield name, dtype_name(tensor.dtype), tuple(tensor.shape), raw.numpy().data

    if progress is None:
        return write_raw(Path(path), contents(), metadata)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    size = write_raw(Path(path), contents(), metadata, progress=lambda done: progress(min(done, total), total))
    progress(total, total)
    return size


def read_source(source: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, a torch state dict, or a folder of either (sharded too)."""
    source = Path(source)
    if source.is_dir():
        tensors: dict[str, torch.Tensor] = {}
        for shard in _shards(source):
            for name, tensor in read_source(shard).items():
                if name in tensors:
                    raise ValueError(f"tensor '{name}' appears in more than one file of {source}; remove the duplicate")
                tensors[name] = tensor
        return tensors
    if source.suffix == ".safetensors":
        return map_safetensors(source)
    if source.suffix in _TORCH_SUFFIXES:
        return _state_dict(source)
    raise ValueError(f"{source}: import a .safetensors, {'/'.join(_TORCH_SUFFIXES)} file, or a folder of them")


def import_source(source: Path, path: Path, *, compress: bool = False) -> int:
    """Convert ``source`` (see :func:`read_source`) into an Ember checkpoint at ``path``; its size.

    With ``compress`` the checkpoint is written compressed (:mod:`ember.store.compress`).
    """
    if not compress:
        return write_checkpoint(path, read_source(source), {"source": str(source)})
    from ember.store.compress import compress_checkpoint

    raw = Path(path).with_name(Path(path).name + ".raw")
    try:
        write_checkpoint(raw, read_source(source), {"source": str(source)})
        return compress_checkpoint(raw, path)
    finally:
        raw.unlink(missing_ok=True)


def export_safetensors(path: Path, out: Path) -> int:
    """Write the Ember checkpoint at ``path`` to ``out`` as safetensors; return the bytes written."""
    from ember.store.loader import map_checkpoint

    return write_safetensors(out, map_checkpoint(path))


def _shards(folder: Path) -> list[Path]:
    """The weight files of a folder: those its ``*.index.json`` names, else every weight file in it."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map; is it a Hugging Face shard index?")
            return [folder / name for name in sorted(set(map(str, weight_map.values())))]
    found = sorted(folder.glob("*.safetensors")) or sorted(p for p in folder.iterdir() if p.suffix in _TORCH_SUFFIXES)
    if not found:
        raise ValueError(f"{folder} holds no .safetensors or torch weight files to import")
    return found


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be mapped
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    bad = [k for k, v in loaded.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ValueError(f"{path}: entries {bad[:5]} are not tensors named by strings; save a plain state dict")
    return dict(loaded)
