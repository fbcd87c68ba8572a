"""Prometheus metrics, with Triton's names where one exists so existing dashboards carry over.

Triton's: ``nv_inference_request_success``, ``nv_inference_request_failure``, ``nv_inference_count``
(inferences, i.e. rows), ``nv_inference_exec_count`` (batches), ``nv_inference_request_duration_us``,
``nv_inference_queue_duration_us``, ``nv_inference_compute_infer_duration_us`` (cumulative
microseconds), ``nv_inference_pending_request_count``. Ember's own: cold starts by tier, load-duration
histogram, tier per model, SLO attainment, and metered usage per model and tenant
(``ember_device_seconds_total``, ``ember_device_gb_seconds_total``, ``ember_host_gb_seconds_total``,
``ember_metered_requests_total``; ``ember.metering`` defines them; they count from the process's start,
the registry keeps the totals across restarts). A removed model's series are dropped (:meth:`Metrics.forget`).

Generative models also have vLLM's, labelled ``model_name`` as vLLM labels them, so dashboards built
for vLLM carry over: ``vllm:time_to_first_token_seconds``, ``vllm:time_per_output_token_seconds``
(one observation per output token after the first), ``vllm:e2e_request_latency_seconds``
(histograms), ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
``vllm:request_success_total`` (by ``finished_reason``) and the gauges ``vllm:num_requests_running``
and ``vllm:num_requests_waiting``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ember.metering import Usage

__all__ = ["Metrics"]

_TIERS = ("hot", "warm", "cool", "cold")


@dataclass
class _Child:
    value: float = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


@dataclass
class _TritonFamily:
    """A metric written exactly as Triton writes it: no ``_total`` suffix, no ``_created`` series.

    prometheus_client renames counters to ``NAME_total``, which would break dashboards built on
    Triton's names, so these few are rendered here.
    """

    name: str
    doc: str
    kind: str
    labelnames: tuple[str, ...]
    children: dict[tuple[str, ...], _Child] = field(default_factory=dict)

    def labels(self, *values: str) -> _Child:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        return self.children.setdefault(values, _Child())

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]
        for values, child in sorted(self.children.items()):
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(self.labelnames, values, strict=True))
            lines.append(f"{self.name}{{{labels}}} {_number(child.value)}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        r = self.registry
        counter, gauge = "counter", "gauge"
        self.success = _TritonFamily("nv_inference_request_success", "Successful requests", counter, labels)
        self.failure = _TritonFamily("nv_inference_request_failure", "Failed requests", counter, (*labels, "reason"))
        self.count = _TritonFamily("nv_inference_count", "Inferences performed (rows)", counter, labels)
        self.exec_count = _TritonFamily("nv_inference_exec_count", "Batches executed", counter, labels)
        self.request_us = _TritonFamily(
            "nv_inference_request_duration_us", "Cumulative request duration, arrival to answer (us)", counter, labels
        )
        self.queue_us = _TritonFamily("nv_inference_queue_duration_us", "Cumulative queue time (us)", counter, labels)
        self.compute_us = _TritonFamily(
            "nv_inference_compute_infer_duration_us", "Cumulative compute time (us)", counter, labels
        )
        self.pending = _TritonFamily("nv_inference_pending_request_count", "Requests queued or running", gauge, labels)
        self._triton = (
            self.success,
            self.failure,
            self.count,
            self.exec_count,
            self.request_us,
            self.queue_us,
            self.compute_us,
            self.pending,
        )
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
        self.slo_attainment = Gauge(
            "ember_slo_attainment", "Fraction of answered requests within their SLO", ["model"], registry=r
        )
        self.latency = Histogram(
            "ember_request_duration_seconds",
            "Admission to answer",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )

        model_name = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token: arrival to the first output token",
            model_name,
            buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40),
            registry=r,
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token after the first",
            model_name,
            buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10),
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Arrival to the last output token",
            model_name,
            buckets=(0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120),
            registry=r,
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", model_name, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Output tokens generated", model_name, registry=r)
        self.request_success = Counter(
            "vllm:request_success", "Generations that ran to their end", [*model_name, "finished_reason"], registry=r
        )
        self.running = Gauge("vllm:num_requests_running", "Sequences generating now", model_name, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a seat", model_name, registry=r)

        usage = ("model", "tenant")
        self.device_seconds = Counter(
            "ember_device_seconds", "Seconds x hot instances held (ember.metering)", usage, registry=r
        )
        self.device_gb_seconds = Counter(
            "ember_device_gb_seconds", "GB of weights on devices x seconds held", usage, registry=r
        )
        self.host_gb_seconds = Counter(
            "ember_host_gb_seconds", "GB of weights in the warm tier's host memory x seconds held", usage, registry=r
        )
        self.metered_requests = Counter("ember_metered_requests", "Requests metered", usage, registry=r)
        #: model -> the tenants it was charged under, to drop its usage series with it.
        self._charged: dict[str, set[str]] = {}

    def charge(self, model: str, tenant: str, usage: Usage) -> None:
        """Count a charge of ``ember.metering.Meter``."""
        self._charged.setdefault(model, set()).add(tenant)
        self.device_seconds.labels(model, tenant).inc(usage.device_seconds)
        self.device_gb_seconds.labels(model, tenant).inc(usage.device_gb_seconds)
        self.host_gb_seconds.labels(model, tenant).inc(usage.host_gb_seconds)
        self.metered_requests.labels(model, tenant).inc(usage.requests)

    def set_tier(self, model: str, tier: str) -> None:
        for t in _TIERS:
            self.tier.labels(model, t).set(1.0 if t == tier else 0.0)

    def forget(self, model: str) -> None:
        """Drop every series of ``model`` (all its versions): it was removed, and a dashboard should not
        show it as present with its last values for ever."""
        for family in self._triton:
            family.children = {values: c for values, c in family.children.items() if values[0] != model}
        generative = (self.ttft, self.tpot, self.e2e, self.prompt_tokens, self.generation_tokens)
        for metric in (self.slo_met, self.slo_total, self.slo_attainment, self.latency, *generative):
            with contextlib.suppress(KeyError):
                metric.remove(model)
        for gauge in (self.running, self.waiting):
            with contextlib.suppress(KeyError):
                gauge.remove(model)
        for reason in ("stop", "length"):
            with contextlib.suppress(KeyError):
                self.request_success.remove(model, reason)
        usage = (self.device_seconds, self.device_gb_seconds, self.host_gb_seconds, self.metered_requests)
        for tenant in self._charged.pop(model, ()):
            for counter in usage:
                with contextlib.suppress(KeyError):
                    counter.remove(model, tenant)
        for t in _TIERS:
            for metric in (self.tier, self.cold_starts):
                with contextlib.suppress(KeyError):
                    metric.remove(model, t)

    def render(self) -> bytes:
        return "".join(f.render() for f in self._triton).encode() + generate_latest(self.registry)
