"""Calibration: measured link bandwidths, start-up costs and latency profiles of one device kind.

A calibration file is the JSON that ``benchmarks`` wrote on a real machine (``calibration/h200.json``
ships with Ember: an NVIDIA H200, measured 2026-11-28). :func:`load_calibration` reads the figures
the simulator needs into a frozen :class:`Calibration`; everything else in the file is kept out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ember.errors import InvalidInput

__all__ = ["BUILTIN_CALIBRATIONS", "Calibration", "LatencyCurve", "load_calibration"]

BUILTIN_CALIBRATIONS = ("h200",)
_GB = 1e9


@dataclass(frozen=True)
class LatencyCurve:
    """Seconds per batch at measured batch sizes; other sizes interpolate linearly (extrapolate past the end)."""

    name: str
    batch_sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    params: int

    def __post_init__(self) -> None:
        if not self.batch_sizes or len(self.batch_sizes) != len(self.seconds):
            raise InvalidInput(f"latency profile '{self.name}' needs as many batch sizes as timings")
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            raise InvalidInput(f"latency profile '{self.name}': batch sizes must be increasing and >= 1")

    def batch_s(self, rows: int) -> float:
        sizes, secs = self.batch_sizes, self.seconds
        if rows <= sizes[0] or len(sizes) == 1:
            return secs[0] if rows <= sizes[0] else secs[0] * rows / sizes[0]
        for i in range(1, len(sizes)):
            if rows <= sizes[i]:
                lo, hi = sizes[i - 1], sizes[i]
                return secs[i - 1] + (secs[i] - secs[i - 1]) * (rows - lo) / (hi - lo)
        # Past the last measurement: grow at the last segment's slope, never below per-row proportional.
        lo, hi = sizes[-2], sizes[-1]
        slope = max((secs[-1] - secs[-2]) / (hi - lo), secs[-1] / hi)
        return secs[-1] + slope * (rows - hi)


@dataclass(frozen=True)
class Calibration:
    """What a modeled device and its host can do, from measurements."""

    name: str
    device_memory_bytes: int
    #: Host -> device copy from pinned memory (the warm tier's promotion).
    h2d_pinned_bytes_per_s: float
    #: Checkpoint from local disk to the device with Ember's parallel pinned loader (cool -> hot).
    disk_to_device_bytes_per_s: float
    #: The same through ``torch.load`` (what a plain serverless function does on a cold start).
    torch_load_bytes_per_s: float
    #: Local disk into host memory (cool -> warm).
    disk_read_bytes_per_s: float
    #: A fresh process with torch imported and a CUDA context (a runtime that was not pooled).
    runtime_start_s: float
    profiles: dict[str, LatencyCurve]

    def profile(self, name: str) -> LatencyCurve:
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            raise InvalidInput(f"unknown latency profile '{name}'; this calibration has: {known}") from None


def load_calibration(source: str | Path) -> Calibration:
    """A built-in calibration by name (``"h200"``) or a calibration JSON file by path."""
    name = str(source)
    if name in BUILTIN_CALIBRATIONS:
        text = resources.files("ember.sim").joinpath("calibration", f"{name}.json").read_text()
    else:
        path = Path(source)
        if not path.is_file():
            known = ", ".join(BUILTIN_CALIBRATIONS)
            raise InvalidInput(f"calibration '{source}' is neither a file nor a built-in one ({known})")
        text, name = path.read_text(), path.stem
    try:
        return _parse(name, json.loads(text))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInput(f"calibration '{source}' lacks a figure the simulator needs: {e!r}") from e


def _parse(name: str, raw: dict[str, Any]) -> Calibration:
    smi = str(raw.get("env", {}).get("smi", ""))
    mem_mib = float(smi.split(",")[1].split()[0]) if smi.count(",") >= 1 else 141_000.0
    profiles: dict[str, LatencyCurve] = {}
    for key, label, table in (
        ("latency_ms_resnet50_fp16", "resnet50", "ms"),
        ("latency_ms_bert_base_seq128_fp16", "bert_base", "ms"),
        ("latency_ms_llama1b_fp16", "llama1b_decode", "decode_step_ms_ctx512"),
        ("latency_ms_llama1b_fp16", "llama1b_prefill", "prefill512_ms"),
    ):
        if key not in raw:
            continue
        points = sorted((int(b), float(ms) / 1000.0) for b, ms in raw[key][table].items())
        params = int(float(raw[key]["params_M"]) * 1e6)
        profiles[label] = LatencyCurve(label, tuple(b for b, _ in points), tuple(s for _, s in points), params)
    loads = raw["load_to_gpu_GBps"]
    return Calibration(
        name=name,
        device_memory_bytes=int(mem_mib * 2**20),
        h2d_pinned_bytes_per_s=float(raw["h2d_GBps"]["1024MB_pinned"]["h2d"]) * _GB,
        disk_to_device_bytes_per_s=float(loads["ref_parallel_pinned_8thr_cold"]["GBps"]) * _GB,
        torch_load_bytes_per_s=float(loads["torch_load_map_cuda_cold"]["GBps"]) * _GB,
        disk_read_bytes_per_s=float(raw["disk_read_GBps"]["cold_8thr"]) * _GB,
        runtime_start_s=float(raw["process_start_s"]["torch_cuda_ctx"]),
        profiles=profiles,
    )
