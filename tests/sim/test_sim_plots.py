"""``ember.sim.plots`` and ``ember sim --plots``: three readable PNGs of one scenario's run."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from sim_cases import HERE, SMALL
from typer.testing import CliRunner

from ember.cli import app
from ember.errors import InvalidInput
from ember.sim.engine import RunResult
from ember.sim.plots import MAX_OCCUPANCY_POINTS, PLOT_FILES, RunSeries, series_of, write_plots
from ember.sim.runner import run_scenario
from ember.sim.scenario import parse_scenario

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: (height, width) in pixels of each file: its figure size in inches at 120 dpi.
SIZES = {"latency_cdf.png": (660, 1440), "cost_vs_attainment.png": (660, 960), "occupancy.png": (960, 1440)}


def _result(latencies_s: list[float], occupancy: list[tuple[float, int, int, int]] | None = None) -> RunResult:
    return RunResult(
        policy_set="ember", duration_s=100.0, latencies_s=latencies_s, met_slo=len(latencies_s), refused=0,
        cold_starts={}, gpu_seconds=10.0, gpu_memory_byte_seconds=0.0, instance_seconds=10.0, num_devices=1,
        batches=len(latencies_s), occupancy=occupancy or [],
    )  # fmt: skip


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 10_000
    pixels = imread(path)
    assert pixels.shape[:2] == SIZES[path.name]
    # Something was drawn: a good share of the pixels are not the white background.
    assert np.mean(pixels[..., :3].min(axis=-1) < 0.9) > 0.01


def test_series_keeps_a_faithful_cdf_of_many_latencies_in_few_points() -> None:
    rng = np.random.default_rng(1)
    latencies = rng.lognormal(mean=np.log(0.02), sigma=1.0, size=200_000)
    s = series_of(_result(latencies.tolist()))
    assert s.served == 200_000
    assert len(s.latency_ms) <= 1400 and len(s.latency_ms) == len(s.cdf)
    assert np.all(np.diff(s.latency_ms) >= 0) and np.all(np.diff(s.cdf) > 0)
    assert s.cdf[0] > 0 and s.cdf[-1] < 1  # a logit axis takes neither end
    assert s.latency_ms[0] == pytest.approx(latencies.min() * 1000)
    assert s.latency_ms[-1] == pytest.approx(latencies.max() * 1000)
    for q in (0.5, 0.9, 0.99, 0.999, 0.9999):  # the tail keeps its detail
        assert np.interp(q, s.cdf, s.latency_ms) == pytest.approx(np.quantile(latencies, q) * 1000, rel=0.02)


def test_series_of_a_run_that_served_nothing_is_empty() -> None:
    s = series_of(_result([], [(0.0, 1, 0, 1), (5.0, 0, 1, 0)]))
    assert s.served == 0 and len(s.latency_ms) == 0
    assert s.occupancy.tolist() == [[0.0, 1, 0, 1], [5.0, 0, 1, 0]]


def test_series_merges_long_occupancy_keeping_its_peaks() -> None:
    occupancy = [(10.0 * k, k % 7, 3, 8 if k == 12_345 else 2) for k in range(25_000)]
    s = series_of(_result([0.01], occupancy))
    assert len(s.occupancy) <= MAX_OCCUPANCY_POINTS
    assert s.occupancy[0, 0] == 0.0 and np.all(np.diff(s.occupancy[:, 0]) > 0)
    assert s.occupancy[:, 1].max() == 6 and s.occupancy[:, 2].min() == 3
    assert s.occupancy[:, 3].max() == 8  # one tick's peak survives
    assert int(np.argmax(s.occupancy[:, 3])) == int(np.searchsorted(s.occupancy[:, 0], 123_450, side="right")) - 1


def test_write_plots_draws_every_policy_set_of_the_small_scenario(tmp_path: Path) -> None:
    scenario = dataclasses.replace(parse_scenario(SMALL, HERE), duration_s=300)
    results: list[RunResult] = []
    reports = run_scenario(scenario, on_result=results.append)
    assert [r.policy_set for r in results] == [r.policy_set for r in reports]
    assert [r.policy_set for r in reports] == ["always_on", "classic_faas", "ray_serve", "ember"]
    series = [series_of(r) for r in results]
    assert all(s.served > 100 and len(s.occupancy) > 10 for s in series)

    out = tmp_path / "deep" / "plots"
    paths = write_plots(out, scenario.name, reports, series, [m.slo_s * 1000 for m in scenario.models])
    assert paths == [out / name for name in PLOT_FILES]
    for path in paths:
        _assert_png(path)


def test_write_plots_copes_with_no_always_on_and_a_set_that_served_nothing(tmp_path: Path) -> None:
    scenario = dataclasses.replace(parse_scenario(SMALL, HERE), duration_s=120)
    results: list[RunResult] = []
    reports = run_scenario(scenario, only=("ember",), on_result=results.append)
    assert reports[0].gpu_seconds_vs_always_on is None
    idle = RunSeries("idle", 0, np.empty(0), np.empty(0), np.empty((0, 4)))
    paths = write_plots(tmp_path, scenario.name, reports, [series_of(results[0]), idle])
    for path in paths:
        _assert_png(path)


def test_write_plots_says_when_the_folder_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InvalidInput, match="cannot create the plots folder"):
        write_plots(blocker / "plots", "x", [], [])


def test_ember_sim_writes_plots_and_says_where(tmp_path: Path) -> None:
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL)
    out = tmp_path / "plots"
    args = ["sim", str(scenario), "--plots", str(out), "--duration-s", "120", "--only", "always_on", "--only", "ember"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ember" in result.output and "always_on" in result.output
    assert "wrote latency_cdf.png, cost_vs_attainment.png, occupancy.png in" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(PLOT_FILES)
    for name in PLOT_FILES:
        _assert_png(out / name)


def test_ember_sim_names_the_extra_when_matplotlib_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "plots"
    result = CliRunner().invoke(app, ["sim", str(scenario), "--plots", str(out), "--duration-s", "60"])
    assert result.exit_code == 1
    assert "error:" in result.output and "ember-serve[plots]" in result.output
    assert "policy set" not in result.output  # refused before simulating: no table
    assert not out.exists()
