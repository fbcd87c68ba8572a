"""The token latency model of a generative model: prefill by prompt tokens, decode steps by batch and context.

A generative request is judged by two latencies: time to first token (queue + load if not hot +
prefill of its prompt) and time per output token (the decode step of the batch it runs in). This
model predicts both from what the model's own streams measured, with the same rules as the one-shot
:class:`~ember.policies.latency.LatencyModel`, which it is built from:

- Prefill: a ``LatencyModel`` whose "rows" are prompt tokens (power-of-two token buckets, a windowed
  p90 per bucket, monotone in the token count).
- Decode step: one ``LatencyModel`` per context bucket (the mean tokens a running sequence holds,
  in buckets growing 4x: 1, 2-4, 5-16, 17-64, ...) whose "rows" are the sequences in the batch. A
  prediction is monotone in both: the largest among the buckets of no more context, or, for a
  context bucket not measured, the next larger measured one (conservative). With nothing measured
  per context, the steps of every context together (``steps``) answer.
- Loads: ``steps`` also keeps the load times per tier, as a one-shot model's latency model does, so
  the controller's keep-alive and promotion read a generative model exactly as a one-shot one.

What a refusal may count on (``admission_prefill_s``, ``admission_step_s``) is, as for one-shot
models, the lower of the bucket's quantile and its newest measurement, and nothing for a bucket no
real request measured: one good run restores admission, a guess never refuses, and the deploy-time
warm-up (synthetic prompts) shapes predictions without justifying a refusal. Each refusal is counted
on the bucket that justified it (``observe_refusal_*``) so admission can tell when to probe.

It also learns how many tokens a prompt's UTF-8 bytes make (the gateway knows bytes, the worker's
tokenizer knows tokens; a stream's first chunk says how many the prompt had) and how long answers
typically are (how long a running sequence is expected to hold its seat): both windowed medians.

The model is a frozen value: ``observe_*`` returns a new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ember.policies._frozen import evolve
from ember.policies.latency import LatencyModel, windowed_quantile
from ember.policies.tiers import Tier

__all__ = ["DEFAULT_TOKENS_PER_BYTE", "TokenLatencyModel", "context_bucket"]

#: Tokens per UTF-8 byte of prompt text assumed before any stream said (about 4 bytes per token in
#: English text, plus room for a chat template's own tokens).
DEFAULT_TOKENS_PER_BYTE = 0.3
#: Samples kept for the bytes -> tokens ratio and the answers' lengths.
RATIO_WINDOW = 64


def context_bucket(tokens: int) -> int:
    """The context bucket of ``tokens`` per sequence: buckets grow 4x (1 -> 0, 2..4 -> 1, 5..16 -> 2, ...)."""
    bucket, top = 0, 1
    while top < tokens:
        top *= 4
        bucket += 1
    return bucket


@dataclass(frozen=True)
class TokenLatencyModel:
    """Prefill by prompt tokens, decode steps by batch size and context, loads, and the prompt ratio."""

    #: Prefill seconds; "rows" are prompt tokens.
    prefill: LatencyModel = field(default_factory=LatencyModel)
    #: Context bucket -> decode step seconds by batch size (sequences); sorted by bucket.
    decode: tuple[tuple[int, LatencyModel], ...] = ()
    #: Every decode step by batch size whatever its context, and the loads per tier.
    steps: LatencyModel = field(default_factory=LatencyModel)
    #: Newest tokens-per-byte ratios of prompts, and lengths of finished answers (in tokens).
    ratios: tuple[float, ...] = ()
    completions: tuple[int, ...] = ()

    # -- observations ------------------------------------------------------------------------------

    def observe_prefill(
        self, tokens: int, seconds: float, at: float = -math.inf, *, warmup: bool = False
    ) -> TokenLatencyModel:
        """One more prompt of ``tokens`` whose first token came ``seconds`` after it was sent."""
        return evolve(self, prefill=self.prefill.observe_batch(tokens, seconds, at, warmup=warmup))

    def observe_step(
        self, batch: int, context: int, seconds: float, at: float = -math.inf, *, warmup: bool = False
    ) -> TokenLatencyModel:
        """One more decode step of ``batch`` sequences holding ``context`` tokens each on average."""
        if batch < 1 or not math.isfinite(seconds) or seconds < 0:
            return self
        bucket = context_bucket(context)
        decode = dict(self.decode)
        decode[bucket] = decode.get(bucket, LatencyModel()).observe_batch(batch, seconds, at, warmup=warmup)
        steps = self.steps.observe_batch(batch, seconds, at, warmup=warmup)
        return evolve(self, decode=tuple(sorted(decode.items())), steps=steps)

    def observe_prompt(self, num_bytes: int, tokens: int) -> TokenLatencyModel:
        """A prompt of ``num_bytes`` UTF-8 bytes was ``tokens`` tokens (chat template included)."""
        if num_bytes < 1 or tokens < 1:
            return self
        return evolve(self, ratios=(*self.ratios[-(RATIO_WINDOW - 1) :], tokens / num_bytes))

    def observe_completion(self, tokens: int) -> TokenLatencyModel:
        """An answer ended after ``tokens`` tokens."""
        if tokens < 1:
            return self
        return evolve(self, completions=(*self.completions[-(RATIO_WINDOW - 1) :], tokens))

    def observe_load(self, tier: Tier, seconds: float) -> TokenLatencyModel:
        return evolve(self, steps=self.steps.observe_load(tier, seconds))

    def observe_refusal_prefill(self, tokens: int) -> TokenLatencyModel:
        """A request was refused on the prefill evidence of ``tokens``."""
        return evolve(self, prefill=self.prefill.observe_refusal(tokens))

    def observe_refusal_step(self, batch: int, context: int) -> TokenLatencyModel:
        """A request was refused on the decode evidence of ``batch`` sequences at ``context`` tokens."""
        bucket = context_bucket(context)
        decode = tuple((b, m.observe_refusal(batch) if b == bucket else m) for b, m in self.decode)
        return evolve(self, decode=decode)

    # -- predictions -------------------------------------------------------------------------------

    def prompt_tokens(self, num_bytes: int) -> int:
        """Predicted tokens of a prompt of ``num_bytes`` bytes: the median measured ratio (at least one)."""
        ratio = windowed_quantile(self.ratios, 0.5) if self.ratios else DEFAULT_TOKENS_PER_BYTE
        return max(1, math.ceil(ratio * num_bytes))

    def expected_completion(self, max_tokens: int) -> int:
        """Tokens an answer allowed ``max_tokens`` is expected to take: the median answer, capped."""
        if not self.completions:
            return max(1, max_tokens)
        return max(1, min(max_tokens, int(windowed_quantile(tuple(float(c) for c in self.completions), 0.5))))

    def predict_prefill(self, tokens: int) -> float:
        return self.prefill.predict(tokens)

    def predict_step(self, batch: int, context: int) -> float:
        """Predicted seconds of a decode step of ``batch`` sequences at ``context`` tokens each."""
        if not self.decode:
            return self.steps.predict(batch)
        bucket = context_bucket(context)
        value = 0.0
        borrowed: float | None = None
        for known, model in self.decode:
            if known <= bucket:
                value = max(value, model.predict(batch))
            elif borrowed is None:  # the next larger measured context: conservative for one not measured
                borrowed = model.predict(batch)
        if all(known != bucket for known, _ in self.decode) and borrowed is not None:
            value = max(value, borrowed)
        return value

    def admission_prefill_s(self, tokens: int) -> float:
        """The prefill seconds a refusal may count on (0 for a size no real request measured)."""
        return self.prefill.admission_s(tokens)

    def admission_step_s(self, batch: int, context: int) -> float:
        """The step seconds a refusal may count on: that context bucket's own evidence only."""
        model = self._decode(context)
        return 0.0 if model is None else model.admission_s(batch)

    def prefill_probe_due(self, tokens: int, now: float, after_s: float, after_refusals: int) -> bool:
        return self.prefill.probe_due(tokens, now, after_s, after_refusals)

    def step_probe_due(self, batch: int, context: int, now: float, after_s: float, after_refusals: int) -> bool:
        model = self._decode(context)
        return model is None or model.probe_due(batch, now, after_s, after_refusals)

    def newest_prefill(self, tokens: int) -> tuple[float, float] | None:
        return self.prefill.newest(tokens)

    def newest_step(self, batch: int, context: int) -> tuple[float, float] | None:
        model = self._decode(context)
        return None if model is None else model.newest(batch)

    def _decode(self, context: int) -> LatencyModel | None:
        bucket = context_bucket(context)
        for known, model in self.decode:
            if known == bucket:
                return model
        return None
