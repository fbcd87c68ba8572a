"""Generative requests in the engine: a hand-checked run, token-level invariants, and bit-for-bit repeatability."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from sim_cases import HERE
from typer.testing import CliRunner

from ember.cli import app
from ember.errors import InvalidInput
from ember.sim.calibration import LatencyCurve, load_calibration
from ember.sim.cluster import ClusterSpec, ModelSpec
from ember.sim.engine import Engine, RunResult
from ember.sim.policysets import build_policy_set
from ember.sim.report import summarise
from ember.sim.runner import run_policy_set
from ember.sim.scenario import Scenario, load_scenario, parse_scenario
from ember.sim.tokens import GenSpec, StepModel
from ember.sim.workload import Workload

SETS = ("always_on", "classic_faas", "ray_serve", "ember")


def _flat(name: str, seconds: float) -> LatencyCurve:
    return LatencyCurve(name, (1, 1 << 20), (seconds, seconds), 1)


def _one_instance(workload: Workload, *, kv_budget: int = 10_000, max_seqs: int = 8) -> RunResult:
    """One always-on instance of a model whose decode step takes 10 ms and whose prefill takes 20 ms,
    whatever their sizes (no KV bytes, so the context costs nothing)."""
    step = StepModel(_flat("decode", 0.010), _flat("prefill", 0.020), kv_bytes_per_token=0)
    gen = GenSpec(1.0, 1.0, max_seqs, 4096, kv_budget, step, step_tokens=2048)
    model = ModelSpec("lm", _flat("request", 0.1), 10**9, 2.0, max_seqs, generation=gen)
    cluster = ClusterSpec(load_calibration("h200"), 1, 1, 100 * 10**9, 100 * 10**9)
    engine = Engine(cluster, (model,), workload, build_policy_set("always_on", {}), duration_s=1.0, seed=0,
                    record_events=True)  # fmt: skip
    return engine.run()


def test_two_requests_on_one_instance_have_the_ttft_and_tpot_of_their_steps() -> None:
    # A (100-token prompt, 3 output tokens) at 0; B (50, 2) at 5 ms, while A's prefill runs.
    # Step 1, 0-20 ms: A's prefill -> A's first token at 20 ms.
    # Step 2, 20-40 ms: A decodes beside B's prefill (fused: the larger, 20 ms) -> A's 2nd, B's 1st token at 40 ms.
    # Step 3, 40-50 ms: both decode (10 ms) -> A's 3rd and B's 2nd: both done at 50 ms.
    result = _one_instance(Workload([0.0, 0.005], [0, 0], [100, 50], outputs=[3, 2]))
    g = result.generative
    assert g is not None
    assert g.requests == 2 and g.steps == 3 and g.preemptions == 0
    assert g.ttft_s == pytest.approx([0.020, 0.035], rel=1e-12)  # in the order they finished: A, then B
    assert g.tpot_s == pytest.approx([(0.050 - 0.020) / 2, (0.050 - 0.040) / 1], rel=1e-12)
    assert result.latencies_s == pytest.approx([0.050, 0.045], rel=1e-12)
    steps = [ev for ev in result.events if ev[1] == "step"]
    assert [(ev[4], ev[5]) for ev in steps] == [(0, 100), (1, 50), (2, 0)]  # (decoding, prefill tokens)
    assert [ev[0] for ev in steps] == pytest.approx([0.0, 0.020, 0.040], rel=1e-12)
    assert [ev[7] for ev in steps] == pytest.approx([0.020, 0.020, 0.010], rel=1e-12)
    # The cache each step ends with: A's 100-token prompt; + its decode and B's 50; + both decodes.
    assert [ev[6] for ev in steps] == [100, 151, 153]
    assert result.met_slo == 2 and g.both_met == 2


def test_a_full_cache_preempts_the_newest_sequence_and_recomputes_it() -> None:
    # A cache of 12 tokens; A and B (4-token prompts, 6 output tokens) both arrive at 0; A's prefill starts alone.
    #   0-20 ms A prefills (4)             -> A 1 token; cache 4
    #  20-40    A decodes, B prefills (4)  -> A 2, B 1 (B's first token at 40 ms); cache 5 + 4 = 9
    #  40-50    both decode                -> A 3, B 2; cache 11
    #  50-60    11 + 2 > 12: B (newest) is preempted, its 5 tokens freed; A decodes -> A 4; cache 7
    #  60-80    A decodes twice; B would need 4 + 2 = 6 tokens again, no room -> A 6: done at 80 ms
    #  80-100   B recomputes prompt + its 2 tokens (6) -> B 3; then decodes 100-130 -> B 6: done at 130 ms
    result = _one_instance(Workload([0.0, 0.0], [0, 0], [4, 4], outputs=[6, 6]), kv_budget=12)
    g = result.generative
    assert g is not None
    assert (g.requests, g.preemptions, g.steps, g.output_tokens) == (2, 1, 10, 12)
    assert g.ttft_s == pytest.approx([0.020, 0.040], rel=1e-12)  # B keeps its first token's time
    assert g.tpot_s == pytest.approx([(0.080 - 0.020) / 5, (0.130 - 0.040) / 5], rel=1e-12)
    assert result.latencies_s == pytest.approx([0.080, 0.130], rel=1e-12)
    steps = [ev for ev in result.events if ev[1] == "step"]
    assert [ev[6] for ev in steps] == [4, 9, 11, 7, 8, 9, 6, 7, 8, 9]  # never past 12
    assert [(ev[4], ev[5]) for ev in steps][3:7] == [(1, 0), (1, 0), (1, 0), (0, 6)]


def test_a_request_that_cannot_fit_is_refused_not_truncated() -> None:
    result = _one_instance(Workload([0.0, 0.0], [0, 0], [30, 4], outputs=[10, 2]), kv_budget=20)
    g = result.generative
    assert g is not None
    assert (g.requests, g.refused, g.too_long, result.refused) == (1, 1, 1, 1)


@pytest.fixture(scope="module")
def llm() -> Scenario:
    return dataclasses.replace(load_scenario("llm"), duration_s=30.0)


@pytest.fixture(scope="module")
def runs(llm: Scenario) -> dict[str, RunResult]:
    workload = llm.workload()
    return {name: run_policy_set(llm, name, opts, workload, record_events=True) for name, opts in llm.policy_sets}


def _digest(result: RunResult) -> str:
    return hashlib.sha256(repr(result.events).encode()).hexdigest()


def _report_json(result: RunResult) -> str:
    body = dataclasses.asdict(summarise(result, 0.0, None))
    return json.dumps(body, sort_keys=True)


@pytest.mark.parametrize("policy_set", SETS)
def test_the_llm_scenario_is_bit_for_bit_repeatable(llm: Scenario, runs: dict[str, RunResult], policy_set: str) -> None:
    again = run_policy_set(llm, policy_set, dict(llm.policy_sets)[policy_set], llm.workload(), record_events=True)
    first = runs[policy_set]
    assert sum(1 for ev in first.events if ev[1] == "step") > 100
    assert _digest(first) == _digest(again)
    assert _report_json(first) == _report_json(again)


def test_every_generative_request_finishes_or_is_refused(llm: Scenario, runs: dict[str, RunResult]) -> None:
    workload = llm.workload()
    assert len(workload) > 40
    for name, result in runs.items():
        g = result.generative
        assert g is not None, name
        assert g.requests + g.refused == len(workload), name
        assert len(result.latencies_s) == g.requests == len(g.ttft_s), name
        finished = [ev[3] for ev in result.events if ev[1] == "finish"]
        assert len(finished) == len(set(finished)) == g.requests, name  # each once
        assert result.met_slo == g.both_met <= min(g.ttft_met, g.tpot_met), name


def test_ttft_never_exceeds_the_whole_request(runs: dict[str, RunResult]) -> None:
    for name, result in runs.items():
        finishes = [ev for ev in result.events if ev[1] == "finish"]
        assert finishes, name
        for _, _, _, _, ttft, e2e in finishes:
            assert 0 < ttft <= e2e, name


def test_no_step_ends_over_its_instances_kv_budget(llm: Scenario, runs: dict[str, RunResult]) -> None:
    budgets = {m.name: m.generation.kv_budget_tokens for m in llm.models if m.generation is not None}
    for name, result in runs.items():
        for ev in result.events:
            if ev[1] == "step":
                assert ev[6] <= budgets[ev[2].split("#")[0]], (name, ev)


def test_a_tight_cache_preempts_and_still_serves_every_token(llm: Scenario) -> None:
    text = (HERE.parent.parent / "src/ember/sim/scenarios/llm.yaml").read_text()
    text = text.replace("kv_budget_gb: 8", "kv_budget_gb: 0.5").replace("arrivals: trace", "time_scale: 0.05")
    tight = parse_scenario(text, Path("."), origin="tight")  # 15,258 tokens a 1B instance, the trace 20x as fast
    tight = dataclasses.replace(tight, duration_s=10.0, policy_sets=(("always_on", {}),))
    workload = tight.workload()
    result = run_policy_set(tight, "always_on", {}, workload, record_events=True)
    g = result.generative
    assert g is not None and g.preemptions > 0
    budgets = {m.name: m.generation.kv_budget_tokens for m in tight.models if m.generation is not None}
    assert all(ev[6] <= budgets[ev[2].split("#")[0]] for ev in result.events if ev[1] == "step")
    assert g.requests + g.refused == len(workload)


def test_ember_sim_llm_prints_the_generative_table_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "llm.json"
    result = CliRunner().invoke(app, ["sim", "llm", "--duration-s", "20", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "generative requests" in result.output and "TTFT ok" in result.output and "goodput/s" in result.output
    body = json.loads(out.read_text())
    assert set(body["policy_sets"]) == set(SETS)
    for entry in body["policy_sets"].values():
        gen = entry["generative"]
        for key in ("ttft_attainment", "tpot_attainment", "goodput_per_s", "p50_ttft_ms", "p99_ttft_ms",
                    "p50_tpot_ms", "p99_tpot_ms", "output_tokens_per_s", "preemptions"):  # fmt: skip
            assert key in gen
        assert 0 <= gen["tpot_attainment"] <= 1 and entry["gpu_seconds"] > 0 and entry["usd"] > 0


def test_a_generative_model_without_a_size_is_refused_with_what_to_give(tmp_path: Path) -> None:
    text = (HERE.parent.parent / "src/ember/sim/scenarios/llm.yaml").read_text().replace("      params_b: 8.03\n", "")
    with pytest.raises(InvalidInput, match="weights_gb and params_b"):
        parse_scenario(text, tmp_path, origin="bad")


def test_one_shot_fields_on_a_generative_model_are_refused_by_name(tmp_path: Path) -> None:
    text = (HERE.parent.parent / "src/ember/sim/scenarios/llm.yaml").read_text()
    text = text.replace("    profile: llama1b\n", "    profile: llama1b\n    slo_ms: 100\n")
    with pytest.raises(InvalidInput, match="slo_ms do\\(es\\) not apply to a generative model"):
        parse_scenario(text, tmp_path, origin="bad")


def test_a_one_shot_scenario_reports_no_generative_figures(tmp_path: Path) -> None:
    from sim_cases import SMALL

    small = dataclasses.replace(parse_scenario(SMALL, HERE, origin="small"), duration_s=60.0)
    result = run_policy_set(small, "always_on", {}, small.workload())
    assert result.generative is None and summarise(result, 0.0, None).generative is None
