"""The token scheduler as a pure policy: its budgets, preemption and fairness, under random workloads."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.policies.tokens import SeqView, StepPlan, StepState, TokenBudget, schedule_step


@dataclass
class _Seq:
    seq_id: int
    arrival_step: int
    prompt: int
    output: int
    num_tokens: int = 0
    num_computed: int = 0
    generated: int = 0
    admitted_at: int | None = None
    finished_at: int | None = None
    preemptions: int = 0

    def view(self) -> SeqView:
        return SeqView(self.seq_id, self.num_tokens, self.num_computed)


def _run(budget: TokenBudget, seqs: list[_Seq], max_steps: int) -> list[StepPlan]:
    """An engine in miniature: applies each plan, samples a token whenever a sequence's tokens are
    all computed, and checks the plan's invariants at every step."""
    for s in seqs:
        s.num_tokens = s.prompt
    running: list[_Seq] = []
    waiting: list[_Seq] = []
    plans: list[StepPlan] = []
    first_admissions: list[int] = []
    for step in range(max_steps):
        waiting.extend(s for s in seqs if s.arrival_step == step)
        waiting.sort(key=lambda s: s.seq_id)
        if not running and not waiting and all(s.finished_at is not None for s in seqs):
            break
        state = StepState(tuple(s.view() for s in running), tuple(s.view() for s in waiting), budget)
        plan = schedule_step(state)
        plans.append(plan)
        # Budgets.
        assert plan.num_tokens <= budget.max_step_tokens
        assert all(n > 0 for _, n in plan.chunks)
        # Preemption takes the newest running sequences, never the oldest one.
        ids = [s.seq_id for s in running]
        assert list(plan.preempted) == ids[len(ids) - len(plan.preempted) :][::-1]
        if running:
            assert ids[0] not in plan.preempted
        # Admission is a prefix of the queue (first come, first served), and never beside a preemption.
        assert list(plan.admitted) == [s.seq_id for s in waiting[: len(plan.admitted)]]
        assert not (plan.admitted and plan.preempted)
        # Every running decode that stays gets its token.
        chunk = dict(plan.chunks)
        for s in running:
            if s.seq_id not in plan.preempted and s.num_tokens - s.num_computed == 1:
                assert chunk.get(s.seq_id) == 1
        # Apply.
        for seq_id in plan.preempted:
            victim = next(s for s in running if s.seq_id == seq_id)
            running.remove(victim)
            victim.num_computed = 0
            victim.preemptions += 1
            waiting.append(victim)
        waiting.sort(key=lambda s: s.seq_id)
        for seq_id in plan.admitted:
            joiner = next(s for s in waiting if s.seq_id == seq_id)
            waiting.remove(joiner)
            running.append(joiner)
            if joiner.admitted_at is None:
                joiner.admitted_at = step
                first_admissions.append(seq_id)
        assert len(running) <= budget.max_num_seqs
        for s in running:
            s.num_computed += chunk.get(s.seq_id, 0)
            assert s.num_computed <= s.num_tokens
        assert sum(s.num_computed for s in running) <= budget.kv_capacity_tokens
        for s in list(running):
            if s.num_computed == s.num_tokens:  # sample a token
                s.generated += 1
                s.num_tokens += 1
                if s.generated == s.output:
                    s.finished_at = step
                    running.remove(s)
    # Liveness: everyone finished, never truncated; first admissions in arrival order.
    assert all(s.finished_at is not None for s in seqs), "a sequence starved"
    assert all(s.num_tokens == s.prompt + s.output for s in seqs)
    assert first_admissions == sorted(first_admissions)
    return plans


@st.composite
def _workloads(draw: st.DrawFn) -> tuple[TokenBudget, list[_Seq]]:
    max_num_seqs = draw(st.integers(1, 6))
    max_step_tokens = draw(st.integers(max_num_seqs, 48))
    capacity = draw(st.integers(8, 120))
    n = draw(st.integers(1, 12))
    seqs = []
    arrival = 0
    for i in range(n):
        arrival += draw(st.integers(0, 4))
        total = draw(st.integers(2, capacity))  # a sequence never outgrows the cache
        prompt = draw(st.integers(1, total - 1))
        seqs.append(_Seq(i, arrival, prompt, total - prompt))
    return TokenBudget(max_num_seqs, max_step_tokens, capacity), seqs


@settings(max_examples=300, deadline=None)
@given(_workloads())
def test_budgets_hold_and_every_sequence_finishes(workload: tuple[TokenBudget, list[_Seq]]) -> None:
    budget, seqs = workload
    bound = 10 + max(s.arrival_step for s in seqs) + sum(s.prompt + s.output for s in seqs) * (len(seqs) + 1)
    _run(budget, seqs, bound)


def test_a_long_prompt_is_chunked_beside_running_decodes() -> None:
    budget = TokenBudget(max_num_seqs=4, max_step_tokens=8, kv_capacity_tokens=1000)
    state = StepState(
        running=(SeqView(0, 10, 9), SeqView(1, 20, 19)),
        waiting=(SeqView(2, 100),),
        budget=budget,
    )
    plan = schedule_step(state)
    assert plan.chunks == ((0, 1), (1, 1), (2, 6))
    assert plan.admitted == (2,)


def test_a_prefill_leaves_a_token_for_each_younger_decode() -> None:
    budget = TokenBudget(max_num_seqs=3, max_step_tokens=4, kv_capacity_tokens=1000)
    state = StepState(running=(SeqView(0, 50, 10), SeqView(1, 8, 7), SeqView(2, 9, 8)), waiting=(), budget=budget)
    assert schedule_step(state).chunks == ((0, 2), (1, 1), (2, 1))


def test_a_full_cache_preempts_the_newest_and_admits_nobody() -> None:
    budget = TokenBudget(max_num_seqs=4, max_step_tokens=16, kv_capacity_tokens=20)
    state = StepState(
        running=(SeqView(0, 11, 10), SeqView(1, 11, 10)),
        waiting=(SeqView(2, 3),),
        budget=budget,
    )
    plan = schedule_step(state)
    assert plan.preempted == (1,)
    assert plan.chunks == ((0, 1),)
    assert plan.admitted == ()


def test_the_queue_head_is_never_passed_over() -> None:
    budget = TokenBudget(max_num_seqs=4, max_step_tokens=16, kv_capacity_tokens=20)
    state = StepState(running=(SeqView(0, 11, 10),), waiting=(SeqView(1, 15), SeqView(2, 2)), budget=budget)
    assert schedule_step(state).admitted == ()


def test_budget_validation_names_the_limits() -> None:
    with pytest.raises(ValueError, match="max_step_tokens"):
        TokenBudget(max_num_seqs=8, max_step_tokens=4, kv_capacity_tokens=100)
