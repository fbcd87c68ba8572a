"""The generative pieces on their own: the step plan, the step models, and the Azure LLM trace reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.errors import InvalidInput
from ember.sim.calibration import load_calibration
from ember.sim.llmtrace import LlmWorkloadSpec, llm_workload, read_llm_trace
from ember.sim.tokens import (
    CALIBRATED_CONTEXT_TOKENS,
    FP16_FLOPS,
    HBM_BYTES_PER_S,
    StepView,
    derived_step_model,
    measured_step_model,
    plan_step,
)

HERE = Path(__file__).resolve().parent


@st.composite
def views(draw: st.DrawFn) -> StepView:
    budget = draw(st.integers(1, 5000))
    held = draw(st.lists(st.integers(1, 400), max_size=12))
    prefilling = draw(st.integers(0, len(held)))
    while sum(held) > budget:
        held.pop()
        prefilling = min(prefilling, len(held))
    decoding = len(held) - prefilling
    return StepView(
        decoding=decoding,
        kv_used=sum(held),
        kv_budget=budget,
        max_seqs=draw(st.integers(max(1, len(held)), 64)),
        step_tokens=draw(st.integers(1, 4096)),
        prefilling=tuple(draw(st.integers(1, h)) for h in held[decoding:]),
        waiting=tuple(draw(st.lists(st.integers(1, 2000), max_size=8))),
        held_newest_first=tuple(reversed(held)),
    )


@given(views())
def test_a_plan_never_outgrows_the_cache_slots_or_token_budget(view: StepView) -> None:
    plan = plan_step(view)
    held = view.held_newest_first
    kv = view.kv_used - sum(held[: plan.preempt])
    gone_prefilling = min(plan.preempt, len(view.prefilling))
    decoding = view.decoding - (plan.preempt - gone_prefilling)
    admitted_kv = sum(view.waiting[: len(plan.admit)])
    assert kv + decoding + admitted_kv <= view.kv_budget
    assert decoding + len(view.prefilling) - gone_prefilling + len(plan.admit) <= max(view.max_seqs, len(held))
    assert len(plan.chunks) == len(view.prefilling) - gone_prefilling
    assert all(0 <= c <= n for c, n in zip(plan.chunks, view.prefilling, strict=False))
    assert all(0 < a <= n for a, n in zip(plan.admit, view.waiting, strict=False))
    assert decoding + sum(plan.chunks) + sum(plan.admit) <= max(view.step_tokens, decoding)
    if plan.preempt:
        assert not plan.admit


def test_an_empty_batch_always_admits_the_queue_head_when_it_fits() -> None:
    plan = plan_step(StepView(0, 0, 1000, 4, 256, (), (900, 10), ()))
    assert plan == plan_step(StepView(0, 0, 1000, 4, 256, (), (900, 10), ()))
    assert plan.admit == (256,) and plan.preempt == 0  # its prefill chunked; the next waits for cache room


def test_the_measured_step_model_reads_the_calibration() -> None:
    cal = load_calibration("h200")
    step = measured_step_model(cal, "llama1b", 32768, 2 * 953_200_000)
    ctx = CALIBRATED_CONTEXT_TOKENS
    assert step.decode_s(1, ctx) == pytest.approx(0.010956)
    assert step.decode_s(64, 64 * ctx) == pytest.approx(0.018198)
    # A longer context reads more cache: 1,000 tokens more at 32 KiB each, at 4.8 TB/s.
    assert step.decode_s(1, ctx + 1000) - step.decode_s(1, ctx) == pytest.approx(1000 * 32768 / HBM_BYTES_PER_S)
    # Prefill: 2,048 tokens measured at 12.28 ms; 512 at 15.02 is capped by it (more never costs less).
    assert step.prefill_s(2048) == pytest.approx(0.01228)
    assert step.prefill_s(512) == pytest.approx(0.01228)
    assert step.prefill_s(8192) == pytest.approx(0.044246)
    # A fused step: the larger of the decode and the prefill of all its tokens.
    assert step.step_s(8, 8 * ctx, 4000) == pytest.approx(step.prefill_s(4008))


def test_the_derived_step_model_is_a_roofline() -> None:
    params, weights = 8_000_000_000, 16_000_000_000
    step = derived_step_model(params, weights, 131072, overhead_s=0.01)
    assert step.decode_s(1, CALIBRATED_CONTEXT_TOKENS) == pytest.approx(
        0.01 + (weights + 512 * 131072) / HBM_BYTES_PER_S
    )
    assert step.prefill_s(8192) == pytest.approx(0.01 + 2 * params * 8192 / FP16_FLOPS)  # compute-bound


def test_the_builtin_azure_trace_has_its_rows_in_time_order() -> None:
    trace = read_llm_trace("azure_conv")
    assert len(trace.times) == 19366
    assert (trace.prompts[0], trace.outputs[0], trace.times[0]) == (374, 44, 0.0)
    assert trace.times == sorted(trace.times)
    assert 3400 < trace.times[-1] < 3600  # about an hour
    assert len(read_llm_trace("azure_code").times) == 8819


def test_the_test_slice_reads_like_the_builtin_trace() -> None:
    part = read_llm_trace(HERE / "azure_conv_400.csv")
    whole = read_llm_trace("azure_conv")
    assert part.prompts == whole.prompts[:400] and part.outputs == whole.outputs[:400]


def test_llm_workloads_replay_scale_or_draw_poisson_arrivals() -> None:
    trace = read_llm_trace(HERE / "azure_conv_400.csv")
    replay = llm_workload(LlmWorkloadSpec("x"), trace, [0, 2], 60.0, seed=1)
    fast = llm_workload(LlmWorkloadSpec("x", time_scale=0.5), trace, [0, 2], 60.0, seed=1)
    assert replay.sizes == trace.prompts[: len(replay)] and replay.outputs == trace.outputs[: len(replay)]
    assert len(fast) > len(replay) and fast.times[: len(replay)] == pytest.approx([t / 2 for t in replay.times])
    assert set(replay.models) == {0, 2}
    poisson = llm_workload(LlmWorkloadSpec("x", "poisson", rate_per_s=20.0), trace, [1], 100.0, seed=1)
    assert 1800 < len(poisson) < 2200 and set(poisson.models) == {1}
    assert set(poisson.sizes) <= set(trace.prompts)
    again = llm_workload(LlmWorkloadSpec("x", "poisson", rate_per_s=20.0), trace, [1], 100.0, seed=1)
    assert again == poisson


def test_a_trace_without_token_columns_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,Tokens\n0,5\n")
    with pytest.raises(InvalidInput, match="ContextTokens"):
        read_llm_trace(bad)
