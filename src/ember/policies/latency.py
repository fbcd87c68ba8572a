"""The latency model: how long a batch of ``rows`` takes, and how long a load takes, per model.

Decision rule. Batch sizes are grouped in power-of-two buckets (1, 2, 3-4, 5-8, ...). Each bucket
keeps the last ``window`` measured batch times and estimates their ``quantile`` (p90 by default): a
windowed order statistic, so one outlier moves it by at most one rank, and it forgets a regime
after ``window`` batches. A prediction for ``rows`` is the estimate of its bucket, made monotone in
the batch size (never below a smaller bucket's); a bucket not measured yet borrows the next larger
measured one (conservative); past the largest measured bucket the line through the two largest
measured ones is extended (never falling), or with only one measured, it is scaled by rows.

Load time per tier: the high quantile of this model's own measured loads from that tier once it
has any; before that, its bytes over the measured link bandwidths (:class:`Bandwidths`) plus a
fixed set-up cost. A load still running past its prediction is expected to take as long again as it
has taken so far (:func:`remaining_load_s`), so an overrun is seen at once rather than waited out.

What a refusal may count on (:meth:`LatencyModel.admission_s`) is deliberately less than the
prediction: the lower of the bucket's quantile and its newest measurement, and nothing at all for a
bucket no real request has measured. A windowed p90 needs ten fresh samples to forget one outlier, and a request
that is refused produces no sample, so refusing on the quantile alone can last for ever (a slow
first inference after a load was enough). Refusing only when the newest run of that size also
missed means one good run restores admission; a bucket never measured is served and measured
rather than judged by a neighbour. The deploy-time warm-up runs synthetic inputs (zeros, empty
strings) on a fresh process: its times shape the predictions batching uses, but say too little about
a real request to refuse one. Each bucket also remembers when its newest sample was taken and
how many requests were refused on it since (:meth:`LatencyModel.observe_refusal`), so admission
can tell when that evidence is old enough to be checked again with a probe
(:meth:`LatencyModel.probe_due`).

The model is a frozen value: ``observe_*`` returns a new model, so the loops (and the simulator)
fold measurements in and replay them exactly. A warm-up sweep at deploy time seeds it with a few
small batch sizes (:func:`warmup_batch_sizes`). :meth:`LatencyModel.to_json` and
:meth:`LatencyModel.from_json` carry the measured times across restarts (without their times,
which belong to one process's clock: restored evidence counts as old).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ember.policies._frozen import evolve
from ember.policies.tiers import Tier

__all__ = ["Bandwidths", "LatencyModel", "remaining_load_s", "warmup_batch_sizes", "windowed_quantile"]

#: Buckets 0..MAX_BUCKET cover batch sizes up to 2**MAX_BUCKET rows.
MAX_BUCKET = 16


def bucket_of(rows: int) -> int:
    """The power-of-two bucket of a batch of ``rows`` (1 -> 0, 2 -> 1, 3..4 -> 2, 5..8 -> 3, ...)."""
    return min(max(rows, 1) - 1, 1 << MAX_BUCKET).bit_length()


def windowed_quantile(samples: tuple[float, ...], quantile: float) -> float:
    """The nearest-rank ``quantile`` of ``samples`` (which must not be empty)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(quantile * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def warmup_batch_sizes(max_batch_size: int, count: int = 4) -> tuple[int, ...]:
    """The batch sizes a deploy-time warm-up measures: 1, 2, 4, ... (``count`` of them, capped)."""
    sizes: list[int] = []
    size = 1
    while len(sizes) < count and size <= max_batch_size:
        sizes.append(size)
        size *= 2
    if max_batch_size not in sizes and len(sizes) < count:
        sizes.append(max_batch_size)
    return tuple(sizes)


@dataclass(frozen=True)
class Bandwidths:
    """Measured link speeds, in bytes per second, and the fixed cost of building a model on a worker.

    The defaults are conservative figures for a CPU host (local SSD, memory copy); a GPU host and the
    simulator pass measured ones (``calibration/h200.json``: 55 GB/s pinned host->device, 2.2 GB/s
    cold disk).
    """

    #: Cool -> warm: local disk (or page cache) into host memory.
    disk_bytes_per_s: float = 1.0e9
    #: Warm -> hot: host memory onto the device.
    host_to_device_bytes_per_s: float = 5.0e9
    #: Building the model around its weights, per load.
    setup_s: float = 0.05
    #: Node to node, for a cluster whose nodes each keep a store (10 Gb/s Ethernet).
    network_bytes_per_s: float = 1.25e9

    def load_s(self, num_bytes: int, tier: Tier) -> float:
        """Seconds to bring a model of ``num_bytes`` from ``tier`` to hot (0 when already hot)."""
        if tier is Tier.HOT:
            return 0.0
        seconds = self.setup_s + num_bytes / self.host_to_device_bytes_per_s
        if tier is not Tier.WARM:  # cool (and cold, whose import is not counted here)
            seconds += num_bytes / self.disk_bytes_per_s
        return seconds


def remaining_load_s(predicted_s: float, elapsed_s: float) -> float:
    """Seconds a load predicted to take ``predicted_s`` still needs after ``elapsed_s``.

    Within its prediction, the rest of it; past it, as long again as it has taken so far: an
    overrunning load says nothing about its end, and doubling the guess keeps the estimate ahead of
    it, so a request is refused while it still can be rather than held to the load's end.
    """
    return predicted_s - elapsed_s if elapsed_s < predicted_s else elapsed_s


class _Samples(NamedTuple):
    """The last ``window`` measurements and their quantile (a tuple: one is built per batch)."""

    values: tuple[float, ...] = ()
    estimate: float = 0.0
    #: When the newest sample was taken (-inf: unknown, e.g. restored from disk).
    at: float = -math.inf
    #: Requests refused on this bucket's evidence since its newest sample.
    refused: int = 0
    #: Whether any sample came from real requests (not only the deploy-time warm-up's synthetic ones).
    real: bool = False

    def add(self, seconds: float, window: int, quantile: float, at: float, real: bool) -> _Samples:
        values = self.values
        values = (*values[1:], seconds) if len(values) >= window else (*values, seconds)
        return _Samples(values, windowed_quantile(values, quantile), at, 0, self.real or real)


@dataclass(frozen=True)
class LatencyModel:
    """Per-bucket windowed quantiles of batch times, and per-tier quantiles of load times."""

    quantile: float = 0.9
    window: int = 32
    #: What a batch is predicted to take while nothing is measured.
    default_s: float = 0.0
    #: Bucket index -> its samples; a sorted tuple of pairs, so the value is hashable and ordered.
    batches: tuple[tuple[int, _Samples], ...] = ()
    loads: tuple[tuple[Tier, _Samples], ...] = ()
    #: Predicted seconds per bucket, monotone; rebuilt on every observation so ``predict`` is O(1).
    _table: tuple[float, ...] = ()
    #: Seconds per row between the two largest measured buckets (None: fewer than two measured).
    _slope_per_row: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], not {self.quantile}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, not {self.window}")

    @property
    def known(self) -> bool:
        """Whether any batch has been measured."""
        return bool(self.batches)

    def observe_batch(self, rows: int, seconds: float, at: float = -math.inf, *, warmup: bool = False) -> LatencyModel:
        """The model with one more measured batch of ``rows`` that took ``seconds``, finished at ``at``;
        ``warmup``: a batch of synthetic inputs, which refines predictions but never justifies a refusal."""
        if rows < 1 or not math.isfinite(seconds) or seconds < 0:
            return self
        bucket = (rows - 1).bit_length() if rows <= 1 << MAX_BUCKET else MAX_BUCKET + 1  # bucket_of, inlined
        batches = self.batches
        for index, (known, samples) in enumerate(batches):
            if known == bucket:
                added = samples.add(seconds, self.window, self.quantile, at, not warmup)
                batches = (*batches[:index], (bucket, added), *batches[index + 1 :])
                if added.estimate == samples.estimate:  # most batches: the predictions stay as they were
                    return evolve(self, batches=batches)
                break
        else:
            added = _Samples().add(seconds, self.window, self.quantile, at, not warmup)
            batches = tuple(sorted((*batches, (bucket, added))))
        return evolve(self, batches=batches, _table=_monotone_table(batches), _slope_per_row=_slope(batches))

    def observe_refusal(self, rows: int) -> LatencyModel:
        """The model after one request of ``rows`` was refused on its bucket's evidence."""
        bucket = bucket_of(rows)
        batches = self.batches
        for index, (known, samples) in enumerate(batches):
            if known == bucket:
                counted = samples._replace(refused=samples.refused + 1)
                return evolve(self, batches=(*batches[:index], (bucket, counted), *batches[index + 1 :]))
        return self

    def admission_s(self, rows: int) -> float:
        """The seconds a refusal of ``rows`` may count on: the lower of the prediction and the newest
        measurement of its bucket; 0 for a bucket no real request measured (a guess never refuses)."""
        samples = self._bucket(rows)
        if samples is None or not samples.real:
            return 0.0
        return min(self.predict(rows), samples.values[-1])

    def probe_due(self, rows: int, now: float, after_s: float, after_refusals: int) -> bool:
        """Whether the evidence on ``rows`` is due to be checked: no real request measured its bucket, its
        newest sample is at least ``after_s`` old, or ``after_refusals`` requests were refused on it since."""
        samples = self._bucket(rows)
        return samples is None or not samples.real or samples.refused >= after_refusals or now - samples.at >= after_s

    def newest(self, rows: int) -> tuple[float, float] | None:
        """The newest measurement of ``rows``'s bucket, as ``(seconds, at)``; None if never measured."""
        samples = self._bucket(rows)
        return None if samples is None else (samples.values[-1], samples.at)

    def _bucket(self, rows: int) -> _Samples | None:
        bucket = bucket_of(rows)
        for known, samples in self.batches:
            if known == bucket:
                return samples
        return None

    def observe_load(self, tier: Tier, seconds: float) -> LatencyModel:
        """The model with one more measured load from ``tier`` to hot that took ``seconds``."""
        if tier is Tier.HOT or not math.isfinite(seconds) or seconds < 0:
            return self
        current = dict(self.loads)
        current[tier] = current.get(tier, _Samples()).add(seconds, self.window, self.quantile, -math.inf, True)
        return evolve(self, loads=tuple(sorted(current.items())))

    def predict(self, rows: int) -> float:
        """Predicted seconds for a batch of ``rows`` (``default_s`` while nothing is measured)."""
        table = self._table
        if not table:
            return self.default_s
        bucket = (rows - 1).bit_length() if rows > 1 else 0  # bucket_of, inlined: called per request
        if bucket < len(table):
            return table[bucket]
        # Past every measurement: extend the line through the two largest measured buckets (never
        # falling), or scale the only one linearly by rows (pessimistic on GPUs, corrected by traffic).
        largest = len(table) - 1
        top = 1 << largest
        if self._slope_per_row is None:
            return table[largest] * rows / top
        return table[largest] + self._slope_per_row * (rows - top)

    def predict_load(self, tier: Tier, num_bytes: int, bandwidths: Bandwidths) -> float:
        """Predicted seconds to bring the model from ``tier`` to hot."""
        if tier is Tier.HOT:
            return 0.0
        for known_tier, samples in self.loads:
            if known_tier is tier:
                return samples.estimate
        return bandwidths.load_s(num_bytes, tier)

    def to_json(self) -> dict[str, Any]:
        """The measured batch and load times (oldest first), for :meth:`from_json`."""
        return {
            "batches": {str(bucket): list(samples.values) for bucket, samples in self.batches},
            "loads": {tier.value: list(samples.values) for tier, samples in self.loads},
        }

    def from_json(self, data: Mapping[str, Any]) -> LatencyModel:
        """This model (its settings) with the measurements of :meth:`to_json` folded in, as old evidence.

        Anything malformed is skipped: a prediction is a hint, and a damaged one must not stop a start.
        """
        model = self
        batches = data.get("batches")
        if isinstance(batches, Mapping):
            for bucket, values in batches.items():
                if not str(bucket).isdigit() or not isinstance(values, list):
                    continue
                rows = 1 << int(bucket) if int(bucket) <= MAX_BUCKET else (1 << MAX_BUCKET) + 1
                for seconds in values:
                    if isinstance(seconds, int | float):
                        model = model.observe_batch(rows, float(seconds))
        loads = data.get("loads")
        if isinstance(loads, Mapping):
            for name, values in loads.items():
                if name not in {t.value for t in Tier} or not isinstance(values, list):
                    continue
                for seconds in values:
                    if isinstance(seconds, int | float):
                        model = model.observe_load(Tier(name), float(seconds))
        return model


def _slope(batches: tuple[tuple[int, _Samples], ...]) -> float | None:
    if len(batches) < 2:
        return None
    (low, low_samples), (high, high_samples) = batches[-2:]
    rise = high_samples.estimate - low_samples.estimate
    return max(0.0, rise / ((1 << high) - (1 << low)))


def _monotone_table(batches: tuple[tuple[int, _Samples], ...]) -> tuple[float, ...]:
    """Prediction per bucket up to the largest measured one: non-decreasing, gaps filled upwards."""
    measured = dict(batches)
    largest = max(measured)
    table: list[float] = []
    floor = 0.0
    for bucket in range(largest + 1):
        if bucket in measured:
            value = measured[bucket].estimate
        else:
            value = min(measured[b].estimate for b in measured if b > bucket)
        floor = max(floor, value)
        table.append(floor)
    return tuple(table)
