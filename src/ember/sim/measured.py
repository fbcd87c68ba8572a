"""The simulator calibrated from what a real Ember server measured, and the gap between the two.

The fidelity check (``benchmarks/fidelity.py``, ``tests/integration/test_fidelity.py``) replays one
trace through a real ``ember serve`` and through the engine. What the engine needs of the real
platform is a :class:`MeasuredProfile`: per model, the seconds a hot batch took at a few row counts
(as the client saw them, so the HTTP and worker hops are in) and the seconds a load took from each
tier, plus the server's settings that shape its decisions (tick, keep-alives, workers). This module
turns a profile into the engine's inputs (one node, a device per worker, each model with its
measured curve and load times), runs the ``ember`` policy set, and compares :class:`Outcome` s.
Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ember.errors import InvalidInput
from ember.policies import Bandwidths
from ember.sim.calibration import Calibration, LatencyCurve
from ember.sim.cluster import ClusterSpec, ModelSpec
from ember.sim.engine import Engine, RunResult
from ember.sim.policysets import build_policy_set
from ember.sim.workload import Workload

__all__ = ["Gap", "MeasuredModel", "MeasuredProfile", "Outcome", "gap", "measured_calibration", "simulate"]

#: Memory the modeled devices and host get: the real CPU server never counts a worker full.
_UNBOUNDED_BYTES = 1 << 50


@dataclass(frozen=True)
class MeasuredModel:
    name: str
    slo_s: float
    max_batch_size: int
    weights_bytes: int
    #: ``(rows, seconds)`` of hot batches, rows increasing: client send to answer, median of a few.
    batch_s: tuple[tuple[int, float], ...]
    load_s_warm: float
    load_s_cool: float

    def __post_init__(self) -> None:
        if not self.batch_s:
            raise InvalidInput(f"measured model '{self.name}' needs at least one batch timing")
        if self.slo_s <= 0 or self.max_batch_size < 1 or self.weights_bytes < 0:
            raise InvalidInput(f"measured model '{self.name}': SLO and max batch size must be positive")


@dataclass(frozen=True)
class MeasuredProfile:
    """What one real server measured, and the settings it ran with."""

    models: tuple[MeasuredModel, ...]
    workers: int
    tick_s: float
    keepalive_hot_s: float
    keepalive_warm_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> MeasuredProfile:
        try:
            models = tuple(
                MeasuredModel(
                    str(m["name"]),
                    float(m["slo_s"]),
                    int(m["max_batch_size"]),
                    int(m["weights_bytes"]),
                    tuple((int(r), float(s)) for r, s in m["batch_s"]),
                    float(m["load_s_warm"]),
                    float(m["load_s_cool"]),
                )
                for m in raw["models"]
            )
            return cls(models, int(raw["workers"]), float(raw["tick_s"]), float(raw["keepalive_hot_s"]),
                       float(raw["keepalive_warm_s"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"a measured profile lacks a figure or has a wrong one: {e!r}") from e


def measured_calibration(profile: MeasuredProfile) -> tuple[ClusterSpec, tuple[ModelSpec, ...]]:
    """The modeled cluster (one node, a device per worker) and its models, from ``profile``.

    Link bandwidths are the real controller's defaults (``Bandwidths()``): they only predict a load
    before the first one is measured, as on the real server; the loads themselves take the measured
    seconds per tier (``ModelSpec.measured_load_s``).
    """
    bw = Bandwidths()
    cal = Calibration(
        name="measured",
        device_memory_bytes=_UNBOUNDED_BYTES,
        h2d_pinned_bytes_per_s=bw.host_to_device_bytes_per_s,
        disk_to_device_bytes_per_s=1 / (1 / bw.disk_bytes_per_s + 1 / bw.host_to_device_bytes_per_s),
        torch_load_bytes_per_s=bw.disk_bytes_per_s,
        disk_read_bytes_per_s=bw.disk_bytes_per_s,
        runtime_start_s=0.0,
        profiles={},
    )
    cluster = ClusterSpec(cal, 1, profile.workers, _UNBOUNDED_BYTES, _UNBOUNDED_BYTES)
    models = tuple(
        ModelSpec(
            m.name,
            LatencyCurve(m.name, tuple(r for r, _ in m.batch_s), tuple(s for _, s in m.batch_s), 0),
            max(1, m.weights_bytes),
            m.slo_s,
            m.max_batch_size,
            measured_load_s=(m.load_s_warm, m.load_s_cool),
        )
        for m in profile.models
    )
    return cluster, models


@dataclass(frozen=True)
class Outcome:
    """One side's figures on a trace: refused requests count as missed; latencies are of served ones."""

    requests: int
    served: int
    refused: int
    slo_attainment: float
    p50_ms: float
    p99_ms: float
    #: Loads (promotions to hot) by the tier they started from: ``{"warm": n, "cool": n}``.
    loads: dict[str, int]

    @classmethod
    def of(cls, latencies_s: Sequence[float], met: int, refused: int, loads: dict[str, int]) -> Outcome:
        total = len(latencies_s) + refused
        lat = np.asarray(latencies_s, dtype=np.float64)
        p50, p99 = (float(v) * 1000 for v in np.percentile(lat, [50, 99])) if len(lat) else (math.nan, math.nan)
        return cls(total, len(lat), refused, met / total if total else 1.0, p50, p99,
                   {"warm": loads.get("warm", 0), "cool": loads.get("cool", 0)})  # fmt: skip


@dataclass(frozen=True)
class Gap:
    #: |attainment(sim) - attainment(real)|, in fractions of requests.
    attainment_abs: float
    #: p99(sim) / p99(real), and the same for p50.
    p99_ratio: float
    p50_ratio: float


def gap(real: Outcome, sim: Outcome) -> Gap:
    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    return Gap(abs(sim.slo_attainment - real.slo_attainment), ratio(sim.p99_ms, real.p99_ms),
               ratio(sim.p50_ms, real.p50_ms))  # fmt: skip


def simulate(
    profile: MeasuredProfile, workload: Workload, duration_s: float, seed: int = 0
) -> tuple[Outcome, RunResult]:
    """``workload`` through the ``ember`` policy set on the cluster ``profile`` describes."""
    cluster, models = measured_calibration(profile)
    options = {"keepalive_hot_s": profile.keepalive_hot_s, "keepalive_warm_s": profile.keepalive_warm_s}
    engine = Engine(
        cluster, models, workload, build_policy_set("ember", options), duration_s=duration_s, seed=seed,
        tick_s=profile.tick_s, warm_tick_s=profile.tick_s, record_events=True,
    )  # fmt: skip
    result = engine.run()
    loads: dict[str, int] = {}
    for event in result.events:
        if event[1] == "load":
            loads[event[4]] = loads.get(event[4], 0) + 1
    return Outcome.of(result.latencies_s, result.met_slo, result.refused, loads), result
