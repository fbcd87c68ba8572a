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
from ember.sim.calibration import BUILTIN_CALIBRATIONS, Calibration, LatencyCurve, load_calibration
from ember.sim.cluster import ClusterSpec, Distribution, ModelSpec, ServiceTime
from ember.sim.llmtrace import BUILTIN_TRACES, LlmWorkloadSpec, llm_workload, read_llm_trace
from ember.sim.prices import DEFAULT_PRICES, GPU_HOUR_USD, HOST_MEMORY_GB_HOUR_USD, Prices
from ember.sim.tokens import GenSpec, StepModel, derived_step_model, measured_step_model
from ember.sim.workload import Pattern, SyntheticSpec, Workload, load_trace, synthetic

__all__ = ["BUILTIN_SCENARIOS", "Scenario", "load_scenario", "parse_scenario"]

BUILTIN_SCENARIOS = ("default", "faas_single", "large", "llm")
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


class GenerativeIn(_Strict):
    """A generative model (``ember.sim.tokens``): objectives, limits, KV cache and, without a profile, its size."""

    ttft_slo_ms: Positive = 2000.0
    tpot_slo_ms: Positive = 200.0
    max_num_seqs: int = Field(64, ge=1, le=4096)
    #: Longest prompt + output; None: only the KV budget limits it.
    max_model_len: int | None = Field(None, ge=16, le=1 << 24)
    kv_bytes_per_token: int = Field(ge=1)
    #: The KV cache of one instance; default: max_num_seqs x max_model_len tokens (8,192 without one),
    #: within 90% of the device after the weights.
    kv_budget_gb: Positive | None = None
    step_tokens: int = Field(2048, ge=1, le=1 << 20)
    #: Without a profile: billions of parameters and per-step overhead of the roofline step model.
    params_b: Positive | None = None
    step_overhead_ms: float = Field(0.0, ge=0)
    #: A typical request, for what reads a request's time as one batch (autoscaler, placement).
    typical_prompt_tokens: int = Field(1024, ge=1)
    typical_output_tokens: int = Field(128, ge=1)


