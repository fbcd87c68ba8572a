"""Pure decisions over frozen snapshots: they do no I/O, read no clock and log nothing.

The loops that apply them live in ``scheduler/`` and ``controller/``; the simulator imports the same
functions, so each decision has one implementation. Stateful policies take their previous state
and return the next one (``LatencyModel.observe_*``, ``IdleHistogram.observe``, ``ScaleState``).

- ``latency``: per-model batch latency (windowed high quantile per batch-size bucket) and load time.
- ``batching``: SLO-aware earliest deadline first (``SloBatcher``), refusal of unmeetable requests.
- ``devices``: which model's batch a shared device runs next (Clockwork-like, swap-in counted).
- ``autoscaler``: instances per model from arrival rate, latency and SLO, with hysteresis.
- ``keepalive``: the hybrid idle-time histogram policy (ATC'20) with pre-warm; the fixed baseline.
- ``placement``: packing by device time and memory, warm weights first, and moves off overloaded
  devices; the baselines' packing by memory (``PackByMemory``) and the least-loaded spread.
- ``eviction``: expected reload cost x probability of reuse; the LRU baseline.
- ``tiers``: the temperature tiers (``Tier``) the other policies decide in.
"""

from ember.policies.autoscaler import Autoscaler, ScaleState, ScaleView, SloAutoscaler, instance_capacity
from ember.policies.batching import (
    Admission,
    BatchDecision,
    BatchPolicy,
    DeadlineBatcher,
    OnUnmeetable,
    QueueSnapshot,
    SloBatcher,
    admission,
    admits,
)
from ember.policies.devices import Candidate, DeviceScheduler, LatestStartFirst
from ember.policies.eviction import (
    Eviction,
    EvictionCandidate,
    ExpectedCostEviction,
    LruEviction,
    reuse_probability,
)
from ember.policies.keepalive import (
    Demotion,
    FixedKeepAlive,
    HybridHistogramKeepAlive,
    IdleHistogram,
    KeepAlive,
    KeepAliveWindows,
    ModelView,
    Prewarm,
)
from ember.policies.latency import Bandwidths, LatencyModel, remaining_load_s, warmup_batch_sizes, windowed_quantile
from ember.policies.placement import (
    DEFAULT_TENANT,
    LeastLoaded,
    MemoryAwarePlacement,
    Move,
    PackByMemory,
    Placement,
    PlacementRequest,
    Rebalancer,
    Resident,
    TenantIsolated,
    WorkerView,
    device_fits,
    device_share,
    kv_cache_bytes,
)
from ember.policies.tiers import Tier

__all__ = [
    "DEFAULT_TENANT",
    "Admission",
    "Autoscaler",
    "Bandwidths",
    "BatchDecision",
    "BatchPolicy",
    "Candidate",
    "DeadlineBatcher",
    "Demotion",
    "DeviceScheduler",
    "Eviction",
    "EvictionCandidate",
    "ExpectedCostEviction",
    "FixedKeepAlive",
    "HybridHistogramKeepAlive",
    "IdleHistogram",
    "KeepAlive",
    "KeepAliveWindows",
    "LatencyModel",
    "LatestStartFirst",
    "LeastLoaded",
    "LruEviction",
    "MemoryAwarePlacement",
    "ModelView",
    "Move",
    "OnUnmeetable",
    "PackByMemory",
    "Placement",
    "PlacementRequest",
    "Prewarm",
    "QueueSnapshot",
    "Rebalancer",
    "Resident",
    "ScaleState",
    "ScaleView",
    "SloAutoscaler",
    "SloBatcher",
    "TenantIsolated",
    "Tier",
    "WorkerView",
    "admission",
    "admits",
    "device_fits",
    "device_share",
    "instance_capacity",
    "kv_cache_bytes",
    "remaining_load_s",
    "reuse_probability",
    "warmup_batch_sizes",
    "windowed_quantile",
]
