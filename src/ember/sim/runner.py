"""Run a scenario: every policy set on the same workload, always-on first so the others can be priced against it."""

from __future__ import annotations

from collections.abc import Callable

from ember.clock import WallClock
from ember.sim.engine import Engine, RunResult
from ember.sim.policysets import build_policy_set
from ember.sim.report import PolicyReport, summarise
from ember.sim.scenario import Scenario
from ember.sim.workload import Workload

__all__ = ["run_policy_set", "run_scenario"]


def run_policy_set(
    scenario: Scenario, name: str, options: dict[str, float], workload: Workload, record_events: bool = False
) -> RunResult:
    engine = Engine(
        scenario.cluster, scenario.models, workload, build_policy_set(name, options),
        duration_s=scenario.duration_s, seed=scenario.seed, tick_s=scenario.tick_s,
        warm_tick_s=scenario.warm_tick_s, record_events=record_events, start_warm=scenario.start_warm,
    )  # fmt: skip
    return engine.run()


def run_scenario(
    scenario: Scenario,
    only: tuple[str, ...] = (),
    progress: Callable[[str], None] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[PolicyReport]:
    """One report per policy set of ``scenario`` (or of ``only``, in the scenario's order, always-on first).

    ``on_result``, if given, sees each set's full ``RunResult`` as it finishes (the plots use it).
    """
    clock = WallClock()
    workload = scenario.workload()
    sets = [(n, o) for n, o in scenario.policy_sets if not only or n in only]
    sets.sort(key=lambda s: s[0] != "always_on")
    reports: list[PolicyReport] = []
    always_on_gpu_s: float | None = None
    for name, options in sets:
        if progress is not None:
            progress(name)
        start = clock.now()
        result = run_policy_set(scenario, name, options, workload)
        if name == "always_on":
            always_on_gpu_s = result.gpu_seconds
        reports.append(summarise(result, clock.now() - start, always_on_gpu_s, scenario.prices))
        if on_result is not None:
            on_result(result)
    return reports
