"""Reports: the figures of each policy set's run, as a table for people and JSON for programs."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from ember.sim.engine import RunResult
from ember.sim.genreport import GenerativeFigures, generative_figures
from ember.sim.prices import DEFAULT_PRICES, Bill, Prices, bill, share

__all__ = ["ClassReport", "PolicyReport", "class_table", "summarise", "table", "write_json", "write_sweep_json"]


@dataclass(frozen=True)
class ClassReport:
    """One model class's part of a policy set's bill: the devices' dollars split by its share of the
    weights on them (GPU-memory GB-seconds), with the loader's staging buffers; its own warm copies."""

    requests: int
    gpu_memory_gb_seconds: float
    host_memory_gb_seconds: float
    gpu_usd: float
    #: All its host memory, and the pinned part of it.
    host_memory_usd: float
    pinned_memory_usd: float
    usd: float
    usd_per_million_requests: float


@dataclass(frozen=True)
class PolicyReport:
    policy_set: str
    requests: int
    slo_attainment: float
    refused: int
    p50_ms: float
    p99_ms: float
    cold_start_fraction: float
    cold_starts_warm: int
    cold_starts_cool: int
    mean_instances: float
    gpu_seconds: float
    #: GPU-seconds over the always-on set's in the same run (None when always-on did not run).
    gpu_seconds_vs_always_on: float | None
    gpu_memory_gb_seconds: float
    models_per_gpu: float
    batches: int
    wall_s: float
    #: Warm copies in host memory, GB x seconds held.
    host_memory_gb_seconds: float
    #: Weights moved onto devices by loads, and the part read from disk (cool loads), GB.
    load_gb: float
    load_gb_from_disk: float
    #: The bill at the scenario's prices: devices held, host memory held, both, and per million requests.
    gpu_usd: float
    host_memory_usd: float
    usd: float
    usd_per_million_requests: float
    #: Pinned host memory (in the warm copies and the loader's staging buffers), GB x seconds, and its
    #: dollars (a part of ``host_memory_usd``).
    pinned_memory_gb_seconds: float = 0.0
    pinned_memory_usd: float = 0.0
    #: The bill per model class (a scenario's model entry).
    classes: dict[str, ClassReport] = field(default_factory=dict)
    #: Generative requests' figures (TTFT, TPOT, goodput); None when the scenario has no generative model.
    generative: GenerativeFigures | None = None


def summarise(
    result: RunResult, wall_s: float, always_on_gpu_s: float | None, prices: Prices = DEFAULT_PRICES
) -> PolicyReport:
    lat = np.asarray(result.latencies_s, dtype=np.float64)
    total = len(lat) + result.refused
    p50, p99 = (float(v) * 1000 for v in np.percentile(lat, [50, 99])) if len(lat) else (float("nan"),) * 2
    cold = sum(result.cold_starts.values())
    dollars = bill(result.gpu_seconds, result.pageable_memory_gb_seconds, prices, result.pinned_memory_gb_seconds)
    return PolicyReport(
        policy_set=result.policy_set,
        requests=total,
        slo_attainment=result.met_slo / total if total else 1.0,
        refused=result.refused,
        p50_ms=p50,
        p99_ms=p99,
        cold_start_fraction=cold / total if total else 0.0,
        cold_starts_warm=result.cold_starts.get("warm", 0),
        cold_starts_cool=result.cold_starts.get("cool", 0),
        mean_instances=result.instance_seconds / result.duration_s,
        gpu_seconds=result.gpu_seconds,
        gpu_seconds_vs_always_on=result.gpu_seconds / always_on_gpu_s if always_on_gpu_s else None,
        gpu_memory_gb_seconds=result.gpu_memory_byte_seconds / 1e9,
        models_per_gpu=result.instance_seconds / result.gpu_seconds if result.gpu_seconds else 0.0,
        batches=result.batches,
        wall_s=wall_s,
        host_memory_gb_seconds=result.host_memory_gb_seconds,
        load_gb=result.bytes_loaded / 1e9,
        load_gb_from_disk=result.bytes_loaded_from_disk / 1e9,
        gpu_usd=dollars.gpu_usd,
        host_memory_usd=dollars.host_memory_usd,
        usd=dollars.total_usd,
        usd_per_million_requests=dollars.total_usd / total * 1e6 if total else 0.0,
        pinned_memory_gb_seconds=result.pinned_memory_gb_seconds,
        pinned_memory_usd=dollars.pinned_memory_usd,
        classes=_classes(result, dollars, prices),
        generative=generative_figures(result, dollars.total_usd),
    )


