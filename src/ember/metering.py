"""Cost accounting: what each model and tenant held, and for how long.

The definitions (``docs/design.md``, "Metering"), one per figure of :class:`Usage`:

- **device-seconds**: seconds x hot instances. A hot instance holds its device whether or not a
  batch runs on it, so this is the figure a per-second GPU bill charges.
- **device GB-seconds**: seconds x hot instances x the model's weight bytes / 1e9.
- **host GB-seconds**: seconds x the model's weight bytes / 1e9 while the warm tier holds them in
  host memory (whatever the device holds: a hot model keeps its warm copy).
- **requests**: requests counted by the model's runner (served, failed or refused).
- **always on**: what one hot instance kept for a whole window would have held (:func:`always_on`).

:func:`accrue` is the whole rule, pure. The simulator integrates the same quantities (its
instance-seconds and GB-seconds are these device-seconds and device GB-seconds summed over models;
docs/simulator.md), so a simulated and a real run compare.

:class:`Meter` applies it: it is told each model's :class:`Holding` whenever that may have changed
(``observe``), and charges the previous holding for the time in between, so the figures are exact
at every change and never depend on a sampling rate. Charges land in wall-clock buckets of
``bucket_s`` (an interval across a boundary is split at it) and wait in memory until ``drain``
hands them to the registry, which adds them up across restarts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ember.clock import Clock

__all__ = ["BUCKET_S", "Deployed", "Holding", "Meter", "Usage", "accrue", "always_on", "report"]

#: Width of the wall-clock buckets usage is kept in (``ember usage --since`` resolves to one).
BUCKET_S = 60.0

_GB = 1e9


@dataclass(frozen=True)
class Holding:
    """What a model holds now: hot instances, weight bytes per instance, and bytes in the warm tier."""

    instances: int = 0
    device_bytes: int = 0
    host_bytes: int = 0


@dataclass(frozen=True)
class Usage:
    device_seconds: float = 0.0
    device_gb_seconds: float = 0.0
    host_gb_seconds: float = 0.0
    requests: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.device_seconds + other.device_seconds,
            self.device_gb_seconds + other.device_gb_seconds,
            self.host_gb_seconds + other.host_gb_seconds,
            self.requests + other.requests,
        )

    def to_json(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def accrue(holding: Holding, seconds: float) -> Usage:
    """What ``holding`` costs over ``seconds``."""
    seconds = max(0.0, seconds)
    return Usage(
        device_seconds=holding.instances * seconds,
        device_gb_seconds=holding.instances * holding.device_bytes / _GB * seconds,
        host_gb_seconds=holding.host_bytes / _GB * seconds,
    )


def always_on(weight_bytes: int, seconds: float) -> Usage:
    """What one hot instance (and its warm copy) kept for ``seconds`` would have held."""
    return accrue(Holding(1, weight_bytes, weight_bytes), seconds)


#: (model, tenant, bucket start): the key usage is kept under.
Key = tuple[str, str, float]


@dataclass
class _Open:
    tenant: str
    holding: Holding
    since: float
    requests: int


class Meter:
    """Charges each model's holding for the time it was held; the service owns one.

    ``on_charge(model, tenant, usage)`` sees every charge as it is made (Prometheus counters).
    """

    def __init__(
        self,
        clock: Clock,
        bucket_s: float = BUCKET_S,
        on_charge: Callable[[str, str, Usage], None] | None = None,
    ) -> None:
        self._clock = clock
        self._bucket_s = bucket_s
        self._on_charge = on_charge
        self._open: dict[str, _Open] = {}
        self._pending: dict[Key, Usage] = {}

    def observe(self, model: str, tenant: str, holding: Holding, requests: int = 0) -> None:
        """``model`` holds ``holding`` from now on; ``requests``: its runner's running count of requests.

        The previous holding is charged up to now; so are the requests counted since the last call.
        """
        now = self._clock.now()
        current = self._open.get(model)
        if current is None:
            self._open[model] = _Open(tenant, holding, now, requests)
            return
        self._charge(model, current, now, requests)
        current.tenant, current.holding, current.since = tenant, holding, now
        current.requests = max(current.requests, requests)

    def forget(self, model: str) -> None:
        """Charge ``model`` up to now and stop metering it (it was removed)."""
        current = self._open.pop(model, None)
        if current is not None:
            self._charge(model, current, self._clock.now(), current.requests)

    def holding(self, model: str) -> Holding | None:
        current = self._open.get(model)
        return None if current is None else current.holding

    def drain(self) -> dict[Key, Usage]:
        """The charges made since the last drain, by (model, tenant, bucket start); they leave the meter."""
        pending, self._pending = self._pending, {}
        return pending

    def pending(self) -> dict[Key, Usage]:
        """The charges made since the last drain (a copy; they stay in the meter)."""
        return dict(self._pending)

    def restore(self, charges: dict[Key, Usage]) -> None:
        """Put drained charges back (their write failed), to leave with the next drain."""
        for key, usage in charges.items():
            self._add(key, usage)

    def _charge(self, model: str, current: _Open, now: float, requests: int) -> None:
        seconds = max(0.0, now - current.since)
        fresh = max(0, requests - current.requests)
        usage = accrue(current.holding, seconds) + Usage(requests=fresh)
        if usage == Usage():
            return
        if self._on_charge is not None:
            self._on_charge(model, current.tenant, usage)
        end = self._clock.wall()
        for bucket, inside in _split(end - seconds, end, self._bucket_s):
            self._add((model, current.tenant, bucket), accrue(current.holding, inside))
        if fresh:  # requests land whole in the bucket of now
            self._add((model, current.tenant, _floor(end, self._bucket_s)), Usage(requests=fresh))

    def _add(self, key: Key, usage: Usage) -> None:
        before = self._pending.get(key)
        self._pending[key] = usage if before is None else before + usage


def _floor(t: float, bucket_s: float) -> float:
    return math.floor(t / bucket_s) * bucket_s


def _split(start: float, end: float, bucket_s: float) -> list[tuple[float, float]]:
    """The buckets ``[start, end]`` touches, each with the seconds of the interval inside it."""
    parts: list[tuple[float, float]] = []
    bucket = _floor(start, bucket_s)
    while bucket < end:
        inside = min(end, bucket + bucket_s) - max(start, bucket)
        if inside > 0:
            parts.append((bucket, inside))
        bucket += bucket_s
    return parts


@dataclass(frozen=True)
class Deployed:
    """What :func:`report` needs of a model deployed now: its tenant, weight bytes, and when it was deployed
    (wall-clock seconds)."""

    tenant: str
    bytes: int
    since: float


def report(
    recorded: dict[tuple[str, str], Usage], deployed: dict[str, Deployed], start: float | None, end: float
) -> dict[str, object]:
    """The usage JSON of ``GET /admin/usage`` and ``ember usage``: per model (beside its always-on
    figure over the window, for models deployed now), per tenant, and the total.

    ``start``: the window's start (wall-clock seconds; None: since the beginning), ``end``: now.
    """
    models: list[dict[str, object]] = []
    tenants: dict[str, Usage] = {}
    total = Usage()
    for (model, tenant), usage in sorted(recorded.items()):
        row: dict[str, object] = {"model": model, "tenant": tenant, **usage.to_json(), "always_on": None}
        here = deployed.get(model)
        if here is not None and here.tenant == tenant:
            held_s = end - max(here.since, start if start is not None else here.since)
            row["always_on"] = always_on(here.bytes, held_s).to_json()
        models.append(row)
        tenants[tenant] = tenants.get(tenant, Usage()) + usage
        total = total + usage
    return {
        "since": start,
        "until": end,
        "bucket_s": BUCKET_S,
        "models": models,
        "tenants": [{"tenant": t, **u.to_json()} for t, u in sorted(tenants.items())],
        "total": total.to_json(),
    }
