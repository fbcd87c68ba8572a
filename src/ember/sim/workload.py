"""Workloads: the arrivals a scenario replays, as parallel lists sorted by time.

Two sources:

* :func:`synthetic` shapes traffic like production serverless (Shahrad et al., "Serverless in the
  Wild", ATC'20): popularity across models is heavy-tailed (Zipf), and each model follows one of four
  arrival patterns: steady Poisson, bursty (on/off, Markov-modulated), diurnal (a daily sine) or a
  periodic timer. With a steep enough Zipf exponent most models are idle for hours at a time.
* :func:`load_trace` replays a CSV file: an arrival time (seconds, or a date-time), a model, and
  optionally a request size in rows.

Both are pure functions of their inputs and a seed: the same seed gives the same arrivals.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ember.errors import InvalidInput

__all__ = ["Pattern", "SyntheticSpec", "Workload", "load_trace", "synthetic"]

FloatArray = npt.NDArray[np.float64]


class Pattern(StrEnum):
    POISSON = "poisson"
    BURSTY = "bursty"
    DIURNAL = "diurnal"
    TIMER = "timer"


@dataclass(frozen=True)
class Workload:
    """Arrivals in time order: ``times[i]`` seconds, for model index ``models[i]``, of ``sizes[i]`` rows."""

    times: list[float]
    models: list[int]
    sizes: list[int]
    #: The arrival pattern each model was given (synthetic workloads only).
    patterns: tuple[Pattern, ...] = ()
    #: Generative requests: output tokens of each arrival, whose ``sizes`` are then its prompt tokens
    #: (``ember.sim.llmtrace``); empty when every model is one-shot.
    outputs: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.times)


@dataclass(frozen=True)
class SyntheticSpec:
    total_rate_per_s: float
    zipf_s: float = 1.2
    #: Fraction of models per pattern (normalised).
    mix: tuple[tuple[Pattern, float], ...] = (
        (Pattern.POISSON, 0.4),
        (Pattern.BURSTY, 0.3),
        (Pattern.DIURNAL, 0.2),
        (Pattern.TIMER, 0.1),
    )
    burst_on_s: float = 60.0
    burst_off_s: float = 1800.0
    diurnal_amplitude: float = 0.8
    diurnal_period_s: float = 86_400.0
    timer_periods_s: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0)
    #: Rows per request: each request is 1..max_rows, uniformly.
    max_rows: int = 1

    def __post_init__(self) -> None:
        if self.total_rate_per_s <= 0 or self.zipf_s < 0:
            raise InvalidInput("a synthetic workload needs total_rate_per_s > 0 and zipf_s >= 0")
        if not self.mix or any(f < 0 for _, f in self.mix) or sum(f for _, f in self.mix) <= 0:
            raise InvalidInput("the pattern mix needs non-negative fractions that do not all vanish")
        if self.burst_on_s <= 0 or self.burst_off_s < 0 or not 0 <= self.diurnal_amplitude <= 1:
            raise InvalidInput("bursts need on > 0 and off >= 0 seconds; the diurnal amplitude is in [0, 1]")
        if not self.timer_periods_s or min(self.timer_periods_s) <= 0 or self.max_rows < 1:
            raise InvalidInput("timer periods must be positive and max_rows >= 1")


def synthetic(spec: SyntheticSpec, num_models: int, duration_s: float, seed: int) -> Workload:
    """Arrivals for ``num_models`` models over ``duration_s`` seconds, repeatable from ``seed``."""
    if num_models < 1 or duration_s <= 0:
        raise InvalidInput(f"need >= 1 model and a positive duration, got {num_models} and {duration_s}")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_models + 1, dtype=np.float64) ** spec.zipf_s
    rates = spec.total_rate_per_s * weights / weights.sum()
    rates = rates[rng.permutation(num_models)]  # popularity does not follow the model's name
    kinds = [p for p, _ in spec.mix]
    fractions = np.array([f for _, f in spec.mix], dtype=np.float64)
    chosen = rng.choice(len(kinds), size=num_models, p=fractions / fractions.sum())
    patterns = tuple(kinds[int(k)] for k in chosen)
    chunks: list[FloatArray] = []
    owners: list[npt.NDArray[np.int64]] = []
    for i, (pattern, rate) in enumerate(zip(patterns, rates, strict=True)):
        times = _arrivals(pattern, float(rate), duration_s, spec, rng)
        chunks.append(times)
        owners.append(np.full(len(times), i, dtype=np.int64))
    times = np.concatenate(chunks)
    models = np.concatenate(owners)
    order = np.argsort(times, kind="stable")
    sizes = rng.integers(1, spec.max_rows + 1, size=len(times)) if spec.max_rows > 1 else np.ones(len(times), np.int64)
    return Workload(times[order].tolist(), models[order].tolist(), sizes.tolist(), patterns)


def _arrivals(
    pattern: Pattern, rate: float, duration_s: float, spec: SyntheticSpec, rng: np.random.Generator
) -> FloatArray:
    if pattern is Pattern.POISSON:
        return _poisson(rate, duration_s, rng)
    if pattern is Pattern.TIMER:
        period = float(rng.choice(spec.timer_periods_s))
        start = float(rng.uniform(0, period))
        ticks = np.arange(start, duration_s, period)
        jitter = rng.uniform(0, 0.01 * period, size=len(ticks))
        return np.sort(np.minimum(ticks + jitter, np.nextafter(duration_s, 0)))
    if pattern is Pattern.DIURNAL:
        peak = rate * (1 + spec.diurnal_amplitude)
        candidates = _poisson(peak, duration_s, rng)
        phase = float(rng.normal(0.0, 2 * math.pi / 12))  # peaks within a couple of hours of each other
        level = 1 + spec.diurnal_amplitude * np.sin(2 * math.pi * candidates / spec.diurnal_period_s + phase)
        keep = rng.uniform(0, 1 + spec.diurnal_amplitude, size=len(candidates)) < level
        return candidates[keep]
    return _bursty(rate, duration_s, spec.burst_on_s, spec.burst_off_s, rng)


def _poisson(rate: float, duration_s: float, rng: np.random.Generator) -> FloatArray:
    n = int(rng.poisson(rate * duration_s))
    return np.sort(rng.uniform(0.0, duration_s, size=n))


def _bursty(rate: float, duration_s: float, on_s: float, off_s: float, rng: np.random.Generator) -> FloatArray:
    """On/off: exponential on and off periods; Poisson at ``rate * (on + off) / on`` while on, silent while off."""
    cycles = int(duration_s / (on_s + off_s) * 2) + 4
    ons = rng.exponential(on_s, size=cycles)
    offs = rng.exponential(off_s, size=cycles) if off_s > 0 else np.zeros(cycles)
    starts = np.cumsum(np.concatenate(([0.0], (ons + offs)[:-1]))) - rng.uniform(0, on_s + off_s)
    ends = starts + ons
    starts, ends = np.clip(starts, 0, duration_s), np.clip(ends, 0, duration_s)
    lengths = ends - starts
    on_total = float(lengths.sum())
    if on_total <= 0:
        return np.empty(0)
    points = _poisson(rate * (on_s + off_s) / on_s, on_total, rng)
    cum = np.cumsum(lengths)
    k = np.minimum(np.searchsorted(cum, points, side="right"), len(cum) - 1)
    before = np.concatenate(([0.0], cum[:-1]))[k]
    return np.sort(starts[k] + (points - before))


def load_trace(
    path: Path,
    model_names: Sequence[str],
    *,
    time_column: str = "time_s",
    model_column: str | None = "model",
    size_column: str | None = None,
    model: str | None = None,
) -> Workload:
    """Arrivals from a CSV file with a header.

    ``time_column`` holds seconds or date-times (ISO 8601, as in Azure's public traces); times are
    made relative to the first row. Each row's model is ``model_column``'s value, or ``model`` for a
    single-model trace. ``size_column``, when given, holds the request's rows (>= 1).
    """
    index = {name: i for i, name in enumerate(model_names)}
    if model is not None and model not in index:
        raise InvalidInput(f"trace {path}: model '{model}' is not in the scenario")
    times: list[float] = []
    models: list[int] = []
    sizes: list[int] = []
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            wanted = [c for c in (time_column, None if model else model_column, size_column) if c]
            missing = [c for c in wanted if c not in (reader.fieldnames or [])]
            if missing:
                raise InvalidInput(f"trace {path} has no column {missing[0]!r}; it has {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                name = model if model is not None else row[str(model_column)]
                if name not in index:
                    raise InvalidInput(f"trace {path}, line {line}: model '{name}' is not in the scenario")
                times.append(_seconds(row[time_column], path, line))
                models.append(index[name])
                sizes.append(_size(row[size_column], path, line) if size_column else 1)
    except OSError as e:
        raise InvalidInput(f"cannot read trace {path}: {e.strerror}") from e
    if not times:
        raise InvalidInput(f"trace {path} has no rows")
    start = min(times)
    order = sorted(range(len(times)), key=lambda i: times[i])
    return Workload([times[i] - start for i in order], [models[i] for i in order], [sizes[i] for i in order])


def _seconds(text: str, path: Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        try:
            return datetime.fromisoformat(text.strip()).timestamp()
        except ValueError:
            raise InvalidInput(f"trace {path}, line {line}: time {text!r} is neither seconds nor a date-time") from None
    if not math.isfinite(value):
        raise InvalidInput(f"trace {path}, line {line}: time {text!r} is not finite")
    return value


def _size(text: str, path: Path, line: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(f"trace {path}, line {line}: size {text!r} is not a whole number") from None
    if value < 1:
        raise InvalidInput(f"trace {path}, line {line}: size must be >= 1, got {value}")
    return value
