"""Admission of a generative request: its time to first token, and the running batch's time per token.

Decision rule of :func:`token_admission`, for a request whose prompt is predicted to be ``prompt_tokens``
tokens, arriving at ``now`` with its first token due at ``ttft_deadline``, that would join a batch
of ``batch`` running sequences holding ``context`` tokens each on average:

1. *TTFT.* It may start its prefill after ``wait_s`` (the rest of a load when the model is not hot,
   or until a seat frees when every instance runs ``max_num_seqs`` sequences). It is meetable when
   ``now + wait_s + prefill <= ttft_deadline``, where ``prefill`` is what a refusal may count on
   (``TokenLatencyModel.admission_prefill_s``: the lower of the quantile and the newest run of that
   size; nothing for a size no real request measured). Missed only because of the wait: refused
   with ``retry_after_s`` the overshoot (the wait shrinks as time passes). Missed even without a
   wait: the model's prefill is too slow, and the refusal is ``too_slow``.
2. *TPOT.* Joining makes a batch of ``batch + 1``; it is meetable when that step, by what a refusal
   may count on (``admission_step_s``: that batch and context's own evidence only), is within
   ``tpot_slo_s``. Missed: refused until a running sequence is expected to end (``seat_free_s``),
   or ``too_slow`` when the model is too slow even alone (``batch == 0``).
3. *Never absorbing.* A request refused only by measured speed is admitted as a *probe* when that
   evidence is due to be checked again: never measured by a real request, its newest sample
   ``probe_after_s`` old, or ``probe_after_refusals`` requests refused on it since. A prefill probe
   waits for an idle seat (``idle``: it would start at once); a step probe needs none (it joins the
   batch whose speed it measures). A probe's measurement replaces the evidence: one good run
   restores admission, a slow one keeps refusing for another round.

Pure: no clock, no I/O. The caller records a refusal on the evidence it names (``on``) with
``TokenLatencyModel.observe_refusal_prefill`` / ``observe_refusal_step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ember.policies.batching import PROBE_AFTER_REFUSALS, PROBE_AFTER_S
from ember.policies.token_latency import TokenLatencyModel

__all__ = ["TokenAdmission", "TokenRequest", "token_admission"]

Verdict = Literal["admit", "probe", "refuse"]


@dataclass(frozen=True)
class TokenRequest:
    """One generative request as admission sees it."""

    now: float
    #: When its first token is due: arrival + TTFT objective, or the caller's own timeout.
    ttft_deadline: float
    tpot_slo_s: float
    #: Predicted tokens of its prompt.
    prompt_tokens: int
    #: Sequences running on the instance it would join, and their mean context in tokens.
    batch: int = 0
    context: int = 1
    #: Predicted seconds before its prefill could start (a load, or a seat freeing).
    wait_s: float = 0.0
    #: Predicted seconds until a running sequence ends and frees its seat (for ``retry_after_s``).
    seat_free_s: float = 0.0
    #: A hot instance has a free seat: a prefill probe would start at once.
    idle: bool = False


@dataclass(frozen=True)
class TokenAdmission:
    verdict: Verdict
    #: For a refusal: seconds after which the same request is predicted to be admitted.
    retry_after_s: float = 0.0
    #: For a refusal: the model's own speed refuses it, so only a new measurement changes the answer.
    too_slow: bool = False
    #: Which objective decided: ``"ttft"`` or ``"tpot"`` (None when admitted outright).
    on: Literal["ttft", "tpot"] | None = None


def token_admission(
    request: TokenRequest,
    model: TokenLatencyModel,
    *,
    probe_after_s: float = PROBE_AFTER_S,
    probe_after_refusals: int = PROBE_AFTER_REFUSALS,
) -> TokenAdmission:
    """Admit, probe or refuse ``request`` by ``model``'s measurements (see the module's doc)."""
    now, deadline, tokens = request.now, request.ttft_deadline, request.prompt_tokens
    prefill_s = model.admission_prefill_s(tokens)
    if now + prefill_s > deadline:  # too slow even without waiting
        if request.idle and model.prefill_probe_due(tokens, now, probe_after_s, probe_after_refusals):
            return TokenAdmission("probe", on="ttft")
        newest = model.newest_prefill(tokens)
        due_in = probe_after_s if newest is None else max(0.0, newest[1] + probe_after_s - now)
        return TokenAdmission("refuse", max(request.wait_s, due_in), too_slow=True, on="ttft")
    if now + request.wait_s + prefill_s > deadline:  # only the wait is too long, and it shrinks
        return TokenAdmission("refuse", now + request.wait_s + prefill_s - deadline, on="ttft")
    batch, context = request.batch + 1, request.context
    if model.admission_step_s(batch, context) <= request.tpot_slo_s:
        return TokenAdmission("admit")
    if model.step_probe_due(batch, context, now, probe_after_s, probe_after_refusals):
        return TokenAdmission("probe", on="tpot")
    newest = model.newest_step(batch, context)
    due_in = probe_after_s if newest is None else max(0.0, newest[1] + probe_after_s - now)
    if request.batch == 0:
        return TokenAdmission("refuse", due_in, too_slow=True, on="tpot")
    return TokenAdmission("refuse", min(due_in, max(request.seat_free_s, 0.0)), on="tpot")
