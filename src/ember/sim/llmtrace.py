"""Generative workloads: arrivals with prompt and output token counts, from the Azure LLM trace.

The Azure LLM inference trace 2023 (Patel et al., "Splitwise: Efficient generative LLM inference
using phase splitting", ISCA 2024; the Azure/AzurePublicDataset repository, CC-BY) has one row per
request to a production LLM service: ``TIMESTAMP``, ``ContextTokens`` (prompt), ``GeneratedTokens``
(output). Two services, about an hour each, ship with Ember as ``azure_conv`` (conversation, 19,366
requests) and ``azure_code`` (coding, 8,819); ``traces/README.md`` carries the attribution.

:func:`llm_workload` spreads a trace's requests over a scenario's generative models (Zipf
popularity, even by default) with either the trace's own arrival times (gaps scaled by
``time_scale``) or Poisson arrivals at ``rate_per_s`` whose token counts are rows drawn from the
trace. A pure function of its inputs and the seed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from ember.errors import InvalidInput
from ember.sim.workload import Workload

__all__ = ["BUILTIN_TRACES", "LlmTrace", "LlmWorkloadSpec", "llm_workload", "read_llm_trace"]

BUILTIN_TRACES = {"azure_conv": "AzureLLMInferenceTrace_conv.csv", "azure_code": "AzureLLMInferenceTrace_code.csv"}


@dataclass(frozen=True)
class LlmTrace:
    """A trace's rows in time order: arrival seconds from the first row, prompt and output tokens."""

    times: list[float]
    prompts: list[int]
    outputs: list[int]


@dataclass(frozen=True)
class LlmWorkloadSpec:
    #: A built-in trace (``azure_conv``, ``azure_code``) or a CSV path with the same three columns.
    trace: str
    arrivals: Literal["trace", "poisson"] = "trace"
    #: Poisson arrivals: requests per second over all the generative models.
    rate_per_s: float | None = None
    #: Trace arrivals: each gap times this (0.5 replays the trace twice as fast).
    time_scale: float = 1.0
    #: Popularity across the generative models: weight of the k-th is 1 / k**zipf_s (0: even).
    zipf_s: float = 0.0

    def __post_init__(self) -> None:
        if self.arrivals == "poisson" and (self.rate_per_s is None or self.rate_per_s <= 0):
            raise InvalidInput("Poisson arrivals need rate_per_s > 0")
        if self.time_scale <= 0 or self.zipf_s < 0:
            raise InvalidInput("time_scale must be positive and zipf_s >= 0")


def read_llm_trace(source: str | Path) -> LlmTrace:
    """A built-in trace by name, or a CSV file with ``TIMESTAMP``, ``ContextTokens`` and ``GeneratedTokens``."""
    name = str(source)
    if name in BUILTIN_TRACES:
        text = resources.files("ember.sim").joinpath("traces", BUILTIN_TRACES[name]).read_text()
    else:
        try:
            text = Path(source).read_text()
        except OSError as e:
            known = ", ".join(BUILTIN_TRACES)
            raise InvalidInput(f"cannot read LLM trace {source} ({e.strerror}); built-in traces: {known}") from e
    rows = csv.DictReader(text.splitlines())
    missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(rows.fieldnames or ())
    if missing:
        raise InvalidInput(f"LLM trace {name} lacks the column(s) {sorted(missing)}; it has {rows.fieldnames}")
    stamps: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    for line, row in enumerate(rows, start=2):
        try:
            stamp = row["TIMESTAMP"].strip()
            stamps.append(
                float(stamp) if stamp.replace(".", "", 1).isdigit() else datetime.fromisoformat(stamp).timestamp()
            )
            prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
        except ValueError:
            raise InvalidInput(f"LLM trace {name}, line {line}: not a time and two token counts: {row}") from None
        if prompt < 1 or output < 1:
            raise InvalidInput(f"LLM trace {name}, line {line}: token counts must be >= 1, got {prompt}, {output}")
        prompts.append(prompt)
        outputs.append(output)
    if not stamps:
        raise InvalidInput(f"LLM trace {name} has no rows")
    order = sorted(range(len(stamps)), key=lambda i: stamps[i])
    start = stamps[order[0]]
    return LlmTrace([stamps[i] - start for i in order], [prompts[i] for i in order], [outputs[i] for i in order])


def llm_workload(spec: LlmWorkloadSpec, trace: LlmTrace, models: list[int], duration_s: float, seed: int) -> Workload:
    """Arrivals over ``duration_s`` for the scenario's generative models (their indices ``models``)."""
    if not models:
        raise InvalidInput("an LLM workload needs at least one generative model in the scenario")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(models) + 1, dtype=np.float64) ** spec.zipf_s
    owners = np.asarray(models, dtype=np.int64)[rng.permutation(len(models))]
    if spec.arrivals == "poisson":
        assert spec.rate_per_s is not None
        n = int(rng.poisson(spec.rate_per_s * duration_s))
        times = np.sort(rng.uniform(0.0, duration_s, size=n))
        rows = rng.integers(0, len(trace.times), size=n)
    else:
        scaled = np.asarray(trace.times, dtype=np.float64) * spec.time_scale
        n = int(np.searchsorted(scaled, duration_s, side="left"))
        times, rows = scaled[:n], np.arange(n)
    chosen = owners[rng.choice(len(models), size=len(times), p=weights / weights.sum())]
    prompts, outputs = np.asarray(trace.prompts), np.asarray(trace.outputs)
    return Workload(times.tolist(), chosen.tolist(), prompts[rows].tolist(), outputs=outputs[rows].tolist())
