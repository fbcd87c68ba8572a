"""The builders of every policy's input: pure functions from what a loop holds to a frozen snapshot.

The runner, the controller and the simulator engine each hold their world differently (queues of
pending futures, worker handles, slotted simulation objects), but they ask the policies the same
questions, so the derived parts of each snapshot are computed here, once:

- :func:`queue_snapshot`: the batching policy's view of a model's queue;
- :func:`start_delay_s`: how long before a batch of a model could start (the rest of a running load,
  a whole load, or until an instance frees);
- :func:`model_view`: the keep-alive policy's view of a model on one tier (no idle time while busy;
  the load time from the tier below hot);
- :func:`worker_view`: placement's view of a worker from what it hosts;
- :func:`scale_view`: the autoscaler's view of a model. A generative model's capacity is counted in
  output tokens: steps of up to ``max_num_seqs`` sequences within its TPOT objective, against the
  arrival rate times the tokens its answers have taken on average.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ember.config import Deployment
from ember.policies.autoscaler import ScaleView
from ember.policies.batching import QueueSnapshot
from ember.policies.keepalive import IdleHistogram, ModelView
from ember.policies.latency import Bandwidths, LatencyModel
from ember.policies.placement import WorkerView, kv_cache_bytes
from ember.policies.tiers import Tier
from ember.state.model import RunnerStatistics

__all__ = ["Hosted", "kv_bytes_of", "model_view", "queue_snapshot", "scale_view", "start_delay_s", "worker_view"]


def queue_snapshot(
    now: float,
    queued: tuple[tuple[float, int, float], ...],
    latency: LatencyModel,
    max_batch_size: int,
    *,
    instance_idle: bool = True,
    start_delay_s: float = 0.0,
    hard: tuple[bool, ...] = (),
    probes: tuple[bool, ...] = (),
) -> QueueSnapshot:
    """The batching policy's input: ``queued`` as (deadline, rows, arrival) in deadline order."""
    return QueueSnapshot(now, queued, instance_idle, max_batch_size, latency, start_delay_s, hard, probes)


def start_delay_s(
    now: float, *, load_s: float = 0.0, loading_until: float | None = None, busy_until: float | None = None
) -> float:
    """Predicted seconds before a batch asked for ``now`` could start, served alone.

    ``loading_until``: when the instance being loaded is expected up (the model has no ready one);
    else ``load_s``: the load still ahead of it (0 when an instance holds it). ``busy_until``: when the
    first of its instances frees, given only when every instance runs a batch. Never negative.
    """
    delay = load_s if loading_until is None else loading_until - now
    if busy_until is not None and busy_until - now > delay:
        delay = busy_until - now
    return delay if delay > 0.0 else 0.0


def model_view(
    name: str,
    tier: Tier,
    idle_s: float,
    busy: bool,
    *,
    keepalive_hot_s: float,
    keepalive_warm_s: float,
    histogram: IdleHistogram,
    latency: LatencyModel,
    model_bytes: int,
    bandwidths: Bandwidths,
    prewarmed: bool,
    slo_s: float = math.inf,
) -> ModelView:
    """The keep-alive policy's view of ``name`` on ``tier``, idle for ``idle_s`` unless ``busy``; its load
    time is predicted from the tier below hot (warm, when it is hot), and from cool when ``slo_s`` is given."""
    load_s = latency.predict_load(Tier.WARM if tier is Tier.HOT else tier, model_bytes, bandwidths)
    cool_s = latency.predict_load(Tier.COOL, model_bytes, bandwidths) if math.isfinite(slo_s) else math.inf
    idle = 0.0 if busy or idle_s < 0.0 else idle_s
    return ModelView(name, tier, idle, busy, keepalive_hot_s, keepalive_warm_s, histogram, load_s, prewarmed, slo_s,
                     cool_s)  # fmt: skip


@dataclass(frozen=True)
class Hosted:
    """A model loaded on a worker, as :func:`worker_view` counts it."""

    name: str
    bytes: int
    tenant: str
    slo_s: float
    #: Predicted seconds of its one-row batch.
    batch_s: float
    #: Its share of the worker's time (measured, plus what placement expects of it since).
    share: float = 0.0
    #: A generative model's KV-cache budget there, beside its weights.
    kv_bytes: int = 0


def worker_view(
    id: str,
    device: str,
    hosted: Iterable[Hosted],
    *,
    ready: bool = True,
    in_flight: int = 0,
    capacity_bytes: int | None = None,
    warm_model: str | None = None,
    tenants_seen: Iterable[str] = (),
    cool_model: str | None = None,
) -> WorkerView:
    """Placement's view of a worker from the models it hosts; ``warm_model``: the model being placed, when
    its weights sit in this worker's host memory; ``cool_model``: when they sit on its node's disk only;
    ``tenants_seen``: tenants whose code ran there before."""
    models = tuple(hosted)
    return WorkerView(
        id=id,
        ready=ready,
        device=device,
        models=tuple(m.name for m in models),
        bytes_loaded=sum(m.bytes + m.kv_bytes for m in models),
        in_flight=in_flight,
        capacity_bytes=capacity_bytes,
        warm_models=() if warm_model is None else (warm_model,),
        cool_models=() if cool_model is None else (cool_model,),
        tenants=frozenset(m.tenant for m in models) | frozenset(tenants_seen),
        utilization=sum(m.share for m in models),
        shortest_slo_s=min((m.slo_s for m in models), default=math.inf),
        longest_batch_s=max((m.batch_s for m in models), default=0.0),
    )


def scale_view(deployment: Deployment, stats: RunnerStatistics, arrival_rate: float, current: int) -> ScaleView:
    """The autoscaler's view of a model with ``current`` instances, receiving ``arrival_rate`` requests
    per second; a generative model's in output tokens (see the module's doc)."""
    d = deployment
    slo_s, batch, rate = d.slo_ms / 1000.0, d.max_batch_size, arrival_rate
    generation = stats.generation
    if generation is not None:
        slo_s, batch = d.tpot_slo_ms / 1000.0, d.max_num_seqs
        rate = arrival_rate * max(1.0, generation.generation_tokens / max(1, stats.succeeded))
    return ScaleView(
        name=d.name,
        arrival_rate=rate,
        queued=stats.queued + stats.running,
        current=current,
        slo_s=slo_s,
        max_batch_size=batch,
        latency=stats.latency,
        min_instances=1,
        max_instances=d.max_instances,
    )


def kv_bytes_of(deployment: Deployment) -> int:
    """The KV-cache budget one instance of ``deployment`` holds on its device (0 for a one-shot model)."""
    generation = deployment.metadata.generation
    if generation is None or deployment.max_model_len is None:
        return 0
    return kv_cache_bytes(deployment.max_num_seqs, deployment.max_model_len, generation.kv_bytes_per_token)
