"""The builders of a generative model's admission input: who sits where, and what a newcomer waits for.

A generative model's instances each run at most ``max_num_seqs`` sequences (*seats*) within a KV
budget of ``kv_tokens`` tokens. The runner (``scheduler.GenerativeRunner``) and the simulator hold
their sequences differently, but ask the same two questions, answered here once:

- :func:`choose_seat`: which instance a sequence of ``tokens`` prompt tokens starts on now: one with
  a free seat and room in its KV budget, running the fewest sequences, then with the most room,
  then by id (None: every seat is taken);
- :func:`token_request`: admission's view of a request (``policies.token_admission``): the batch it
  would join and its mean context; or, with every seat taken, when enough running sequences are
  predicted to end for it to start (each running sequence is expected to take the model's typical
  answer length, at most its ``max_tokens``, at the predicted step of its batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ember.policies.token_admission import TokenRequest
from ember.policies.token_latency import TokenLatencyModel

__all__ = ["Seat", "Seated", "choose_seat", "token_request"]


class Seated(Protocol):
    """A running sequence as the builders see it (the runner's own sequences are read in place)."""

    @property
    def context(self) -> int:
        """Tokens it holds in the KV cache: prompt and answer so far."""
        ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...


@dataclass(frozen=True)
class Seat:
    """A :class:`Seated` value, for callers that keep no sequence objects (the simulator, tests)."""

    context: int
    completion_tokens: int
    max_tokens: int


def choose_seat(
    instances: Mapping[str, Sequence[Seated]], tokens: int, max_num_seqs: int, kv_tokens: int
) -> str | None:
    """The instance a sequence of ``tokens`` prompt tokens starts on now, or None (see the module's doc).

    ``instances``: the hot instances' ids and what runs on each; ``kv_tokens``: each one's KV budget in
    tokens (0: not counted). An instance running nothing always has room."""
    best: tuple[int, int, str] | None = None
    for instance, running in instances.items():
        if len(running) >= max_num_seqs:
            continue
        room = kv_tokens - sum(s.context for s in running)
        if running and kv_tokens and room < tokens:
            continue
        key = (len(running), -room, instance)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def token_request(
    now: float,
    ttft_deadline: float,
    tpot_slo_s: float,
    tokens: int,
    model: TokenLatencyModel,
    *,
    instances: Mapping[str, Sequence[Seated]],
    waiting: int,
    max_num_seqs: int,
    kv_tokens: int,
    load_s: float = 0.0,
) -> TokenRequest:
    """Admission's view of a request of ``tokens`` prompt tokens arriving ``now``.

    ``instances``: the hot instances (none: the model is loading or cold, and starts after
    ``load_s``); ``waiting``: requests ahead of it, waiting for a seat."""
    base = TokenRequest(now, ttft_deadline, tpot_slo_s, tokens, context=tokens)
    if not instances:
        return TokenRequest(now, ttft_deadline, tpot_slo_s, tokens, context=tokens, wait_s=load_s)
    free = None if waiting else choose_seat(instances, tokens, max_num_seqs, kv_tokens)
    if free is not None:
        running = instances[free]
        context = (sum(s.context for s in running) + tokens) // (len(running) + 1)
        return TokenRequest(now, ttft_deadline, tpot_slo_s, tokens, len(running), context, idle=True)
    # Every seat is taken (or others wait first): it starts when enough running sequences end.
    ends = sorted(
        max(1, model.expected_completion(s.max_tokens) - s.completion_tokens) * model.predict_step(len(seqs), s.context)
        for seqs in instances.values()
        for s in seqs
    )
    if not ends:
        return base
    wait = ends[waiting] if waiting < len(ends) else ends[-1] * (waiting // len(ends) + 1)
    return TokenRequest(
        now, ttft_deadline, tpot_slo_s, tokens, max_num_seqs - 1, tokens, wait_s=wait, seat_free_s=ends[0]
    )
