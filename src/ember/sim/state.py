"""The engine's mutable state: one object per model, instance and device, and what a run returns.

Plain slotted classes, not frozen values: the loop in ``engine.py`` changes them at every event, and
they never reach a policy (the engine builds the policies' frozen snapshots from them).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ember.policies import (
    BatchDecision,
    Candidate,
    IdleHistogram,
    LatencyModel,
    ScaleState,
    WorkerView,
    warmup_batch_sizes,
)
from ember.policies.tiers import Tier
from ember.sim.cluster import ModelSpec
from ember.sim.tokens import GenStats

__all__ = [
    "COOL",
    "DONE",
    "EXPIRE",
    "HOT",
    "LOAD",
    "STAGING_BYTES",
    "TICK",
    "WAKE",
    "WARM",
    "ClassUsage",
    "Device",
    "Instance",
    "Model",
    "Request",
    "RunResult",
]

Request = tuple[float, int, float]  # (deadline, rows, arrival)
#: The kinds of event in the engine's heap.
LOAD, DONE, WAKE, TICK, EXPIRE = 0, 1, 2, 3, 4
HOT, WARM, COOL = Tier.HOT, Tier.WARM, Tier.COOL
#: Pinned host memory Ember's loader keeps per device's worker for staging reads: 8 buffers of 16 MiB
#: (``ember.store.loader.LoaderConfig``'s ``pinned_buffers`` and ``chunk_bytes``).
STAGING_BYTES = 8 * (16 << 20)


@dataclass
class ClassUsage:
    """What the models of one class (a scenario's model entry) were asked and held over a run."""

    requests: int
    #: Their weights on devices, and their warm copies in host memory, GB x seconds.
    gpu_memory_gb_seconds: float
    host_memory_gb_seconds: float


@dataclass
class RunResult:
    """What one run measured; ``report.py`` turns it into figures."""

    policy_set: str
    duration_s: float
    latencies_s: list[float]
    met_slo: int
    refused: int
    cold_starts: dict[str, int]
    gpu_seconds: float
    gpu_memory_byte_seconds: float
    instance_seconds: float
    num_devices: int
    batches: int
    #: Requests served past their SLO, per model.
    missed: dict[str, int] = field(default_factory=dict)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    #: At each control tick: (time, instances hot or loading, warm copies in host memory, devices held).
    occupancy: list[tuple[float, int, int, int]] = field(default_factory=list)
    #: Warm copies in host memory, integrated over time (``ember.metering.accrue``'s host GB-seconds).
    host_memory_gb_seconds: float = 0.0
    #: Weight bytes moved onto devices by loads, all of them and those read from disk (cool).
    bytes_loaded: int = 0
    bytes_loaded_from_disk: int = 0
    #: Host memory by kind, GB x seconds: pinned (warm copies in a pinned warm tier, and the loader's
    #: staging buffers: ``staging_gb_seconds``) and pageable (warm copies in a pageable one).
    pinned_memory_gb_seconds: float = 0.0
    pageable_memory_gb_seconds: float = 0.0
    staging_gb_seconds: float = 0.0
    #: Per model class, in the order the scenario names them.
    classes: dict[str, ClassUsage] = field(default_factory=dict)
    #: Generative requests' figures (TTFT, TPOT, tokens); None when the scenario has no generative model.
    generative: GenStats | None = None


class Model:
    __slots__ = ("arrivals", "candidate", "decided", "decision", "histogram", "idx", "instances", "last_used",
                 "latency", "max_batch", "name", "next_key", "prewarmed", "probing", "queue", "rate", "running",
                 "scale_state", "slo_s", "spec", "version", "wake_at")  # fmt: skip

    def __init__(self, idx: int, spec: ModelSpec, max_batch: int) -> None:
        self.idx, self.spec, self.name = idx, spec, spec.name
        self.slo_s, self.max_batch = spec.slo_s, max_batch
        latency = LatencyModel()
        for rows in warmup_batch_sizes(max_batch):  # the deploy-time warm-up sweep
            latency = latency.observe_batch(rows, spec.curve.batch_s(rows) * spec.work_per_request, warmup=True)
        self.latency = latency
        self.histogram = IdleHistogram()
        self.queue: deque[Request] = deque()
        #: Queued requests admitted as probes (``ember.policies.admission``): never refused by prediction.
        self.probing: set[Request] = set()
        self.running = 0
        self.instances: list[Instance] = []
        self.last_used = 0.0
        self.prewarmed = False
        self.scale_state = ScaleState()
        self.wake_at: float | None = None
        self.next_key = 0
        self.arrivals = 0
        self.rate = 0.0
        #: Bumped whenever the queue changes; the last batching decision, what it was asked about
        #: (queue version, latency model) and the device candidate built from it.
        self.version = 0
        self.decision = BatchDecision(0)
        self.decided: tuple[int, LatencyModel | None] = (-1, None)
        self.candidate: Candidate | None = None


class Instance:
    __slots__ = ("bound", "busy_s", "bytes", "check_at", "checked", "device", "key", "last_used", "load_s", "measured",
                 "model", "ready_at", "replaces", "retiring", "running", "share", "source", "started_at")  # fmt: skip

    def __init__(
        self, key: str, model: Model, device: Device, ready_at: float, load_s: float, source: Tier, started_at: float
    ) -> None:
        self.key, self.model, self.device = key, model, device
        self.ready_at, self.load_s, self.source, self.started_at = ready_at, load_s, source, started_at
        #: Under a router (FaaS): the request bound to this instance, from its arrival until answered.
        self.bound: Request | None = None
        #: What it holds on its device: weights and, for a generative model, its KV cache.
        self.bytes = model.spec.device_bytes
        self.last_used = ready_at
        self.running = False
        #: Device seconds its batches took since the last tick, and its share of the device (smoothed).
        self.busy_s = 0.0
        self.share = 0.0
        self.measured = False
        #: A move in progress: the instance this one replaces once ready, and whether this one is leaving.
        self.replaces: Instance | None = None
        self.retiring = False
        #: The keep-alive need not be asked about it before ``check_at`` while what it was asked
        #: about (``checked``: last use, histogram, pre-warmed, latency model, busy) stays the same.
        self.check_at = 0.0
        self.checked: tuple[Any, ...] = ()


class Device:
    __slots__ = ("busy", "capacity", "id", "idx", "instances", "load_free_at", "loading_bytes", "longest_batch_s",
                 "names", "node", "pending", "running_bytes", "shortest_slo_s", "used", "util", "view",
                 "waiting")  # fmt: skip

    def __init__(self, idx: int, node: int, capacity: int) -> None:
        self.idx, self.node, self.id, self.capacity = idx, node, f"n{node}/cuda:{idx}", capacity
        self.instances: dict[str, Instance] = {}
        self.pending: dict[int, Model] = {}
        #: Ready instances whose bound request waits for this device (under a router).
        self.waiting: list[Instance] = []
        self.used = self.loading_bytes = self.running_bytes = 0
        self.busy = False
        self.load_free_at = 0.0
        #: Its residents' shares: measured, plus the expected share of those placed since the last tick.
        self.util = 0.0
        self.view: WorkerView | None = None
        #: The names of its residents (one per instance), kept as they come and go, for the view; the
        #: shortest SLO and the longest one-row batch among them.
        self.names: tuple[str, ...] = ()
        self.shortest_slo_s, self.longest_batch_s = math.inf, 0.0
