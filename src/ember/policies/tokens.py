"""Token scheduling: what one step of a generative model computes, for which sequences.

The worker's engine hands :func:`schedule_step` a :class:`StepState` (the running sequences and the
waiting queue, both in arrival order, with how many of each one's tokens the KV cache already
holds) and gets back a :class:`StepPlan`: how many tokens each sequence computes this step, which
waiting sequences join, which running ones are preempted. The engine runs the step, samples a
token for every sequence whose tokens are all computed, and asks again. The policy is a pure
function: no clock, no I/O, no model.

A sequence has ``num_tokens`` (its prompt, plus what it has generated so far) of which
``num_computed`` have keys and values in the cache. A step computes ``num_tokens - num_computed``
of them, or a chunk: one for a decoding sequence, a slice of the prompt for one in prefill.

Decision rule:

1. *Running sequences, oldest first.* Each decoding sequence computes its one token. A sequence in
   prefill computes the next chunk of its prompt: as many tokens as the step budget leaves after
   reserving one for every decoding sequence not yet served, so a long prompt never stalls
   anyone's decode (chunked prefill).
2. *KV budget, counted in tokens.* The tokens a step computes stay in the cache. When the cache has
   no room for a sequence's tokens, the newest running sequence is preempted (all its cache freed;
   it goes back to the head of the waiting queue and is recomputed from its prompt and the tokens
   it already generated when it runs again, never truncated). The oldest sequence is never
   preempted for a younger one, so it always progresses.
3. *Admission, first come first served.* When no sequence was preempted this step, the head of
   the waiting queue joins while fewer than ``max_num_seqs`` run, the step budget has tokens left
   and the cache has room for the whole of its ``num_tokens`` beside what the running prefills
   still need. The queue is never passed over: if its head cannot join, nobody behind it does.

Preconditions (the engine's): ``max_step_tokens >= max_num_seqs`` (every decode fits a step) and
no sequence grows past ``kv_capacity_tokens`` (its length limit is at most the cache), so the
oldest sequence always fits alone and every admitted sequence finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SeqView", "StepPlan", "StepState", "TokenBudget", "schedule_step"]


@dataclass(frozen=True)
class TokenBudget:
    """The limits of one model instance: sequences at once, tokens per step, KV-cache tokens."""

    max_num_seqs: int
    max_step_tokens: int
    kv_capacity_tokens: int

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs is {self.max_num_seqs}; it must be at least 1")
        if self.max_step_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_step_tokens ({self.max_step_tokens}) must be at least max_num_seqs ({self.max_num_seqs}): "
                "every running sequence decodes a token each step"
            )
        if self.kv_capacity_tokens < 2:
            raise ValueError(f"kv_capacity_tokens is {self.kv_capacity_tokens}; a sequence needs at least 2")


@dataclass(frozen=True)
class SeqView:
    """One sequence as the policy sees it. ``seq_id`` orders arrivals: lower came first."""

    seq_id: int
    num_tokens: int
    num_computed: int = 0

    @property
    def remaining(self) -> int:
        """Tokens to compute before the next one can be sampled (1 while decoding)."""
        return self.num_tokens - self.num_computed


@dataclass(frozen=True)
class StepState:
    """The engine's sequences before a step. ``running`` and ``waiting`` are in arrival order; a
    waiting sequence holds no cache (``num_computed`` is 0 for it)."""

    running: tuple[SeqView, ...]
    waiting: tuple[SeqView, ...]
    budget: TokenBudget


@dataclass(frozen=True)
class StepPlan:
    """What to compute this step.

    ``chunks``: (seq_id, tokens) per sequence that computes, running ones first, oldest first, then
    the admitted. ``admitted``: waiting sequences that join (a prefix of the queue). ``preempted``:
    running sequences to stop and send back to the waiting queue with their cache freed.
    """

    chunks: tuple[tuple[int, int], ...]
    admitted: tuple[int, ...] = ()
    preempted: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


def schedule_step(state: StepState) -> StepPlan:
    """The plan for the next step (see the module's decision rule)."""
    budget = state.budget
    running = list(state.running)
    kv_used = sum(s.num_computed for s in running)
    step_left = budget.max_step_tokens
    decodes_left = sum(1 for s in running if s.remaining == 1)
    chunks: list[tuple[int, int]] = []
    preempted: list[int] = []
    i = 0
    while i < len(running):
        seq = running[i]
        decoding = seq.remaining == 1
        if decoding:
            decodes_left -= 1
            want = 1
        else:
            want = min(seq.remaining, step_left - decodes_left)
        while want > 0 and kv_used + want > budget.kv_capacity_tokens:
            if not decoding and kv_used < budget.kv_capacity_tokens:
                want = budget.kv_capacity_tokens - kv_used  # a smaller chunk fits
                break
            victim = running.pop()  # the newest: never an older one for a younger
            preempted.append(victim.seq_id)
            kv_used -= victim.num_computed
            if victim is seq:
                want = 0
            elif victim.remaining == 1:
                decodes_left -= 1
        if i == len(running):
            break  # ``seq`` preempted itself: it was the newest
        if want > 0:
            chunks.append((seq.seq_id, want))
            kv_used += want
            step_left -= want
        i += 1
    admitted: list[int] = []
    if not preempted:
        # Cache the running prefills still need after this step: theirs before a newcomer's.
        still_needed = sum(s.remaining for s in running) - sum(n for _, n in chunks)
        seats = budget.max_num_seqs - len(running)
        for seq in state.waiting:
            if seats == 0 or step_left == 0:
                break
            if kv_used + still_needed + seq.num_tokens > budget.kv_capacity_tokens:
                break
            want = min(seq.remaining, step_left)
            admitted.append(seq.seq_id)
            chunks.append((seq.seq_id, want))
            kv_used += want
            still_needed += seq.remaining - want
            step_left -= want
            seats -= 1
    return StepPlan(tuple(chunks), tuple(admitted), tuple(preempted))
