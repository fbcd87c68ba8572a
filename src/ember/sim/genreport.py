"""The generative figures of a run: TTFT and TPOT attainment, goodput, their percentiles, tokens and cost.

Attainment counts every generative request that arrived, refused ones as missed, as the one-shot
SLO attainment does. Goodput is the requests per second of simulated time that met both objectives
(DistServe's definition). TPOT percentiles are over requests of more than one output token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.table import Table

from ember.sim.state import RunResult

__all__ = ["GenerativeFigures", "generative_figures", "generative_table"]


@dataclass(frozen=True)
class GenerativeFigures:
    #: Generative requests that arrived: served, and refused at arrival (too long: of those).
    requests: int
    refused: int
    refused_too_long: int
    ttft_attainment: float
    tpot_attainment: float
    #: Requests per second meeting both objectives, and their share of all requests.
    goodput_per_s: float
    both_attainment: float
    #: Percentiles in milliseconds; None when no request was served (or none had a second token).
    p50_ttft_ms: float | None
    p99_ttft_ms: float | None
    p50_tpot_ms: float | None
    p99_tpot_ms: float | None
    prompt_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    steps: int
    preemptions: int
    #: The run's whole bill per million output tokens served.
    usd_per_million_output_tokens: float | None


def generative_figures(result: RunResult, usd: float) -> GenerativeFigures | None:
    g = result.generative
    if g is None:
        return None
    total = g.requests + g.refused
    ttft = _percentiles(g.ttft_s)
    tpot = _percentiles(g.tpot_s)
    duration = result.duration_s
    return GenerativeFigures(
        requests=total,
        refused=g.refused,
        refused_too_long=g.too_long,
        ttft_attainment=g.ttft_met / total if total else 1.0,
        tpot_attainment=g.tpot_met / total if total else 1.0,
        goodput_per_s=g.both_met / duration,
        both_attainment=g.both_met / total if total else 1.0,
        p50_ttft_ms=ttft[0],
        p99_ttft_ms=ttft[1],
        p50_tpot_ms=tpot[0],
        p99_tpot_ms=tpot[1],
        prompt_tokens=g.prompt_tokens,
        output_tokens=g.output_tokens,
        output_tokens_per_s=g.output_tokens / duration,
        steps=g.steps,
        preemptions=g.preemptions,
        usd_per_million_output_tokens=usd / g.output_tokens * 1e6 if g.output_tokens else None,
    )


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return float(p50) * 1000, float(p99) * 1000


def generative_table(scenario: str, rows: list[tuple[str, GenerativeFigures, float, float]]) -> Table:
    """One row per policy set: ``(name, figures, GPU-seconds, dollars)``."""
    t = Table(title=f"ember sim: {scenario}, generative requests",
              caption="TTFT/TPOT ok: requests meeting each objective, refused ones counted as missed; goodput: "
              "requests/s meeting both; TPOT over requests of 2+ output tokens; $/M tok: the run's bill per "
              "million output tokens")  # fmt: skip
    t.add_column("policy set", no_wrap=True)
    for col in ("requests", "refused", "TTFT ok", "TPOT ok", "goodput/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms",
                "out tok/s", "preempt", "GPU-s", "$", "$/M tok"):  # fmt: skip
        t.add_column(col, justify="right")
    for name, f, gpu_s, usd in rows:
        t.add_row(
            name, f"{f.requests:,}", f"{f.refused:,}", f"{100 * f.ttft_attainment:.2f}%",
            f"{100 * f.tpot_attainment:.2f}%", f"{f.goodput_per_s:.3f}",
            f"{_ms(f.p50_ttft_ms)}/{_ms(f.p99_ttft_ms)}", f"{_ms(f.p50_tpot_ms)}/{_ms(f.p99_tpot_ms)}",
            f"{f.output_tokens_per_s:,.0f}", f"{f.preemptions:,}", f"{gpu_s:,.0f}", f"{usd:,.2f}",
            "-" if f.usd_per_million_output_tokens is None else f"{f.usd_per_million_output_tokens:,.2f}",
        )  # fmt: skip
    return t


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"