def _classes(result: RunResult, whole: Bill, prices: Prices) -> dict[str, ClassReport]:
    on_devices = sum(c.gpu_memory_gb_seconds for c in result.classes.values())
    warm = result.host_memory_gb_seconds
    pinned_warm = (result.pinned_memory_gb_seconds - result.staging_gb_seconds) / warm if warm else 0.0
    out: dict[str, ClassReport] = {}
    for name, c in result.classes.items():
        fraction = c.gpu_memory_gb_seconds / on_devices if on_devices else 0.0
        pinned = c.host_memory_gb_seconds * pinned_warm + result.staging_gb_seconds * fraction
        part = share(whole, fraction, c.host_memory_gb_seconds * (1 - pinned_warm), pinned, prices)
        out[name] = ClassReport(
            c.requests, c.gpu_memory_gb_seconds, c.host_memory_gb_seconds, part.gpu_usd, part.host_memory_usd,
            part.pinned_memory_usd, part.total_usd, part.total_usd / c.requests * 1e6 if c.requests else 0.0,
        )  # fmt: skip
    return out


def table(scenario: str, reports: list[PolicyReport]) -> Table:
    t = Table(title=f"ember sim: {scenario}", caption="cold: requests that waited for a load from warm/cool; "
              "xAO: GPU-seconds over always-on's; inst: mean instances up; GB-s: weights on devices; "
              "host GB-s: warm copies in host memory; pinned GB-s: pinned host memory (warm copies, staging); "
              "load GB: weights moved by loads; $: devices held and host memory at the scenario's prices")  # fmt: skip
    t.add_column("policy set", no_wrap=True)
    columns = ("requests", "SLO met", "p50 ms", "p99 ms", "cold w/c", "inst", "GPU-s", "xAO", "GB-s", "models/GPU",
               "host GB-s", "pinned GB-s", "load GB", "$", "$/M req")  # fmt: skip
    for col in columns:
        t.add_column(col, justify="right")
    for r in reports:
        ratio = "-" if r.gpu_seconds_vs_always_on is None else f"{r.gpu_seconds_vs_always_on:.3f}"
        t.add_row(
            r.policy_set, f"{r.requests:,}", f"{100 * r.slo_attainment:.3f}%", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}",
            f"{r.cold_starts_warm:,}/{r.cold_starts_cool:,}", f"{r.mean_instances:.1f}", f"{r.gpu_seconds:,.0f}",
            ratio, f"{r.gpu_memory_gb_seconds:,.0f}", f"{r.models_per_gpu:.1f}", f"{r.host_memory_gb_seconds:,.0f}",
            f"{r.pinned_memory_gb_seconds:,.0f}", f"{r.load_gb:,.1f}", f"{r.usd:,.2f}",
            f"{r.usd_per_million_requests:,.2f}",
        )  # fmt: skip
    return t


def class_table(scenario: str, reports: list[PolicyReport]) -> Table:
    """Each set's bill per model class: devices split by the class's share of the weights on them."""
    t = Table(title=f"ember sim: {scenario}, dollars per model class", caption="GPU $: devices held, split by "
              "each class's GPU-memory GB-seconds; host $: its warm copies (and its share of staging), pinned "
              "part apart")  # fmt: skip
    t.add_column("policy set", no_wrap=True)
    t.add_column("class", no_wrap=True)
    for col in ("requests", "GB-s", "host GB-s", "GPU $", "host $", "pinned $", "$", "$/M req"):
        t.add_column(col, justify="right")
    for r in reports:
        for name, c in r.classes.items():
            t.add_row(
                r.policy_set, name, f"{c.requests:,}", f"{c.gpu_memory_gb_seconds:,.0f}",
                f"{c.host_memory_gb_seconds:,.0f}",
                f"{c.gpu_usd:,.2f}", f"{c.host_memory_usd:,.2f}", f"{c.pinned_memory_usd:,.2f}", f"{c.usd:,.2f}",
                f"{c.usd_per_million_requests:,.2f}",
            )  # fmt: skip
    return t


def write_json(path: Path, scenario: str, seed: int, reports: list[PolicyReport]) -> None:
    body = {"scenario": scenario, "seed": seed, "policy_sets": _entries(reports)}
    path.write_text(json.dumps(body, indent=2, allow_nan=False) + "\n")


def write_sweep_json(path: Path, scenario: str, seed: int, reports: dict[float, list[PolicyReport]]) -> None:
    """A load sweep's figures: ``rates`` maps each total rate (requests per second) to its policy sets."""
    rates = [{"total_rate_per_s": rate, "policy_sets": _entries(rows)} for rate, rows in reports.items()]
    body = {"scenario": scenario, "seed": seed, "rates": rates}
    path.write_text(json.dumps(body, indent=2, allow_nan=False) + "\n")


def _entries(reports: list[PolicyReport]) -> dict[str, dict[str, object]]:
    entries = {r.policy_set: asdict(r) for r in reports}
    for entry in entries.values():
        for key, value in entry.items():
            if isinstance(value, float) and not math.isfinite(value):
                entry[key] = None  # no latency without a served request; JSON has no NaN
    return entries
