"""Generative models in the simulator: step times, the KV-cache budget, and one step's plan.

A generative instance runs iteration-level (continuous) batching, as vLLM does: every step is one
forward pass over the decoding sequences (one token each) and the prefill chunks that fit the step's
token budget; a sequence joins at the next step and leaves when its last token is out.

Step times (:class:`StepModel`):

* **Measured** (``profile: llama1b``): the H200 calibration's 1B Llama decode step at batch 1..64
  with a 512-token context (``decode_step_ms_ctx512``) and its prefill of 1, 4 and 16 prompts of
  512 tokens (``prefill512_ms``, read as 512, 2,048 and 8,192 tokens). The prefill of 2,048 tokens
  was measured faster than that of 512 (12.3 against 15.0 ms: a launch-bound eager step, the first
  one warming up), so each prefill point takes the cheapest measurement at that many tokens or more:
  more tokens never cost less. A decode step at another context adds (or saves) the KV-cache bytes
  it reads beyond 512 tokens a sequence, at the device's memory bandwidth.
* **Derived** (a model without a profile, such as an 8B one): a roofline. A step reads the weights
  once and each sequence's KV cache (memory time, ``HBM_BYTES_PER_S``) and does ``2 x params`` FLOPs
  a token (compute time, ``FP16_FLOPS``); it takes the larger of the two, plus ``overhead_s`` per
  step (what a real stack adds: kernel launches, sampling). Peak figures, so a lower bound on a real
  engine's step unless ``overhead_s`` says otherwise.

A step with both prefill and decode is one fused forward: it takes the larger of the decode step of
its decoding sequences and the prefill of all its tokens (at these sizes the measured steps are
launch-bound, so the two overlap rather than add).

The KV cache of an instance holds ``kv_budget_tokens`` tokens. A sequence reserves its whole prompt
when it joins the batch (``plan_step``) and grows one token per decode step; when the next decode
does not fit, the newest sequences are preempted (their cache dropped) and go back to the front of
the queue, to be recomputed (prompt + the tokens they already produced) when they rejoin: never
truncated. A request whose prompt and output cannot fit an instance at all is refused at arrival.

The plan of a step (:func:`plan_step`) and the admission rule (:func:`admit`) are pure functions of
frozen snapshots. They are the simulator's stand-ins for the platform's token scheduler
(``ember.policies.tokens``, issue 12's worker side) and its token admission (the serving side's
latency model extended to prefill tokens and decode batch size): where those exist, the engine's
glue (``ember.sim.generative``) calls them through these same two seams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ember.errors import InvalidInput
from ember.sim.calibration import Calibration, LatencyCurve

__all__ = [
    "CALIBRATED_CONTEXT_TOKENS",
    "FP16_FLOPS",
    "HBM_BYTES_PER_S",
    "AdmissionView",
    "GenSpec",
    "GenStats",
    "StepModel",
    "StepPlan",
    "StepView",
    "admit",
    "derived_step_model",
    "measured_step_model",
    "plan_step",
]

#: The context each sequence had in the calibration's decode steps, and the prompt length of its
#: prefill batches (the keys ``decode_step_ms_ctx512`` and ``prefill512_ms`` of ``h200.json``).
CALIBRATED_CONTEXT_TOKENS = 512
#: H200 memory bandwidth, 4.8 TB/s, and dense FP16/BF16 tensor throughput, 989 TFLOPS (without
#: sparsity): NVIDIA's H200 datasheet (https://www.nvidia.com/en-us/data-center/h200/). The
#: calibration file has neither figure.
HBM_BYTES_PER_S = 4.8e12
FP16_FLOPS = 989e12


@dataclass(frozen=True)
class StepModel:
    """Seconds of one step: ``decode`` at batch sizes (each sequence with ``context_tokens`` of cache),
    ``prefill`` at token counts, plus the KV-cache bytes a step reads beyond that context."""

    decode: LatencyCurve
    prefill: LatencyCurve
    kv_bytes_per_token: int
    context_tokens: int = CALIBRATED_CONTEXT_TOKENS
    #: Seconds below which no decode step goes, whatever its context: the weights read once.
    floor_s: float = 0.0
    bytes_per_s: float = HBM_BYTES_PER_S

    def decode_s(self, sequences: int, kv_tokens: int) -> float:
        """A decode step of ``sequences`` holding ``kv_tokens`` of cache between them."""
        if sequences <= 0:
            return 0.0
        extra = (kv_tokens - sequences * self.context_tokens) * self.kv_bytes_per_token / self.bytes_per_s
        return max(self.decode.batch_s(sequences) + extra, self.floor_s)

    def prefill_s(self, tokens: int) -> float:
        return self.prefill.batch_s(tokens) if tokens > 0 else 0.0

    def step_s(self, decoding: int, kv_tokens: int, prefill_tokens: int) -> float:
        """One fused step: ``decoding`` sequences decode (reading ``kv_tokens``) and ``prefill_tokens`` prefill."""
        decode = self.decode_s(decoding, kv_tokens)
        if prefill_tokens <= 0:
            return decode
        return max(decode, self.prefill_s(prefill_tokens + decoding))


def measured_step_model(cal: Calibration, profile: str, kv_bytes_per_token: int, weights_bytes: int) -> StepModel:
    """The step model of calibrated profile ``profile`` (``llama1b``: ``llama1b_decode`` and ``llama1b_prefill``)."""
    decode, prefill = cal.profile(f"{profile}_decode"), cal.profile(f"{profile}_prefill")
    tokens = [b * CALIBRATED_CONTEXT_TOKENS for b in prefill.batch_sizes]
    seconds = list(prefill.seconds)
    for i in range(len(seconds) - 2, -1, -1):  # more tokens never cost less: the cheapest at >= that many
        seconds[i] = min(seconds[i], seconds[i + 1])
    curve = LatencyCurve(f"{profile}_prefill_tokens", tuple(tokens), tuple(seconds), prefill.params)
    return StepModel(decode, curve, kv_bytes_per_token, floor_s=weights_bytes / HBM_BYTES_PER_S)


def derived_step_model(params: int, weights_bytes: int, kv_bytes_per_token: int, overhead_s: float) -> StepModel:
    """A roofline step model for a model the calibration did not measure (see the module's docstring)."""
    if params <= 0 or weights_bytes <= 0 or overhead_s < 0:
        raise InvalidInput("a derived step model needs params > 0, weights > 0 and overhead >= 0")
    weights_s = weights_bytes / HBM_BYTES_PER_S
    sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

    def at(tokens: int, kv_tokens: int) -> float:
        memory = weights_s + kv_tokens * kv_bytes_per_token / HBM_BYTES_PER_S
        return overhead_s + max(memory, 2.0 * params * tokens / FP16_FLOPS)

    # Decode at the calibrated context (decode_s adds the rest); prefill reads no cache beyond its own.
    decode = LatencyCurve("derived_decode", sizes, tuple(at(b, b * CALIBRATED_CONTEXT_TOKENS) for b in sizes), params)
    prefill = LatencyCurve("derived_prefill", sizes, tuple(at(t, 0) for t in sizes), params)
    return StepModel(decode, prefill, kv_bytes_per_token, floor_s=overhead_s + weights_s)


@dataclass(frozen=True)
class GenSpec:
    """What makes a model generative in the simulator: its objectives, limits and step model."""

    ttft_slo_s: float
    tpot_slo_s: float
    max_num_seqs: int
    max_model_len: int
    kv_budget_tokens: int
    step: StepModel
    #: Tokens one step processes at most (decode tokens first, then prefill chunks): chunked prefill.
    step_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.ttft_slo_s <= 0 or self.tpot_slo_s <= 0:
            raise InvalidInput("TTFT and TPOT objectives must be positive")
        if min(self.max_num_seqs, self.max_model_len, self.kv_budget_tokens, self.step_tokens) < 1:
            raise InvalidInput("max_num_seqs, max_model_len, the KV budget and step tokens must be >= 1")

    def fits(self, prompt_tokens: int, output_tokens: int) -> bool:
        """Whether a request can ever finish on one instance: within the model's length and the KV budget."""
        total = prompt_tokens + output_tokens
        return total <= self.max_model_len and total - 1 <= self.kv_budget_tokens


@dataclass
class GenStats:
    """What a run measured of its generative requests (``RunResult.generative``)."""

    #: Per request served: time to first token, and time per output token after it (requests of
    #: one output token have none), in seconds.
    ttft_s: list[float]
    tpot_s: list[float]
    requests: int = 0
    #: Refused at arrival (by admission, or too long: ``too_long`` of them).
    refused: int = 0
    ttft_met: int = 0
    tpot_met: int = 0
    #: Served meeting both objectives (goodput's numerator).
    both_met: int = 0
    #: Refused at arrival because prompt + output cannot fit the model's length or an instance's KV cache.
    too_long: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0
    preemptions: int = 0


@dataclass(frozen=True)
class StepView:
    """An instance between steps, as the planner sees it."""

    #: Sequences that decode this step (their prefill is done), and the cache they hold.
    decoding: int
    kv_used: int
    kv_budget: int
    max_seqs: int
    step_tokens: int
    #: Tokens still to prefill of each sequence in the batch mid-prefill, in the order they joined.
    prefilling: tuple[int, ...]
    #: The tokens each queued sequence would prefill (prompt + tokens it produced before a
    #: preemption), in queue order; only the first few the step could take.
    waiting: tuple[int, ...]
    #: Cache each running sequence holds, newest first (the preemption order): prefilling ones hold
    #: their whole reservation.
    held_newest_first: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepPlan:
    #: How many of the newest running sequences to preempt before the step.
    preempt: int
    #: Prefill tokens this step for each sequence mid-prefill still running after the preemption (in order).
    chunks: tuple[int, ...]
    #: Prefill tokens this step for each of the first ``len(admit)`` queued sequences, which join the batch.
    admit: tuple[int, ...]


def plan_step(view: StepView) -> StepPlan:
    """One step under the token budget: every decoding sequence decodes, then prefill chunks fill the
    rest, first those already in the batch, then queued ones in order while a sequence slot and the
    KV cache (their whole prefill reserved) have room. When the decodes do not fit the cache, the
    newest sequences are preempted until they do (vLLM's recompute preemption), and the step then
    admits no queued sequence."""
    decoding, kv = view.decoding, view.kv_used
    preempt = 0
    prefilling = list(view.prefilling)
    held = view.held_newest_first
    while kv + decoding > view.kv_budget and preempt < len(held):
        kv -= held[preempt]
        preempt += 1
        # The newest ones are prefilling ones (they joined last) or else decoding ones.
        if prefilling:
            prefilling.pop()
        else:
            decoding -= 1
    left = view.step_tokens - decoding
    chunks = []
    for need in prefilling:
        take = min(need, max(left, 0))
        chunks.append(take)
        left -= take
    admit: list[int] = []
    seqs = decoding + len(prefilling)
    kv += decoding
    for need in () if preempt else view.waiting:  # a step that preempts admits nobody (vLLM's rule): no thrash
        if left <= 0 or seqs >= view.max_seqs or kv + need > view.kv_budget:
            break
        admit.append(min(need, left))
        left -= admit[-1]
        kv += need
        seqs += 1
    return StepPlan(preempt, tuple(chunks), tuple(admit))


@dataclass(frozen=True)
class AdmissionView:
    """A generative request at arrival, and what its model has ahead of it."""

    now: float
    ttft_deadline: float
    prompt_tokens: int
    #: Seconds before an instance could start a step (a load still ahead of it), as for one-shot admission.
    start_delay_s: float
    #: Tokens queued ahead of it to prefill, across the model's instances.
    queued_tokens: int
    #: Instances up (ready or loading), and the sequences and cache the least loaded one holds.
    instances: int
    running: int
    kv_tokens: int
    max_seqs: int
    tpot_slo_s: float


def admit(view: AdmissionView, step: StepModel, step_tokens: int) -> bool:
    """Admit when the predicted TTFT (start delay + the prefill queued ahead, spread over the instances,
    + its own prefill, in steps of ``step_tokens`` beside the running decodes) meets its deadline, and
    the least loaded instance's decode step with it added stays within the TPOT objective.

    Predictions come from the step model, not from what was served, so a refusal lasts only while
    the queue or the load that caused it does."""
    instances = max(view.instances, 1)
    ahead = view.queued_tokens / instances + view.prompt_tokens
    steps = max(1, math.ceil(ahead / step_tokens))
    per_step = step.step_s(view.running, view.kv_tokens, min(math.ceil(ahead), step_tokens))
    ttft = view.start_delay_s + steps * per_step
    if view.now + ttft > view.ttft_deadline:
        return False
    if view.running >= view.max_seqs:
        return True  # it waits for a slot; the TTFT prediction above already counts the queue
    decode = step.decode_s(view.running + 1, view.kv_tokens + view.prompt_tokens)
    return decode <= view.tpot_slo_s
