"""A model packaged for upload: what ``ember deploy`` sends, and how the server unpacks it.

A deployer's model comes from its own machine, never from a path on the server. The client packs
the model into a tar file and uploads it with the deploy (``POST /admin/models`` with
``Content-Type: application/x-tar`` and the deployment in the ``Ember-Deploy`` header); the
deployment's ``source`` then names something inside the package:

* ``file.py:Class``: the folder holding ``file.py`` (its helper modules, and the weights and assets
  the class names relative to it), without hidden entries and ``__pycache__``; source
  ``file.py:Class``;
* a Hugging Face folder: the folder, under its own name; source ``NAME``;
* an exported or TorchScript file: the file; source its file name.

The server unpacks into a fresh folder of its home with tarfile's ``data`` filter (no absolute
paths, no ``..``, no links out of the folder, no devices) and within :data:`MAX_PACKAGE_BYTES`.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from ember.errors import InvalidInput

__all__ = [
    "MAX_PACKAGE_BYTES",
    "MAX_PACKAGE_FILES",
    "PACKAGE_MEDIA_TYPE",
    "SPEC_HEADER",
    "Package",
    "check_inside",
    "pack",
    "unpack",
]

#: A package's size, packed and unpacked.
MAX_PACKAGE_BYTES = 64 * 1024**3
#: Files in one package.
MAX_PACKAGE_FILES = 10_000
PACKAGE_MEDIA_TYPE = "application/x-tar"
#: The request header carrying the deployment (JSON) of a packaged deploy.
SPEC_HEADER = "ember-deploy"

_SKIPPED = frozenset({"__pycache__"})


@dataclass(frozen=True)
class Package:
    """A packed model: the tar file, and the deployment's source inside it."""

    file: Path
    source: str

    def open(self) -> IO[bytes]:
        return self.file.open("rb")

    def remove(self) -> None:
        self.file.unlink(missing_ok=True)


def local_source(source: str, cwd: Path | None = None) -> tuple[Path, str] | None:
    """Where ``source`` is on this machine, and the class it names (``""`` for a folder or a file);
    None for a ``module:Class`` or a path that does not exist here."""
    base = cwd or Path.cwd()

    def here(path: str) -> Path | None:
        candidate = Path(path).expanduser()
        candidate = candidate if candidate.is_absolute() else base / candidate
        return candidate.resolve() if candidate.exists() else None

    whole = here(source)
    if whole is not None:
        return whole, ""
    ref, _, attr = source.rpartition(":")
    if ref.endswith(".py") and attr:
        path = here(ref)
        if path is not None and path.is_file():
            return path, attr
    return None


def pack(source: str, cwd: Path | None = None, into: Path | None = None) -> Package | None:
    """Pack a local ``source`` (see the module) into a tar file; None when ``source`` is not local.

    Raises :class:`~ember.errors.InvalidInput` when a class file's folder holds over
    :data:`MAX_PACKAGE_FILES` files (the file is not in a folder of its own, say a home directory)."""
    found = local_source(source, cwd)
    if found is None:
        return None
    path, attr = found
    handle, name = tempfile.mkstemp(prefix="ember-package-", suffix=".tar", dir=into)
    os.close(handle)
    file = Path(name)
    try:
        with tarfile.open(file, "w") as tar:
            if attr:  # file.py:Class: the file's folder
                for child in sorted(path.parent.iterdir()):
                    _add(tar, child, child.name)
                    if len(tar.getmembers()) > MAX_PACKAGE_FILES:
                        raise InvalidInput(
                            f"{path.parent} holds over {MAX_PACKAGE_FILES} files, and ember deploy uploads the "
                            f"folder of {path.name}: move the model's files into a folder of their own"
                        )
                package = Package(file, f"{path.name}:{attr}")
            else:
                _add(tar, path, path.name)
                package = Package(file, path.name)
    except BaseException:
        file.unlink(missing_ok=True)
        raise
    return package


def _add(tar: tarfile.TarFile, path: Path, arcname: str, seen: frozenset[Path] = frozenset()) -> None:
    if path.name.startswith(".") or path.name in _SKIPPED or not path.exists():
        return
    if path.is_dir():
        real = path.resolve()
        if real in seen:  # a link back up the tree
            return
        tar.add(path, arcname, recursive=False)
        for child in sorted(path.iterdir()):
            _add(tar, child, f"{arcname}/{child.name}", seen | {real})
    elif path.is_file():
        tar.add(path.resolve(), arcname)  # a link inside the model (HF caches use them) as the file it names


class PackageError(ValueError):
    """The package cannot be unpacked safely; the message says why."""


def unpack(tar_file: Path, into: Path, limit_bytes: int = MAX_PACKAGE_BYTES) -> None:
    """Unpack ``tar_file`` into the empty folder ``into``; raises :class:`PackageError` on anything unsafe
    or over the limits."""
    try:
        with tarfile.open(tar_file, "r:*") as tar:
            members = []
            total = 0
            for member in tar:
                members.append(member)
                total += max(member.size, 0)
                if len(members) > MAX_PACKAGE_FILES:
                    raise PackageError(f"the package has over {MAX_PACKAGE_FILES} files; package the model alone")
                if total > limit_bytes:
                    raise PackageError(f"the package unpacks to over {limit_bytes} bytes; package the model alone")
            tar.extractall(into, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise PackageError(f"the package holds an entry that would land outside it ({exc}); pack it again") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise PackageError(f"the package is not a readable tar file ({exc}); pack it again") from exc


def check_inside(root: Path, source: str) -> str:
    """``source`` of a packaged deploy as a path under ``root`` (a ``:Class`` suffix kept); raises
    :class:`PackageError` for a source that is absolute, climbs out with ``..`` or is not in the package."""
    ref, colon, attr = source.rpartition(":") if ".py:" in source else (source, "", "")
    relative = PurePosixPath(ref)
    if not ref or relative.is_absolute() or ".." in relative.parts:
        raise PackageError(
            f"source {source!r} must name a file or folder inside the uploaded package (like model.py:Class)"
        )
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()) or not path.exists():
        raise PackageError(f"the uploaded package holds no {ref!r}; `ember deploy` packs the source it is given")
    if colon and not (path.is_file() and path.suffix == ".py"):
        raise PackageError(f"source {source!r}: a class is named as file.py:Class, with the file in the package")
    return f"{path}{colon}{attr}"
