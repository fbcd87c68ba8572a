"""The token latency model and the generative admission rule, as pure policies.

Properties: predictions are monotone in prompt tokens, batch size and context; a few outliers do not
move them; whatever the history (adversarial ones included), a refusal on measured speed is never
absorbing: it turns into a probe within ``PROBE_AFTER_REFUSALS`` refusals or ``PROBE_AFTER_S``
seconds, and one good measurement restores admission.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.policies.batching import PROBE_AFTER_REFUSALS, PROBE_AFTER_S
from ember.policies.tiers import Tier
from ember.policies.token_admission import TokenAdmission, TokenRequest, token_admission
from ember.policies.token_latency import DEFAULT_TOKENS_PER_BYTE, TokenLatencyModel, context_bucket

seconds = st.one_of(st.floats(0, 10), st.sampled_from([math.inf, math.nan, -1.0, 1e9]))
prefills = st.lists(st.tuples(st.integers(1, 5000), seconds, st.booleans()), max_size=40)
steps = st.lists(st.tuples(st.integers(1, 64), st.integers(1, 5000), seconds, st.booleans()), max_size=40)


def _fold(prefill: list[tuple[int, float, bool]], step: list[tuple[int, int, float, bool]]) -> TokenLatencyModel:
    model = TokenLatencyModel()
    for at, (tokens, s, warmup) in enumerate(prefill):
        model = model.observe_prefill(tokens, s, float(at), warmup=warmup)
    for at, (batch, context, s, warmup) in enumerate(step):
        model = model.observe_step(batch, context, s, float(at), warmup=warmup)
    return model


def _request(now: float = 100.0, tokens: int = 64, batch: int = 0, context: int = 64, **kw: float) -> TokenRequest:
    values: dict[str, float] = {"ttft_deadline": now + 1.0, "tpot_slo_s": 0.1}
    values.update(kw)
    return TokenRequest(
        now=now,
        ttft_deadline=values["ttft_deadline"],
        tpot_slo_s=values["tpot_slo_s"],
        prompt_tokens=tokens,
        batch=batch,
        context=context,
        wait_s=values.get("wait_s", 0.0),
        seat_free_s=values.get("seat_free_s", 0.0),
        idle=bool(values.get("idle", True)),
    )


def test_context_buckets_grow_four_times():
    assert [context_bucket(t) for t in (0, 1, 2, 4, 5, 16, 17, 64, 65)] == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_nothing_measured_admits_everything():
    assert token_admission(_request(tokens=100_000, batch=1000), TokenLatencyModel()) == TokenAdmission("admit")


@settings(max_examples=60, deadline=None)
@given(prefill=prefills, step=steps, a=st.integers(1, 9000), b=st.integers(1, 9000))
def test_prefill_predictions_never_fall_as_prompts_grow(prefill, step, a, b):
    model = _fold(prefill, step)
    small, large = sorted((a, b))
    assert model.predict_prefill(small) <= model.predict_prefill(large)


@settings(max_examples=60, deadline=None)
@given(
    step=steps,
    batches=st.tuples(st.integers(1, 128), st.integers(1, 128)),
    contexts=st.tuples(st.integers(1, 9000), st.integers(1, 9000)),
)
def test_step_predictions_never_fall_as_the_batch_or_the_context_grows(step, batches, contexts):
    model = _fold([], step)
    b1, b2 = sorted(batches)
    c1, c2 = sorted(contexts)
    assert model.predict_step(b1, c1) <= model.predict_step(b2, c1)
    assert model.predict_step(b1, c1) <= model.predict_step(b1, c2)
    assert model.predict_step(b1, c1) <= model.predict_step(b2, c2)


@settings(max_examples=60, deadline=None)
@given(
    good=st.lists(st.floats(0.001, 0.05), min_size=30, max_size=30),
    outliers=st.lists(st.floats(1.0, 1e6), min_size=1, max_size=3),
    positions=st.lists(st.integers(0, 29), min_size=3, max_size=3),
)
def test_a_few_outliers_in_a_window_do_not_move_the_prediction(good, outliers, positions):
    samples = list(good)
    for outlier, position in zip(outliers, positions, strict=False):
        samples.insert(position, outlier)
    model = TokenLatencyModel()
    for at, s in enumerate(samples):
        model = model.observe_prefill(200, s, float(at)).observe_step(4, 200, s, float(at))
    assert model.predict_prefill(200) <= max(good)
    assert model.predict_step(4, 200) <= max(good)


def _until_not_refused(model: TokenLatencyModel, request: TokenRequest) -> tuple[int, TokenAdmission]:
    """Ask again and again at the same instant, recording each refusal as the runner does."""
    for refusals in range(PROBE_AFTER_REFUSALS + 2):
        decided = token_admission(request, model)
        if decided.verdict != "refuse":
            return refusals, decided
        if decided.on == "ttft":
            model = model.observe_refusal_prefill(request.prompt_tokens)
        else:
            model = model.observe_refusal_step(request.batch + 1, request.context)
    return PROBE_AFTER_REFUSALS + 2, decided


@settings(max_examples=150, deadline=None)
@given(
    prefill=prefills,
    step=steps,
    tokens=st.integers(1, 5000),
    batch=st.integers(0, 63),
    context=st.integers(1, 5000),
)
def test_a_refusal_by_speed_turns_into_a_probe_after_a_few_refusals_whatever_the_history(
    prefill, step, tokens, batch, context
):
    model = _fold(prefill, step)
    # Asked at the moment of the newest sample: only the refusal count can make a probe due.
    request = _request(now=float(len(prefill) + len(step)), tokens=tokens, batch=batch, context=context)
    refusals, decided = _until_not_refused(model, request)
    assert refusals <= PROBE_AFTER_REFUSALS
    assert decided.verdict in ("admit", "probe")


@settings(max_examples=150, deadline=None)
@given(prefill=prefills, step=steps, tokens=st.integers(1, 5000), batch=st.integers(0, 63))
def test_time_alone_makes_a_probe_due(prefill, step, tokens, batch):
    model = _fold(prefill, step)
    later = float(len(prefill) + len(step)) + PROBE_AFTER_S
    decided = token_admission(_request(now=later, tokens=tokens, batch=batch), model)
    assert decided.verdict in ("admit", "probe")


@settings(max_examples=150, deadline=None)
@given(prefill=prefills, step=steps, tokens=st.integers(1, 5000), batch=st.integers(0, 63))
def test_one_good_measurement_restores_admission(prefill, step, tokens, batch):
    model = _fold(prefill, step)
    at = float(len(prefill) + len(step))
    model = model.observe_prefill(tokens, 0.01, at).observe_step(batch + 1, 64, 0.01, at)
    assert token_admission(_request(now=at, tokens=tokens, batch=batch), model).verdict == "admit"


def test_a_slow_warm_up_never_justifies_a_refusal():
    model = TokenLatencyModel()
    for at in range(40):
        model = model.observe_prefill(64, 30.0, float(at), warmup=True).observe_step(
            1, 64, 30.0, float(at), warmup=True
        )
    assert model.predict_prefill(64) == 30.0  # it shapes predictions ...
    assert token_admission(_request(now=40.0, idle=False), model).verdict == "admit"  # ... never refusals


def test_a_slow_prefill_refuses_with_too_slow_and_a_probe_is_admitted_when_due():
    model = TokenLatencyModel().observe_prefill(64, 5.0, 10.0)
    busy = token_admission(_request(now=10.0, idle=False), model)
    assert busy.verdict == "refuse" and busy.too_slow and busy.on == "ttft"
    assert busy.retry_after_s == pytest.approx(PROBE_AFTER_S)
    # A fresh bucket's first real run was slow: refused; after the refusals count up, a probe.
    refusals, decided = _until_not_refused(model, _request(now=10.0, idle=True))
    assert decided.verdict == "probe" and refusals == PROBE_AFTER_REFUSALS


def test_a_wait_that_breaks_the_ttft_is_a_transient_refusal_with_the_overshoot():
    model = TokenLatencyModel().observe_prefill(64, 0.3, 0.0)
    decided = token_admission(_request(now=0.0, wait_s=1.5), model)
    assert decided == TokenAdmission("refuse", pytest.approx(0.8), too_slow=False, on="ttft")


def test_a_batch_too_slow_for_the_tpot_refuses_until_a_seat_frees():
    model = TokenLatencyModel().observe_step(5, 64, 0.3, 0.0).observe_step(4, 64, 0.05, 0.0)
    assert token_admission(_request(now=0.0, batch=3), model).verdict == "admit"
    decided = token_admission(_request(now=0.0, batch=4, seat_free_s=0.7), model)
    assert decided == TokenAdmission("refuse", pytest.approx(0.7), on="tpot")
    alone = TokenLatencyModel().observe_step(1, 64, 0.3, 0.0)
    assert token_admission(_request(now=0.0, batch=0), alone).too_slow


def test_the_prompt_ratio_and_the_typical_answer_are_medians():
    model = TokenLatencyModel()
    assert model.prompt_tokens(100) == math.ceil(100 * DEFAULT_TOKENS_PER_BYTE)
    for tokens in (20, 25, 30, 25, 5000):  # one absurd prompt among ordinary ones
        model = model.observe_prompt(100, tokens)
    assert model.prompt_tokens(100) == 25
    assert model.expected_completion(64) == 64
    for tokens in (10, 12, 11, 900):
        model = model.observe_completion(tokens)
    assert model.expected_completion(64) == 11
    assert model.expected_completion(5) == 5


def test_loads_are_kept_as_for_one_shot_models():
    model = TokenLatencyModel().observe_load(Tier.WARM, 0.4)
    assert model.steps.loads and model.steps.loads[0][0] is Tier.WARM