class ModelIn(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    #: More than one: ``name-0000``, ``name-0001``, ...
    count: int = Field(1, ge=1, le=1_000_000)
    profile: str | None = None
    weights_gb: Positive | None = None
    #: The request's objective; a generative model's are its ``generative`` TTFT and TPOT instead.
    slo_ms: Positive | None = None
    generative: GenerativeIn | None = None
    max_batch_size: int = Field(32, ge=1, le=4096)
    work_per_request: Positive = 1.0
    service: DistributionIn = Field(default_factory=lambda: DistributionIn.model_validate({}))
    cold_start: DistributionIn | None = None
    #: A cold request's whole service time (start-up, load and its run), instead of a load then ``service``.
    cold_service: DistributionIn | None = None

    @model_validator(mode="after")
    def _shape(self) -> ModelIn:
        if self.generative is not None:
            ignored = sorted(self.model_fields_set & {"slo_ms", "max_batch_size", "work_per_request", "service",
                                                      "cold_start", "cold_service"})  # fmt: skip
            if ignored:
                raise ValueError(
                    f"model '{self.name}': {', '.join(ignored)} do(es) not apply to a generative model; its "
                    "objectives and limits go in its generative section (ttft_slo_ms, tpot_slo_ms, max_num_seqs)"
                )
            if self.profile is None and (self.weights_gb is None or self.generative.params_b is None):
                raise ValueError(f"model '{self.name}': a generative model needs a profile, or weights_gb and params_b")
            return self
        if self.slo_ms is None:
            raise ValueError(f"model '{self.name}': give slo_ms (or make it generative)")
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


class LlmIn(_Strict):
    """Generative requests from an LLM trace (``ember.sim.llmtrace``), spread over the generative models."""

    trace: str = "azure_conv"
    arrivals: Literal["trace", "poisson"] = "trace"
    rate_per_s: Positive | None = None
    time_scale: Positive = 1.0
    zipf_s: float = Field(0.0, ge=0, le=5)

    @model_validator(mode="after")
    def _rate(self) -> LlmIn:
        if self.arrivals == "poisson" and self.rate_per_s is None:
            raise ValueError("Poisson arrivals need rate_per_s")
        return self


class WorkloadIn(_Strict):
    synthetic: SyntheticIn | None = None
    trace: TraceIn | None = None
    llm: LlmIn | None = None

    @model_validator(mode="after")
    def _one(self) -> WorkloadIn:
        if sum(w is not None for w in (self.synthetic, self.trace, self.llm)) != 1:
            raise ValueError("give exactly one of workload.synthetic, workload.trace and workload.llm")
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
    llm: LlmWorkloadSpec | None = None

    def workload(self) -> Workload:
        """The arrivals: generated from the seed, or read from the trace (cut at ``duration_s``)."""
        if self.llm is not None:
            source = self.llm.trace
            trace = read_llm_trace(source if source in BUILTIN_TRACES or Path(source).is_absolute()
                                   else self.folder / source)  # fmt: skip
            generative = [i for i, m in enumerate(self.models) if m.generation is not None]
            return llm_workload(self.llm, trace, generative, self.duration_s, self.seed)
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
        if m.generative is not None:
            models.extend(_generative(m, cal, memory))
            continue
        assert m.slo_ms is not None
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
    llm = None
    if s.workload.llm is not None:
        w2 = s.workload.llm
        llm = LlmWorkloadSpec(w2.trace, w2.arrivals, w2.rate_per_s, w2.time_scale, w2.zipf_s)
        if not any(m.generation is not None for m in models):
            raise InvalidInput(f"{origin}: workload.llm needs at least one model with a generative section")
    return Scenario(
        s.name, s.seed, s.duration_s, s.tick_s, s.warm_tick_s, s.start_warm, cluster, tuple(models), sets, syn,
        s.workload.trace, folder,
        Prices(s.prices.gpu_hour_usd, s.prices.host_memory_gb_hour_usd, s.prices.pinned_memory_gb_hour_usd), llm,
    )  # fmt: skip


#: The share of a device vLLM lets an instance use (``gpu_memory_utilization``'s default).
DEVICE_SHARE = 0.9


def _generative(m: ModelIn, cal: Calibration, memory: int) -> list[ModelSpec]:
    """The ModelSpecs of generative entry ``m``: its step model, KV budget, and a typical request's curve."""
    g = m.generative
    assert g is not None
    if m.profile is not None:
        params = cal.profile(f"{m.profile}_decode").params
        weights = int(m.weights_gb * 1e9) if m.weights_gb else 2 * params  # fp16
        step = measured_step_model(cal, m.profile, g.kv_bytes_per_token, weights)
    else:
        assert m.weights_gb is not None and g.params_b is not None
        params, weights = int(g.params_b * 1e9), int(m.weights_gb * 1e9)
        step = derived_step_model(params, weights, g.kv_bytes_per_token, g.step_overhead_ms / 1000)
    if g.kv_budget_gb is not None:
        kv_tokens = int(g.kv_budget_gb * 1e9) // g.kv_bytes_per_token
    else:
        room = max(0, int(DEVICE_SHARE * memory) - weights) // g.kv_bytes_per_token
        kv_tokens = min(g.max_num_seqs * (g.max_model_len or 8192), room)
    if kv_tokens < 1:
        raise InvalidInput(f"model '{m.name}': its weights leave no room for a KV cache on the device")
    spec = GenSpec(g.ttft_slo_ms / 1000, g.tpot_slo_ms / 1000, g.max_num_seqs, g.max_model_len or 1 << 62,
                   kv_tokens, step, g.step_tokens)  # fmt: skip
    prompt, output = g.typical_prompt_tokens, g.typical_output_tokens
    curve = _typical_curve(m.name, step, params, g.max_num_seqs, prompt, output)
    slo_s = spec.ttft_slo_s + spec.tpot_slo_s * (output - 1)
    names = [m.name] if m.count == 1 else [f"{m.name}-{i:04d}" for i in range(m.count)]
    return [ModelSpec(n, curve, weights, slo_s, g.max_num_seqs, generation=spec) for n in names]


def _typical_curve(name: str, step: StepModel, params: int, max_seqs: int, prompt: int, output: int) -> LatencyCurve:
    """Seconds a batch of ``b`` typical requests holds an instance: their prefill, then their decodes."""
    sizes = [1]
    while sizes[-1] < max_seqs:
        sizes.append(min(2 * sizes[-1], max_seqs))
    seconds = [step.prefill_s(b * prompt) + (output - 1) * step.decode_s(b, b * (prompt + output // 2)) for b in sizes]
    return LatencyCurve(f"{name}_request", tuple(sizes), tuple(seconds), params)
