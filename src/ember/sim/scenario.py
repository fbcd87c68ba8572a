"""Scenarios: YAML files naming a cluster, its models, a workload, the policy sets to compare and a seed.

The file is untrusted input, so it is validated here, at the edge, with pydantic; errors name the
field and say what it should hold. What comes out is frozen dataclasses the engine trusts.
A minimal scenario::

    name: one-model
    seed: 1
    duration_s: 3600
    cluster: {nodes: 1, devices_per_node: 1}
    models:
      - {name: bert, profile: bert_base, slo_ms: 50}
    workload:
      synthetic: {total_rate_per_s: 5}
    policy_sets: [always_on, ember]
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ember.config import validation_message
from ember.errors import InvalidInput
from ember.sim.calibration import BUILTIN_CALIBRATIONS, LatencyCurve, load_calibration
from ember.sim.cluster import ClusterSpec, Distribution, ModelSpec, ServiceTime
from ember.sim.prices import DEFAULT_PRICES, GPU_HOUR_USD, HOST_MEMORY_GB_HOUR_USD, Prices
from ember.sim.workload import Pattern, SyntheticSpec, Workload, load_trace, synthetic

__all__ = ["BUILTIN_SCENARIOS", "Scenario", "load_scenario", "parse_scenario"]

BUILTIN_SCENARIOS = ("default", "faas_single", "large")
Positive = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DistributionIn(_Strict):
    kind: Distribution = Distribution.CONSTANT
    #: Mean in milliseconds (needed where there is no latency profile to scale).
    mean_ms: Positive | None = None
    sigma: float = Field(0.0, ge=0)
    samples_ms: list[Annotated[float, Field(ge=0)]] = []

    @model_validator(mode="after")
    def _samples(self) -> DistributionIn:
        if self.kind is Distribution.EMPIRICAL and not self.samples_ms:
            raise ValueError("an empirical distribution needs samples_ms")
        return self

    def build(self) -> ServiceTime:
        return ServiceTime(self.kind, self.sigma, tuple(s / 1000 for s in self.samples_ms))


class ModelIn(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    #: More than one: ``name-0000``, ``name-0001``, ...
    count: int = Field(1, ge=1, le=1_000_000)
    profile: str | None = None
    weights_gb: Positive | None = None
    slo_ms: Positive
    max_batch_size: int = Field(32, ge=1, le=4096)
    work_per_request: Positive = 1.0
    service: DistributionIn = Field(default_factory=lambda: DistributionIn.model_validate({}))
    cold_start: DistributionIn | None = None
    #: A cold request's whole service time (start-up, load and its run), instead of a load then ``service``.
    cold_service: DistributionIn | None = None

    @model_validator(mode="after")
    def _shape(self) -> ModelIn:
        if self.profile is None and (self.service.mean_ms is None and self.service.kind is not Distribution.EMPIRICAL):
            raise ValueError(f"model '{self.name}': give a latency profile, or service.mean_ms")
        if self.profile is None and self.weights_gb is None:
            raise ValueError(f"model '{self.name}': give weights_gb (there is no profile to take it from)")
        for field, cold in (("cold_start", self.cold_start), ("cold_service", self.cold_service)):
            if cold is not None and cold.mean_ms is None and cold.kind != "empirical":
                raise ValueError(f"model '{self.name}': {field} needs mean_ms")
        if self.cold_start is not None and self.cold_service is not None:
            raise ValueError(f"model '{self.name}': give cold_start (the load) or cold_service (the whole request)")
        return self


class ClusterIn(_Strict):
    nodes: int = Field(1, ge=1, le=100_000)
    devices_per_node: int = Field(8, ge=1, le=64)
    #: Default: the calibrated device's memory.
    device_memory_gb: Positive | None = None
    host_memory_gb: float = Field(2000.0, ge=0)


class SyntheticIn(_Strict):
    total_rate_per_s: Positive
    zipf_s: float = Field(1.2, ge=0, le=5)
    mix: dict[Pattern, Annotated[float, Field(ge=0)]] = {
        Pattern.POISSON: 0.4,
        Pattern.BURSTY: 0.3,
        Pattern.DIURNAL: 0.2,
        Pattern.TIMER: 0.1,
    }
    burst_on_s: Positive = 60.0
    burst_off_s: float = Field(1800.0, ge=0)
    diurnal_amplitude: float = Field(0.8, ge=0, le=1)
    diurnal_period_s: Positive = 86_400.0
    timer_periods_s: list[Positive] = Field([60.0, 300.0, 900.0, 3600.0], min_length=1)
    max_rows: int = Field(1, ge=1, le=4096)

    @model_validator(mode="after")
    def _mix(self) -> SyntheticIn:
        if sum(self.mix.values()) <= 0:
            raise ValueError("the pattern mix needs at least one positive fraction")
        return self


class TraceIn(_Strict):
    path: str
    time_column: str = "time_s"
    model_column: str | None = "model"
    size_column: str | None = None
    #: Send every row to this model (a single-model trace such as Azure's).
    model: str | None = None


class WorkloadIn(_Strict):
    synthetic: SyntheticIn | None = None
    trace: TraceIn | None = None

    @model_validator(mode="after")
    def _one(self) -> WorkloadIn:
        if (self.synthetic is None) == (self.trace is None):
            raise ValueError("give exactly one of workload.synthetic and workload.trace")
        return self


class PricesIn(_Strict):
    gpu_hour_usd: float = Field(GPU_HOUR_USD, ge=0)
    host_memory_gb_hour_usd: float = Field(HOST_MEMORY_GB_HOUR_USD, ge=0)
    #: Default: the host memory price.
    pinned_memory_gb_hour_usd: float | None = Field(None, ge=0)


class PolicySetIn(_Strict):
    name: Literal["always_on", "classic_faas", "ray_serve", "ember"]
    options: dict[str, Annotated[float, Field(ge=0)]] = {}


class ScenarioIn(_Strict):
    name: str = Field(min_length=1)
    seed: int = 0
    duration_s: Positive
    tick_s: Positive = 1.0
    warm_tick_s: Positive = 60.0
    calibration: str = "h200"
    #: Start with every model in each node's host memory (a platform that ran yesterday), where a set has a warm tier.
    start_warm: bool = False
    cluster: ClusterIn = Field(default_factory=lambda: ClusterIn.model_validate({}))
    models: list[ModelIn] = Field(min_length=1)
    workload: WorkloadIn
    prices: PricesIn = Field(default_factory=lambda: PricesIn.model_validate({}))
    policy_sets: list[PolicySetIn | Literal["always_on", "classic_faas", "ray_serve", "ember"]] = Field(min_length=1)


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    duration_s: float
    tick_s: float
    warm_tick_s: float
    start_warm: bool
    cluster: ClusterSpec
    models: tuple[ModelSpec, ...]
    policy_sets: tuple[tuple[str, dict[str, float]], ...]
    synthetic: SyntheticSpec | None
    trace: TraceIn | None
    folder: Path
    prices: Prices = DEFAULT_PRICES

    def workload(self) -> Workload:
        """The arrivals: generated from the seed, or read from the trace (cut at ``duration_s``)."""
        if self.synthetic is not None:
            return synthetic(self.synthetic, len(self.models), self.duration_s, self.seed)
        assert self.trace is not None
        t = self.trace
        path = Path(t.path) if Path(t.path).is_absolute() else self.folder / t.path
        names = [m.name for m in self.models]
        w = load_trace(path, names, time_column=t.time_column, model_column=t.model_column,
                       size_column=t.size_column, model=t.model)  # fmt: skip
        keep = sum(1 for x in w.times if x < self.duration_s)
        return Workload(w.times[:keep], w.models[:keep], w.sizes[:keep])


def load_scenario(source: str | Path) -> Scenario:
    """A scenario file by path, or a built-in one by name (``default``, ``faas_single``, ``large``)."""
    name = str(source)
    if name in BUILTIN_SCENARIOS:
        ref = resources.files("ember.sim").joinpath("scenarios", f"{name}.yaml")
        return parse_scenario(ref.read_text(), Path(str(ref)).parent, origin=name)
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as e:
        known = ", ".join(BUILTIN_SCENARIOS)
        raise InvalidInput(f"cannot read scenario {path} ({e.strerror}); built-in scenarios: {known}") from e
    return parse_scenario(text, path.resolve().parent, origin=str(path))


def parse_scenario(text: str, folder: Path, origin: str = "<scenario>") -> Scenario:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidInput(f"{origin} is not valid YAML: {e}") from e
    try:
        s = ScenarioIn.model_validate(raw)
    except ValidationError as e:
        raise InvalidInput(f"{origin}: {validation_message(e)}") from e
    cal = load_calibration(s.calibration if s.calibration in BUILTIN_CALIBRATIONS else folder / s.calibration)
    memory = int(s.cluster.device_memory_gb * 1e9) if s.cluster.device_memory_gb else cal.device_memory_bytes
    cluster = ClusterSpec(cal, s.cluster.nodes, s.cluster.devices_per_node, memory, int(s.cluster.host_memory_gb * 1e9))
    models: list[ModelSpec] = []
    for m in s.models:
        if m.profile is not None:
            curve = cal.profile(m.profile)
        else:
            mean_s = (m.service.mean_ms or 0.0) / 1000
            curve = LatencyCurve(m.name, (1,), (mean_s,), 0)
        weights = int(m.weights_gb * 1e9) if m.weights_gb else 2 * curve.params  # fp16
        cold, cold_mean = (m.cold_start.build(), (m.cold_start.mean_ms or 0) / 1000) if m.cold_start else (None, 0.0)
        whole, whole_mean = (
            (m.cold_service.build(), (m.cold_service.mean_ms or 0) / 1000) if m.cold_service else (None, 0.0)
        )
        names = [m.name] if m.count == 1 else [f"{m.name}-{i:04d}" for i in range(m.count)]
        for n in names:
            models.append(ModelSpec(n, curve, weights, m.slo_ms / 1000, m.max_batch_size, m.work_per_request,
                                    m.service.build(), cold, cold_mean, cold_service=whole,
                                    cold_service_mean_s=whole_mean, group=m.name))  # fmt: skip
    if len({m.name for m in models}) != len(models):
        raise InvalidInput(f"{origin}: model names must be unique")
    sets = tuple((p, {}) if isinstance(p, str) else (p.name, dict(p.options)) for p in s.policy_sets)
    if len({n for n, _ in sets}) != len(sets):
        raise InvalidInput(f"{origin}: each policy set may appear once")
    syn = None
    if s.workload.synthetic is not None:
        w = s.workload.synthetic
        syn = SyntheticSpec(
            w.total_rate_per_s, w.zipf_s, tuple(w.mix.items()), w.burst_on_s, w.burst_off_s, w.diurnal_amplitude,
            w.diurnal_period_s, tuple(w.timer_periods_s), w.max_rows,
        )  # fmt: skip
    return Scenario(
        s.name, s.seed, s.duration_s, s.tick_s, s.warm_tick_s, s.start_warm, cluster, tuple(models), sets, syn,
        s.workload.trace, folder,
        Prices(s.prices.gpu_hour_usd, s.prices.host_memory_gb_hour_usd, s.prices.pinned_memory_gb_hour_usd),
    )  # fmt: skip
