"""The simulator calibrated from what a real Ember server measured, and the gap between the two.

The fidelity check (``benchmarks/fidelity.py``, ``tests/integration/test_fidelity.py``) replays one
trace through a real ``ember serve`` and through the engine. What the engine needs of the real
platform is a :class:`MeasuredProfile`: per model, the seconds a hot batch took at a few row counts
(as the client saw them, so the HTTP and worker hops are in), optionally the compute seconds the
server itself measured for the same batches, and the seconds a load took from each tier, plus the
server's settings that shape its decisions (tick, keep-alives, workers). This module turns a profile
into the engine's inputs (one node, a device per worker, each model with its measured curve and load
times), runs the ``ember`` policy set, and compares :class:`Outcome` s, overall and per model.

Where the time goes. The server's scheduler only ever sees compute: its latency model learns the
worker's measured compute time, and a deadline is the gateway's arrival time plus the SLO. The
client sees more: HTTP, JSON and the worker hop, paid once per request outside the scheduler's view.
When the profile has the server's compute times, the engine's device time is that compute plus the
*dispatch* time a batch holds the worker beyond it (a lone request's time inside the server less its
compute: the worker hop), so the simulated capacity is the server's; each model's *overhead*, a lone
request's client time minus that device time, is added to every simulated latency afterwards: a
simulated request meets its SLO when its engine latency plus the overhead is within it. Without
compute times (older profiles) the curve is the client time and the overhead is zero.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ember.errors import InternalError, InvalidInput
from ember.policies import Bandwidths
from ember.sim.calibration import Calibration, LatencyCurve
from ember.sim.cluster import ClusterSpec, ModelSpec
from ember.sim.engine import Engine, RunResult
from ember.sim.policysets import build_policy_set
from ember.sim.workload import Workload

__all__ = [
    "Gap",
    "MeasuredModel",
    "MeasuredProfile",
    "Outcome",
    "by_model",
    "gap",
    "measured_calibration",
    "simulate",
]

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
    #: ``(rows, seconds)`` of the same batches as the server's worker timed them (compute only); empty:
    #: not measured, and the engine charges the client times.
    compute_s: tuple[tuple[int, float], ...] = ()
    #: Seconds a batch holds the worker beyond its compute (the worker hop, the scheduler's turn-around):
    #: a lone request's time inside the server (admission to answer) less its compute. Part of the
    #: device time, taken out of the overhead.
    dispatch_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.batch_s:
            raise InvalidInput(f"measured model '{self.name}' needs at least one batch timing")
        if self.slo_s <= 0 or self.max_batch_size < 1 or self.weights_bytes < 0:
            raise InvalidInput(f"measured model '{self.name}': SLO and max batch size must be positive")
        if self.compute_s and [r for r, _ in self.compute_s] != [r for r, _ in self.batch_s]:
            raise InvalidInput(
                f"measured model '{self.name}': compute times are for rows {[r for r, _ in self.compute_s]}, "
                f"client times for {[r for r, _ in self.batch_s]}; measure both at the same row counts"
            )
        if self.dispatch_s < 0 or not math.isfinite(self.dispatch_s):
            raise InvalidInput(f"measured model '{self.name}': dispatch_s must be finite seconds >= 0")

    @property
    def device_s(self) -> tuple[tuple[int, float], ...]:
        """What a batch holds the device for in the engine: compute plus dispatch when measured, else the
        client time."""
        if not self.compute_s:
            return self.batch_s
        return tuple((rows, seconds + self.dispatch_s) for rows, seconds in self.compute_s)

    @property
    def overhead_s(self) -> float:
        """Seconds a request spends outside the device (client time minus device time; 0 unmeasured)."""
        if not self.compute_s:
            return 0.0
        return max(0.0, statistics.median(c - d for (_, c), (_, d) in zip(self.batch_s, self.device_s, strict=True)))


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
                    tuple((int(r), float(s)) for r, s in m.get("compute_s", ())),
                    float(m.get("dispatch_s", 0.0)),
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
            LatencyCurve(m.name, tuple(r for r, _ in m.device_s), tuple(s for _, s in m.device_s), 0),
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
    #: Served past the SLO (missed, as the refused are).
    late: int = 0
    #: Batches that served them (0: not counted).
    batches: int = 0

    @classmethod
    def of(
        cls, latencies_s: Sequence[float], met: int, refused: int, loads: dict[str, int], batches: int = 0
    ) -> Outcome:
        total = len(latencies_s) + refused
        lat = np.asarray(latencies_s, dtype=np.float64)
        p50, p99 = (float(v) * 1000 for v in np.percentile(lat, [50, 99])) if len(lat) else (math.nan, math.nan)
        return cls(total, len(lat), refused, met / total if total else 1.0, p50, p99,
                   {"warm": loads.get("warm", 0), "cool": loads.get("cool", 0)}, len(lat) - met, batches)  # fmt: skip


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
    """``workload`` through the ``ember`` policy set on the cluster ``profile`` describes.

    The outcome's latencies are as a client would see them: the engine's plus each model's overhead.
    """
    cluster, models = measured_calibration(profile)
    options = {"keepalive_hot_s": profile.keepalive_hot_s, "keepalive_warm_s": profile.keepalive_warm_s}
    engine = Engine(
        cluster, models, workload, build_policy_set("ember", options), duration_s=duration_s, seed=seed,
        tick_s=profile.tick_s, warm_tick_s=profile.tick_s, record_events=True,
    )  # fmt: skip
    result = engine.run()
    latencies, _, loads = _tally(profile, result)  # _tally checks the refusals add up to result.refused
    slo = {m.name: m.slo_s for m in profile.models}
    met = sum(s <= slo[name] for name, seen in latencies.items() for s in seen)
    loads_total = {tier: sum(counts.get(tier, 0) for counts in loads.values()) for tier in ("warm", "cool")}
    every = [s for seen in latencies.values() for s in seen]
    return Outcome.of(every, met, result.refused, loads_total, result.batches), result


def by_model(profile: MeasuredProfile, result: RunResult) -> dict[str, Outcome]:
    """Each model's outcome in ``result`` (a run of :func:`simulate` on ``profile``), overhead added."""
    latencies, refused, loads = _tally(profile, result)
    batches = dict.fromkeys(latencies, 0)
    for event in result.events:
        if event[1] == "batch":
            batches[_model_of(event[2])] += 1
    outcomes = {}
    for m in profile.models:
        seen, name = latencies[m.name], m.name
        outcomes[name] = Outcome.of(seen, sum(s <= m.slo_s for s in seen), refused[name], loads[name], batches[name])
    return outcomes


