"""This host's measured link speeds: written by ``ember store bench``, read by ``ember serve``.

Until a model's own loads are measured, the latency model predicts its load from a tier as bytes
over these links plus a set-up cost (:class:`ember.policies.latency.Bandwidths`), and with the
default ``on_unmeetable=refuse`` a request whose predicted start is past its SLO is refused at
once. The defaults are guesses; ``HOME/bandwidths.json`` holds what the bench measured here.

Which bench rows (:mod:`ember.bench.load`) become which link:

- ``disk_bytes_per_s`` (cool -> warm): the ``store.promote`` row, the platform's own promotion
  (copy into the warm tier, chunk checksums checked), from ``cold disk`` when the bench measured
  it, else from ``page cache``. A model goes cool after its warm keep-alive, hours idle, so its file
  has usually left the page cache; a prediction that is too fast would admit requests that are then
  served late, which is what refusing is for. It is the rate of an uncompressed checkpoint; a
  compressed one decompresses as it promotes.
- ``host_to_device_bytes_per_s`` (warm -> hot): Ember's loader from the warm tier, as a worker runs
  it. On a CUDA host ``ember (staged) -> cuda`` from ``shm -> cuda`` (not the bare ``pinned h2d
  copy (ceiling)``, which the loader cannot beat); on a CPU host, where "hot" is the worker's memory,
  ``ember (mmap)`` from ``shm`` (the loader maps the warm file). A host without /dev/shm keeps its
  warm tier on disk: the same methods from ``page cache``.
- ``setup_s``: building the model around its weights is the user's code; a checkpoint of random
  tensors cannot measure it, so the default stays (a model's own loads replace all of this).

The file is validated when read; a malformed one gives a warning and the defaults, never a crash.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ember.config import validation_message
from ember.policies.latency import Bandwidths

__all__ = [
    "BANDWIDTHS_FILE",
    "PROMOTE",
    "HostBandwidths",
    "Row",
    "measured_bandwidths",
    "read_bandwidths",
    "save_bandwidths",
]

#: The method name of the load benchmark's cool -> warm rows (``ember.bench.load``).
PROMOTE = "store.promote (cool -> warm)"


@dataclass(frozen=True)
class Row:
    """One measured load of the benchmark: a method from a source, its rate and its ratio to the link."""

    method: str
    source: str
    gb_per_s: float
    ratio_to_ceiling: float
    seconds: float
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: The file under Ember's home.
BANDWIDTHS_FILE = "bandwidths.json"
_VERSION = 1
_DEFAULTS = Bandwidths()


def measured_bandwidths(rows: Iterable[Row], cuda: bool) -> tuple[Bandwidths, dict[str, Any]]:
    """The links the bench measured, and for each the row it came from (module docstring).

    ValueError if the rows lack the promotion or the warm tier's load (a bench run cut short).
    """
    by_key = {(row.method, row.source): row for row in rows}
    disk = _first(by_key, [(PROMOTE, "cold disk"), (PROMOTE, "page cache")])
    if cuda:
        method = "ember (staged) -> cuda"
        hot = _first(by_key, [(method, "shm -> cuda"), (method, "page cache -> cuda")])
    else:
        hot = _first(by_key, [("ember (mmap)", "shm"), ("ember (mmap)", "page cache")])
    if disk is None or hot is None:
        missing = "the store's promotion" if disk is None else "the warm tier's load"
        raise ValueError(f"the bench did not measure {missing}; run `ember store bench` to its end")
    bandwidths = Bandwidths(disk.gb_per_s * 1e9, hot.gb_per_s * 1e9, _DEFAULTS.setup_s)
    sources = {
        "disk_bytes_per_s": disk.to_json(),
        "host_to_device_bytes_per_s": hot.to_json(),
        "setup_s": "default: the bench cannot measure building a model",
    }
    return bandwidths, sources


def save_bandwidths(
    path: Path, bandwidths: Bandwidths, sources: Mapping[str, Any], notes: Mapping[str, Any], measured_at: float
) -> None:
    """Write ``path`` (atomically): the links, when, on what host, and the rows they came from."""
    body = {
        "version": _VERSION,
        "measured_at": datetime.fromtimestamp(measured_at, UTC).isoformat(timespec="seconds"),
        "bandwidths": {
            "disk_bytes_per_s": bandwidths.disk_bytes_per_s,
            "host_to_device_bytes_per_s": bandwidths.host_to_device_bytes_per_s,
            "setup_s": bandwidths.setup_s,
        },
        "host": {"name": platform.node(), "platform": platform.platform(), **notes},
        "sources": dict(sources),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(scratch, path)


class _Links(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disk_bytes_per_s: float = Field(_DEFAULTS.disk_bytes_per_s, gt=0, allow_inf_nan=False)
    host_to_device_bytes_per_s: float = Field(_DEFAULTS.host_to_device_bytes_per_s, gt=0, allow_inf_nan=False)
    setup_s: float = Field(_DEFAULTS.setup_s, ge=0, allow_inf_nan=False)


class _File(BaseModel):
    version: Literal[1]
    measured_at: str | None = None
    bandwidths: _Links


@dataclass(frozen=True)
class HostBandwidths:
    """The links the platform predicts first loads with, and where they came from."""

    bandwidths: Bandwidths
    path: Path
    #: When the bench measured them; None: the defaults are in use.
    measured_at: str | None = None
    #: Why a file that exists was not used.
    warning: str | None = None

    def describe(self) -> str:
        """One line for an operator: the links and their origin."""
        b = self.bandwidths
        links = (
            f"cool->warm {b.disk_bytes_per_s / 1e9:.2f} GB/s, warm->hot {b.host_to_device_bytes_per_s / 1e9:.2f} GB/s, "
            f"setup {b.setup_s * 1000:.0f} ms"
        )
        if self.measured_at is not None:
            return f"{links} (measured {self.measured_at}, {self.path})"
        return f"{links} (defaults; `ember store bench` measures this host)"

    def to_json(self) -> dict[str, Any]:
        b = self.bandwidths
        return {
            "disk_bytes_per_s": b.disk_bytes_per_s,
            "host_to_device_bytes_per_s": b.host_to_device_bytes_per_s,
            "setup_s": b.setup_s,
            "measured": self.measured_at is not None,
            "measured_at": self.measured_at,
            "file": str(self.path),
        }


def read_bandwidths(home: Path) -> HostBandwidths:
    """``home/bandwidths.json`` if it holds sound links; else the defaults, with a warning if it exists."""
    path = home / BANDWIDTHS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return HostBandwidths(_DEFAULTS, path)
    except OSError as exc:
        return _fallback(path, f"cannot be read ({exc.strerror or exc})")
    try:
        parsed = _File.model_validate_json(text)
    except ValidationError as exc:
        return _fallback(path, f"is not a bandwidths file ({validation_message(exc)})")
    links = parsed.bandwidths
    return HostBandwidths(
        Bandwidths(links.disk_bytes_per_s, links.host_to_device_bytes_per_s, links.setup_s),
        path,
        parsed.measured_at or "unknown date",
    )


def _fallback(path: Path, problem: str) -> HostBandwidths:
    warning = (
        f"{path} {problem}; predicting first loads with the default link speeds. "
        "Run `ember store bench` to measure them again, or delete the file"
    )
    return HostBandwidths(_DEFAULTS, path, warning=warning)


def _first(rows: Mapping[tuple[str, str], Row], keys: Iterable[tuple[str, str]]) -> Row | None:
    for key in keys:
        row = rows.get(key)
        if row is not None and row.gb_per_s > 0:
            return row
    return None
