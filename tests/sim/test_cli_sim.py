"""``ember sim``: a table per run, JSON on request, and errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sim_cases import SMALL
from typer.testing import CliRunner

from ember.cli import app


def test_ember_sim_prints_a_row_per_policy_set_and_writes_json(tmp_path: Path) -> None:
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(
        app, ["sim", str(scenario), "--json", str(out), "--duration-s", "300", "--only", "always_on", "--only", "ember"]
    )
    assert result.exit_code == 0, result.output
    assert "always_on" in result.output and "ember" in result.output
    body = json.loads(out.read_text())
    assert set(body["policy_sets"]) == {"always_on", "ember"}
    for entry in body["policy_sets"].values():
        for key in ("slo_attainment", "p50_ms", "p99_ms", "cold_start_fraction", "mean_instances", "gpu_seconds",
                    "gpu_memory_gb_seconds", "host_memory_gb_seconds", "load_gb", "load_gb_from_disk", "gpu_usd",
                    "host_memory_usd", "pinned_memory_gb_seconds", "pinned_memory_usd", "usd",
                    "usd_per_million_requests"):  # fmt: skip
            assert key in entry
        assert list(entry["classes"]) == ["resnet", "bert", "llama"]
        assert sum(c["usd"] for c in entry["classes"].values()) == pytest.approx(entry["usd"])
        assert sum(c["requests"] for c in entry["classes"].values()) == entry["requests"]
    assert body["policy_sets"]["always_on"]["gpu_seconds_vs_always_on"] == 1.0
    assert "dollars per model class" in result.output


def test_ember_sim_names_a_bad_scenario(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(SMALL.replace("duration_s: 900", "duration_s: soon"))
    result = CliRunner().invoke(app, ["sim", str(scenario)])
    assert result.exit_code == 1
    assert "error:" in result.output and "duration_s" in result.output


def test_ember_sim_refuses_a_policy_set_the_scenario_lacks(tmp_path: Path) -> None:
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL)
    result = CliRunner().invoke(app, ["sim", str(scenario), "--only", "nope"])
    assert result.exit_code == 1
    assert "policy set 'nope' is not in the scenario" in result.output


def test_ember_sim_to_a_pipe_keeps_every_cell_whole(tmp_path: Path) -> None:
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL)
    result = CliRunner().invoke(app, ["sim", str(scenario), "--duration-s", "120", "--only", "always_on"])
    assert result.exit_code == 0, result.output
    assert "\N{HORIZONTAL ELLIPSIS}" not in result.output
    header = next(line for line in result.output.splitlines() if "policy set" in line)
    for column in ("requests", "SLO met", "p50 ms", "p99 ms", "cold w/c", "GPU-s", "xAO", "GB-s", "models/GPU",
                   "host GB-s", "pinned GB-s", "load GB", "$", "$/M req"):  # fmt: skip
        assert column in header
