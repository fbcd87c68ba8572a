"""A load sweep: every policy set of a scenario at several total request rates, on the same models.

``at_rate`` is the scenario with its synthetic workload scaled to another total rate (the same
popularity, mix and seed); ``sweep`` runs each rate as ``run_scenario`` does and returns the
reports per rate. ``ember sim SCENARIO --sweep-rate 6,60,600`` prints them and plots dollars per
million requests against attainment, one curve per set (``ember.sim.plots.write_sweep_plot``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from ember.errors import InvalidInput
from ember.sim.report import PolicyReport
from ember.sim.runner import run_scenario
from ember.sim.scenario import Scenario

__all__ = ["at_rate", "parse_rates", "sweep"]


def parse_rates(text: str) -> tuple[float, ...]:
    """``"6,60,600"`` as rates in requests per second: positive, distinct, in increasing order."""
    try:
        rates = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InvalidInput(f"--sweep-rate takes rates separated by commas, like 6,60,600; got {text!r}") from None
    if any(r <= 0 for r in rates) or list(rates) != sorted(set(rates)):
        raise InvalidInput(f"--sweep-rate needs positive rates in increasing order, each once; got {text!r}")
    return rates


def at_rate(scenario: Scenario, rate_per_s: float) -> Scenario:
    """``scenario`` with its synthetic workload at ``rate_per_s`` requests per second in all."""
    if scenario.synthetic is None:
        raise InvalidInput(f"scenario '{scenario.name}' replays a trace; a rate sweep needs a synthetic workload")
    return dataclasses.replace(scenario, synthetic=dataclasses.replace(scenario.synthetic, total_rate_per_s=rate_per_s))


def sweep(
    scenario: Scenario,
    rates: Sequence[float],
    only: tuple[str, ...] = (),
    progress: Callable[[str], None] | None = None,
) -> dict[float, list[PolicyReport]]:
    """The reports of every policy set (or of ``only``) at each of ``rates``, in the order given."""
    result: dict[float, list[PolicyReport]] = {}
    for rate in rates:
        step = None if progress is None else (lambda name, r=rate: progress(f"{name} at {r:g}/s"))
        result[rate] = run_scenario(at_rate(scenario, rate), only, progress=step)
    return result
