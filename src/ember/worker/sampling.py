"""Picking a sequence's next token from its logits, with its own seeded generator.

Each sequence draws from its own ``torch.Generator``, seeded from its request's ``seed``, so the
tokens it gets do not depend on which other sequences shared its steps. ``temperature == 0`` is
greedy (the most likely token; ``top_p`` unused); otherwise the logits are divided by the
temperature and the smallest set of most likely tokens whose probability reaches ``top_p`` is
sampled from.
"""

from __future__ import annotations

import random

import torch

from ember.generation import SamplingParams

__all__ = ["TopLogprobs", "make_generator", "sample", "top_logprobs"]

#: The chosen token's log-probability, and the ``k`` most likely (token id, log-probability) pairs.
TopLogprobs = tuple[float, tuple[tuple[int, float], ...]]


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token for one sequence, from its logits (shape (vocab,))."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep each token whose predecessors' mass is below top_p (the first one always).
        keep = (cumulative - sorted_probs) < params.top_p
        kept = sorted_probs * keep
        pick = torch.multinomial(kept, 1, generator=generator)
        return int(order[pick].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> TopLogprobs:
    """``token``'s log-probability under the model's own distribution, and the ``k`` most likely."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    chosen = float(logprobs[token].item())
    if k <= 0:
        return chosen, ()
    values, ids = torch.topk(logprobs, k)
    return chosen, tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