def _tally(
    profile: MeasuredProfile, result: RunResult
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, dict[str, int]]]:
    """Per model: client-seen latencies of the served requests, refusals, and loads by tier."""
    models = {m.name: m for m in profile.models}
    latencies: dict[str, list[float]] = {name: [] for name in models}
    refused = dict.fromkeys(models, 0)
    loads: dict[str, dict[str, int]] = {name: {} for name in models}
    for event in result.events:
        if event[1] == "refuse":
            refused[event[2]] += event[3] if len(event) > 3 else 1
        elif event[1] == "load":
            counts = loads[_model_of(event[2])]
            counts[event[4]] = counts.get(event[4], 0) + 1
    for name, seconds in _served(result):
        latencies[name].append(seconds + models[name].overhead_s)
    if sum(refused.values()) != result.refused:
        raise InternalError(f"the run counted {result.refused} refusals but recorded {sum(refused.values())}")
    return latencies, refused, loads


def _served(result: RunResult) -> list[tuple[str, float]]:
    """``(model, engine seconds)`` of every served request, in the order of ``result.latencies_s``.

    The engine appends latencies batch by batch as batches end, in the order of their end times and,
    at equal times, of their starts: the order of the recorded ``batch`` events sorted that way.
    """
    batches = sorted(
        (event[0] + event[6], i, _model_of(event[2]), event[4])
        for i, event in enumerate(result.events)
        if event[1] == "batch"
    )
    owners = [name for _, _, name, requests in batches for _ in range(requests)]
    if len(owners) != len(result.latencies_s):
        raise InternalError(
            f"the run recorded batches for {len(owners)} requests but {len(result.latencies_s)} latencies; "
            "run the engine with record_events=True"
        )
    return list(zip(owners, result.latencies_s, strict=True))


def _model_of(instance_key: str) -> str:
    return instance_key.rsplit("#", 1)[0]
