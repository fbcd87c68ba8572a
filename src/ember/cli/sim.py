"""``ember sim SCENARIO``: replay a scenario's workload against each of its policy sets in virtual time.

    ember sim default                      the built-in multi-model scenario (a day, 8 H200s)
    ember sim faas_single                  one Poisson model under classic FaaS (the known answer)
    ember sim my.yaml --json out.json      a scenario file; the figures also as JSON
    ember sim default --only ember --duration-s 3600
    ember sim default --plots plots/       also PNGs: latency CDF, cost vs attainment, tier occupancy
    ember sim default --sweep-rate 6,60,600 --plots plots/
                                           every set at each total rate; plots/cost_sweep.png

Prints one row per policy set: requests, SLO attainment, p50/p99 latency, cold starts by tier,
mean instances, GPU-seconds (and their ratio to always-on), GPU-memory GB-seconds, models per GPU.
Errors print ``error: <what to do>`` and exit 1, as the rest of the CLI does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text

from ember.cli.common import print_table
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.sim.scenario import Scenario

__all__ = ["sim"]

_console = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)


def sim(
    scenario: Annotated[
        str, typer.Argument(help="A scenario YAML file, or a built-in one: default, faas_single, large, llm.")
    ],
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only this policy set (repeatable).")] = None,
    duration_s: Annotated[float | None, typer.Option("--duration-s", help="Override the scenario's duration.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override the scenario's seed.")] = None,
    plots_dir: Annotated[
        Path | None,
        typer.Option("--plots", help="Also write PNG plots into this folder (needs the 'plots' extra)."),
    ] = None,
    sweep_rate: Annotated[
        str | None,
        typer.Option("--sweep-rate", help="Run every set at these total rates (6,60,600) and plot $/M requests."),
    ] = None,
) -> None:
    """Replay a workload against always-on, classic FaaS, Ray-Serve-like and Ember policies in virtual time."""
    from ember.sim.genreport import generative_table
    from ember.sim.plots import RunSeries, prepare_plots_dir, series_of, write_plots
    from ember.sim.report import class_table, table, write_json
    from ember.sim.runner import run_scenario
    from ember.sim.scenario import load_scenario

    series: list[RunSeries] = []
    try:
        if plots_dir is not None:
            prepare_plots_dir(plots_dir)  # before minutes of simulation, not after
        loaded = load_scenario(scenario)
        if duration_s is not None:
            if duration_s <= 0:
                raise typer.BadParameter("--duration-s must be positive")
            loaded = dataclasses.replace(loaded, duration_s=duration_s)
        if seed is not None:
            loaded = dataclasses.replace(loaded, seed=seed)
        names = {n for n, _ in loaded.policy_sets}
        missing = sorted(set(only or ()) - names)
        if missing:
            raise EmberError(f"policy set '{missing[0]}' is not in the scenario; it has: {', '.join(sorted(names))}")
        if sweep_rate is not None:
            _sweep(loaded, sweep_rate, tuple(only or ()), json_path, plots_dir or Path("."))
            return
        with _console.status("simulating") as status:
            reports = run_scenario(
                loaded, tuple(only or ()), progress=lambda n: status.update(f"simulating {n}"),
                on_result=None if plots_dir is None else lambda r: series.append(series_of(r)),
            )  # fmt: skip
    except EmberError as exc:
        _err.print(Text(f"error: {exc.message}", style="red"))
        raise typer.Exit(1) from None
    print_table(table(loaded.name, reports), _console)
    print_table(class_table(loaded.name, reports), _console)
    generative = [(r.policy_set, r.generative, r.gpu_seconds, r.usd) for r in reports if r.generative is not None]
    if generative:
        print_table(generative_table(loaded.name, generative), _console)
    total_wall = sum(r.wall_s for r in reports)
    simulated = sum(r.requests for r in reports)
    _console.print(
        f"seed {loaded.seed}, {loaded.duration_s:,.0f} s simulated; {simulated:,} requests in {total_wall:.1f} s"
        f" ({simulated / max(total_wall, 1e-9) * 60:,.0f} requests per minute)",
        highlight=False,
    )
    if json_path is not None:
        write_json(json_path, loaded.name, loaded.seed, reports)
        _console.print(f"wrote {json_path}", highlight=False)
    if plots_dir is not None:
        try:
            written = write_plots(plots_dir, loaded.name, reports, series, [m.slo_s * 1000 for m in loaded.models])
        except EmberError as exc:
            _err.print(Text(f"error: {exc.message}", style="red"))
            raise typer.Exit(1) from None
        _console.print(f"wrote {', '.join(p.name for p in written)} in {plots_dir}", highlight=False)


def _sweep(loaded: Scenario, rates_text: str, only: tuple[str, ...], json_path: Path | None, plots_dir: Path) -> None:
    """``--sweep-rate``: a table per rate, the sweep plot, and the figures as JSON when asked."""
    from ember.sim.plots import prepare_plots_dir, write_sweep_plot
    from ember.sim.report import table, write_sweep_json
    from ember.sim.sweep import parse_rates, sweep

    rates = parse_rates(rates_text)
    prepare_plots_dir(plots_dir)
    with _console.status("simulating") as status:
        reports = sweep(loaded, rates, only, progress=lambda n: status.update(f"simulating {n}"))
    for rate, rows in reports.items():
        print_table(table(f"{loaded.name} at {rate:g} requests/s", rows), _console)
    if json_path is not None:
        write_sweep_json(json_path, loaded.name, loaded.seed, reports)
        _console.print(f"wrote {json_path}", highlight=False)
    path = write_sweep_plot(plots_dir, loaded.name, reports)
    _console.print(f"wrote {path}", highlight=False)
