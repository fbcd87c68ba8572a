"""The modeled cluster: nodes of devices with memory, the links between tiers, and the models it serves.

Everything here is a frozen description; the engine (``engine.py``) keeps the changing state.
A model's batch time is its latency curve at the batch's rows, times ``work_per_request`` (for
instance decode steps per request), times a draw from its :class:`ServiceTime` distribution.
Load times follow the tier the weights come from: warm (pinned host memory), cool (local disk,
through Ember's loader or through ``torch.load``), plus a runtime start when the policy set has no
pool of started workers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import StrEnum

from ember.errors import InvalidInput
from ember.sim.calibration import Calibration, LatencyCurve
from ember.sim.tokens import GenSpec

__all__ = ["ClusterSpec", "Distribution", "Loader", "ModelSpec", "ServiceTime"]


class Distribution(StrEnum):
    CONSTANT = "constant"
    EXPONENTIAL = "exponential"
    LOGNORMAL = "lognormal"
    EMPIRICAL = "empirical"


@dataclass(frozen=True)
class ServiceTime:
    """A random factor with mean 1 (or exact samples of seconds, for ``empirical``).

    ``constant``: always 1. ``exponential``: mean 1. ``lognormal``: mean 1 with shape ``sigma``.
    ``empirical``: one of ``samples`` (seconds, used as-is; the latency curve is then ignored).
    """

    kind: Distribution = Distribution.CONSTANT
    sigma: float = 0.0
    samples: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind is Distribution.EMPIRICAL and not self.samples:
            raise InvalidInput("an empirical service time needs at least one sample (seconds)")
        if any(s < 0 or not math.isfinite(s) for s in self.samples):
            raise InvalidInput("empirical service-time samples must be finite seconds >= 0")
        if self.sigma < 0:
            raise InvalidInput(f"lognormal sigma must be >= 0, got {self.sigma}")

    def draw(self, mean_s: float, rng: random.Random) -> float:
        kind = self.kind
        if kind is Distribution.CONSTANT:
            return mean_s
        if kind is Distribution.EXPONENTIAL:
            return rng.expovariate(1.0) * mean_s
        if kind is Distribution.LOGNORMAL:
            return mean_s * rng.lognormvariate(-0.5 * self.sigma * self.sigma, self.sigma)
        return self.samples[rng.randrange(len(self.samples))]


class Loader(StrEnum):
    #: Ember: a pool of started runtimes, parallel pinned reads, a warm tier in pinned host memory.
    EMBER = "ember"
    #: A plain function: start a process, import torch, ``torch.load`` from disk; no warm tier.
    PLAIN = "plain"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    curve: LatencyCurve
    weights_bytes: int
    slo_s: float
    max_batch_size: int = 32
    work_per_request: float = 1.0
    service: ServiceTime = field(default_factory=ServiceTime)
    #: When set, every load takes a draw of this (seconds, mean ``cold_start_mean_s``) instead of bytes/bandwidth.
    cold_start: ServiceTime | None = None
    cold_start_mean_s: float = 0.0
    #: Measured seconds to make the model hot from (warm, cool) with Ember's loader, used instead of
    #: bytes / bandwidth (a small model's load is mostly fixed costs); see ``ember.sim.measured``.
    measured_load_s: tuple[float, float] | None = None
    #: When set, a cold start takes a draw of this (seconds, mean ``cold_service_mean_s``) that is the
    #: whole service of the request that started the instance: start-up, load and its run (Lambda's
    #: and SimFaaS's cold service time). Sets that bind that request to its instance (a router) answer
    #: it at the end of the draw; under a shared queue the draw is the load, as ``cold_start``.
    cold_service: ServiceTime | None = None
    cold_service_mean_s: float = 0.0
    #: A generative model's KV-cache budget per instance (``policies.kv_cache_bytes``), held on the
    #: device beside its weights; never in the warm tier, never loaded (0: a one-shot model, or the
    #: budget ``generation`` implies).
    kv_bytes: int = 0
    #: A generative model: its objectives, limits and step model (``ember.sim.tokens``). Its ``curve``
    #: is then the time a batch of typical requests holds an instance (what the autoscaler and
    #: placement read), and ``slo_s`` a typical request's end-to-end objective.
    generation: GenSpec | None = None

    @property
    def device_bytes(self) -> int:
        """What an instance holds on its device: the weights, and a generative model's KV cache."""
        kv = self.kv_bytes
        if not kv and self.generation is not None:
            kv = self.generation.kv_budget_tokens * self.generation.step.kv_bytes_per_token
        return self.weights_bytes + kv

    #: The model class it is billed under (a scenario's model entry); empty: its own name.
    group: str = ""

    def __post_init__(self) -> None:
        if self.weights_bytes <= 0 or self.slo_s <= 0 or self.max_batch_size < 1 or self.work_per_request <= 0:
            raise InvalidInput(f"model '{self.name}': weights, SLO, max batch size and work must be positive")
        if self.kv_bytes < 0:
            raise InvalidInput(f"model '{self.name}': the KV-cache budget must be 0 or more bytes")
        if self.measured_load_s is not None and not all(s >= 0 and math.isfinite(s) for s in self.measured_load_s):
            raise InvalidInput(f"model '{self.name}': measured load times must be finite seconds >= 0")
        if self.cold_start is not None and self.cold_service is not None:
            raise InvalidInput(
                f"model '{self.name}': give cold_start (the load) or cold_service (the whole cold request), not both"
            )

    @property
    def model_class(self) -> str:
        return self.group or self.name

    def batch_s(self, rows: int, rng: random.Random) -> float:
        return self.service.draw(self.curve.batch_s(rows) * self.work_per_request, rng)


@dataclass(frozen=True)
class ClusterSpec:
    calibration: Calibration
    nodes: int
    devices_per_node: int
    device_memory_bytes: int
    host_memory_bytes: int

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices_per_node < 1:
            raise InvalidInput(f"a cluster needs >= 1 node and device, got {self.nodes} x {self.devices_per_node}")
        if self.device_memory_bytes <= 0 or self.host_memory_bytes < 0:
            raise InvalidInput("device memory must be positive and host memory >= 0")

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def load_s(self, model: ModelSpec, warm: bool, loader: Loader, rng: random.Random) -> float:
        """Seconds to make ``model`` hot on a device of a node where it is warm (or only on disk)."""
        start_s, copy_s = self.load_phases(model, warm, loader, rng)
        return start_s + copy_s

    def load_phases(self, model: ModelSpec, warm: bool, loader: Loader, rng: random.Random) -> tuple[float, float]:
        """A load's two phases, in seconds: the process start (CPU work, which overlaps other loads) and
        the copy of the weights onto the device (which shares the device's host link with its other loads).

        Only a plain function starts a process; Ember's loads come from a pool of started runtimes. A
        scenario's own ``cold_start`` or ``cold_service`` draw, or a measured load time, is one copy phase.
        """
        if model.cold_start is not None:
            return 0.0, model.cold_start.draw(model.cold_start_mean_s, rng)
        if model.cold_service is not None:
            return 0.0, model.cold_service.draw(model.cold_service_mean_s, rng)
        if model.measured_load_s is not None and loader is Loader.EMBER:
            return 0.0, model.measured_load_s[0 if warm else 1]
        cal = self.calibration
        if loader is Loader.PLAIN:
            return cal.runtime_start_s, model.weights_bytes / cal.torch_load_bytes_per_s
        if warm:
            return 0.0, model.weights_bytes / cal.h2d_pinned_bytes_per_s
        return 0.0, model.weights_bytes / cal.disk_to_device_bytes_per_s
