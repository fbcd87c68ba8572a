"""Prometheus metrics, with Triton's names where one exists so existing dashboards carry over.

Triton's: ``nv_inference_request_success``, ``nv_inference_request_failure``, ``nv_inference_count``
(inferences, i.e. rows), ``nv_inference_exec_count`` (batches), ``nv_inference_queue_duration_us``,
``nv_inference_compute_infer_duration_us`` (cumulative microseconds), ``nv_inference_pending_request_count``.
Ember's own: cold starts by tier, load-duration histogram, tier per model, SLO attainment.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_TIERS = ("hot", "warm", "cool", "cold")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        r = self.registry
        self.success = Counter("nv_inference_request_success", "Successful requests", labels, registry=r)
        self.failure = Counter("nv_inference_request_failure", "Failed requests", [*labels, "reason"], registry=r)
        self.count = Counter("nv_inference_count", "Inferences performed (rows)", labels, registry=r)
        self.exec_count = Counter("nv_inference_exec_count", "Batches executed", labels, registry=r)
        self.queue_us = Counter("nv_inference_queue_duration_us", "Cumulative queue time (us)", labels, registry=r)
        self.compute_us = Counter(
            "nv_inference_compute_infer_duration_us", "Cumulative compute time (us)", labels, registry=r
        )
        self.pending = Gauge("nv_inference_pending_request_count", "Requests queued or running", labels, registry=r)
        self.cold_starts = Counter(
            "ember_cold_starts",
            "Promotions to hot caused by demand, by the tier they started from",
            ["model", "tier"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "ember_load_duration_seconds",
            "Time to bring a model to hot, by starting tier",
            ["tier"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.tier = Gauge("ember_model_tier", "1 for the tier each model is in now", ["model", "tier"], registry=r)
        self.slo_met = Counter("ember_slo_met", "Requests answered within their SLO", ["model"], registry=r)
        self.slo_total = Counter("ember_slo_requests", "Requests counted for SLO attainment", ["model"], registry=r)
        self.latency = Histogram(
            "ember_request_duration_seconds",
            "Admission to answer",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )

    def set_tier(self, model: str, tier: str) -> None:
        for t in _TIERS:
            self.tier.labels(model, t).set(1.0 if t == tier else 0.0)

    def forget(self, model: str, version: str) -> None:
        for t in _TIERS:
            self.tier.labels(model, t).set(0.0)
        self.pending.labels(model, version).set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
