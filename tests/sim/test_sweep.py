"""``ember sim --sweep-rate``: every set at each total rate, a plot of dollars against attainment."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from sim_cases import SMALL
from typer.testing import CliRunner

from ember.cli import app
from ember.errors import InvalidInput
from ember.sim.scenario import parse_scenario
from ember.sim.sweep import at_rate, parse_rates

HERE = Path(__file__).resolve().parent


def test_a_sweep_runs_every_set_at_each_rate_and_plots_them(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL)
    out, plots = tmp_path / "sweep.json", tmp_path / "plots"
    args = ["--sweep-rate", "2,20", "--duration-s", "120", "--json", str(out), "--plots", str(plots)]
    result = CliRunner().invoke(app, ["sim", str(scenario), *args])
    assert result.exit_code == 0, result.output
    assert "at 2 requests/s" in result.output and "at 20 requests/s" in result.output
    body = json.loads(out.read_text())
    assert [r["total_rate_per_s"] for r in body["rates"]] == [2.0, 20.0]
    low, high = (r["policy_sets"] for r in body["rates"])
    assert set(low) == set(high) == {"always_on", "classic_faas", "ray_serve", "ember"}
    assert high["always_on"]["requests"] > 5 * low["always_on"]["requests"]  # ten times the rate
    assert low["always_on"]["usd"] == high["always_on"]["usd"]  # it holds both devices either way
    assert (plots / "cost_sweep.png").stat().st_size > 10_000


def test_rates_must_be_positive_and_increasing() -> None:
    assert parse_rates("6,60,600") == (6.0, 60.0, 600.0)
    for bad in ("6,x", "60,6", "0,6", "6,6"):
        with pytest.raises(InvalidInput, match="--sweep-rate"):
            parse_rates(bad)


def test_at_rate_scales_the_synthetic_workload_only() -> None:
    scenario = parse_scenario(SMALL, HERE, origin="small")
    scaled = at_rate(scenario, 60.0)
    assert scaled.synthetic is not None and scaled.synthetic.total_rate_per_s == 60.0
    assert scaled.models == scenario.models and scaled.seed == scenario.seed
    with pytest.raises(InvalidInput, match="trace"):
        at_rate(dataclasses.replace(scenario, synthetic=None), 6.0)
