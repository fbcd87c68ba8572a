"""Trace and scenario builders: repeatable arrival times, and SimFaaS's one-function model as a scenario."""

from __future__ import annotations

import random

__all__ = ["SIMFAAS_COLD_S", "SIMFAAS_WARM_S", "poisson_arrivals", "simfaas_scenario"]

#: Mean warm and cold service times of SimFaaS's own example (AWS Lambda measurements), in seconds.
SIMFAAS_WARM_S, SIMFAAS_COLD_S = 2.016, 2.163

_SIMFAAS = """
name: simfaas
seed: {seed}
duration_s: {duration}
tick_s: 1
warm_tick_s: 60
cluster: {{nodes: 2, devices_per_node: 64, device_memory_gb: 0.9}}  # one instance per device, as SimFaaS runs them
models:
  - name: fn
    weights_gb: 0.5
    slo_ms: 60000
    max_batch_size: 1
    service: {{kind: exponential, mean_ms: {warm}}}
    cold_service: {{kind: exponential, mean_ms: {cold}}}
workload:
  synthetic: {{total_rate_per_s: {rate}, mix: {{poisson: 1}}}}
policy_sets:
  - {{name: classic_faas, options: {{keepalive_s: {keepalive}}}}}
"""


def simfaas_scenario(
    rate_per_s: float,
    duration_s: float,
    keepalive_s: float,
    seed: int,
    warm_s: float = SIMFAAS_WARM_S,
    cold_s: float = SIMFAAS_COLD_S,
) -> str:
    """The scenario text of SimFaaS's model: one function, Poisson arrivals, exponential warm and cold
    service (a cold request's whole service is one draw), a fixed idle timeout, room for 128 instances
    (a device holds one, as SimFaaS's servers run side by side)."""
    return _SIMFAAS.format(
        seed=seed, duration=duration_s, rate=rate_per_s, warm=warm_s * 1000, cold=cold_s * 1000, keepalive=keepalive_s
    )


def poisson_arrivals(rate_per_s: float, duration_s: float, seed: int = 0, start_s: float = 0.0) -> list[float]:
    """Arrival times of a Poisson process of ``rate_per_s`` over ``duration_s``, from a fixed seed."""
    if rate_per_s <= 0 or duration_s < 0:
        raise ValueError(f"need rate_per_s > 0 and duration_s >= 0, got {rate_per_s} and {duration_s}")
    rng = random.Random(seed)
    out: list[float] = []
    t = start_s
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= start_s + duration_s:
            return out
        out.append(t)
