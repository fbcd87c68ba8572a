"""The generative engine of one loaded model: its sequences, and the step loop's single step.

``add`` tokenizes a request and queues its sequence; ``step`` asks the token scheduler
(:mod:`ember.policies.tokens`) what to compute, runs the model's ``step`` once for all of it,
samples a token for every sequence whose tokens are all computed, and returns the chunks of text
that step produced; ``cancel`` drops a sequence and frees its cache at once. The worker's main loop
calls ``step`` while there is work, reading its socket between steps, so a new sequence joins at
the next step and a finished one leaves at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ember.api import GenerativeModel, SeqChunk
from ember.errors import InvalidInput
from ember.generation import FinishReason, GenerateRequest, TokenChunk
from ember.policies.tokens import SeqView, StepState, TokenBudget, schedule_step
from ember.worker.sampling import make_generator, sample, top_logprobs
from ember.worker.textstream import TextStream

__all__ = ["DEFAULT_MAX_STEP_TOKENS", "GenerationEngine"]

#: Tokens one step computes at most (prefill chunks and decodes together), unless the Load says.
DEFAULT_MAX_STEP_TOKENS = 256


@dataclass
class _Sequence:
    seq_id: int
    request: GenerateRequest
    prompt_ids: list[int]
    generator: torch.Generator
    text: TextStream
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    #: Tokens (and their logprobs) generated since the last chunk sent.
    unsent_ids: list[int] = field(default_factory=list)
    unsent_logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] = field(default_factory=list)
    prompt_reported: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]


class GenerationEngine:
    """Continuous batching for one generative model (see the module docstring)."""

    def __init__(
        self,
        model: GenerativeModel,
        max_num_seqs: int = 16,
        max_model_len: int | None = None,
        kv_budget_bytes: int = 0,
        max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS,
    ) -> None:
        """``max_model_len``: the deployment's limit (None: the model's own; never above it).
        ``kv_budget_bytes``: the cache's budget (0: room for ``max_num_seqs`` full-length sequences)."""
        info = model.generation_info()
        limit = min(info.max_model_len, max_model_len or info.max_model_len)
        capacity = max_num_seqs * limit
        if kv_budget_bytes > 0:
            capacity = kv_budget_bytes // max(1, info.kv_bytes_per_token)
            if capacity < 2:
                raise ValueError(f"a KV budget of {kv_budget_bytes} bytes holds {capacity} tokens; raise it")
        self.model = model
        #: The longest prompt + output: a sequence never outgrows the cache, so it is never truncated.
        self.max_model_len = min(limit, capacity)
        self.budget = TokenBudget(max_num_seqs, max(max_step_tokens, max_num_seqs), capacity)
        self._running: list[_Sequence] = []
        self._waiting: list[_Sequence] = []
        self._by_id: dict[int, _Sequence] = {}
        self.preemptions = 0

    # -- sequences ---------------------------------------------------------------------------------

    def add(self, seq_id: int, request: GenerateRequest) -> int:
        """Queue a sequence; returns its prompt's tokens. Raises InvalidInput for a request that can
        never run: an empty prompt, one at or over the length limit, or bad sampling parameters."""
        params = request.params
        if params.max_tokens < 1:
            raise InvalidInput(f"max_tokens is {params.max_tokens}; ask for at least 1 token")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise InvalidInput(
                f"temperature {params.temperature} and top_p {params.top_p}: use temperature >= 0 and 0 < top_p <= 1"
            )
        if request.messages is not None:
            prompt_ids = list(self.model.chat(request.messages))
        else:
            prompt_ids = list(self.model.tokenize(request.prompt or ""))
        if not prompt_ids:
            raise InvalidInput("the prompt is empty; send at least one token of text")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidInput(
                f"the prompt is {len(prompt_ids)} tokens; this model takes at most {self.max_model_len - 1} "
                f"(max_model_len {self.max_model_len}, prompt and output together). Shorten the prompt"
            )
        seq = _Sequence(
            seq_id,
            request,
            prompt_ids,
            make_generator(params.seed),
            TextStream(self.model.detokenize, params.stop),
        )
        self._by_id[seq_id] = seq
        self._waiting.append(seq)
        return len(prompt_ids)

    def cancel(self, seq_id: int) -> bool:
        """Drop a sequence and free its cache now; False if it had already finished."""
        seq = self._by_id.pop(seq_id, None)
        if seq is None:
            return False
        if seq in self._running:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self.model.release(seq_id)
        return True

    def cancel_all(self) -> list[int]:
        """Drop every sequence (the model failed, or is being unloaded); their ids."""
        ids = list(self._by_id)
        for seq_id in ids:
            self.cancel(seq_id)
        return ids

    @property
    def has_work(self) -> bool:
        return bool(self._by_id)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_tokens(self) -> int:
        """Tokens whose keys and values the cache holds now."""
        return sum(s.num_computed for s in self._running)

    # -- the step ----------------------------------------------------------------------------------

    def step(self) -> list[tuple[int, TokenChunk]]:
        """Run one step; the chunks it produced, by sequence id (a sequence's last has a finish_reason)."""
        state = StepState(
            tuple(SeqView(s.seq_id, s.num_tokens, s.num_computed) for s in self._running),
            tuple(SeqView(s.seq_id, s.num_tokens) for s in self._waiting),
            self.budget,
        )
        plan = schedule_step(state)
        for seq_id in plan.preempted:
            seq = self._by_id[seq_id]
            self._running.remove(seq)
            self.model.release(seq_id)
            seq.num_computed = 0
            self._waiting.append(seq)
            self.preemptions += 1
        self._waiting.sort(key=lambda s: s.seq_id)
        for seq_id in plan.admitted:
            seq = self._by_id[seq_id]
            self._waiting.remove(seq)
            self._running.append(seq)
        if not plan.chunks:
            return []
        chunks = []
        for seq_id, n in plan.chunks:
            seq = self._by_id[seq_id]
            start = seq.num_computed
            chunks.append(SeqChunk(seq_id, tuple(seq.token(p) for p in range(start, start + n)), start))
        with torch.inference_mode():
            logits = self.model.step(chunks)
        out: list[tuple[int, TokenChunk]] = []
        for row, chunk in enumerate(chunks):
            seq = self._by_id[chunk.seq_id]
            seq.num_computed += len(chunk.token_ids)
            if seq.num_computed == seq.num_tokens:
                produced = self._advance(seq, logits[row])
                if produced is not None:
                    out.append((seq.seq_id, produced))
        return out

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> TokenChunk | None:
        params = seq.request.params
        token = sample(logits, params, seq.generator)
        seq.output_ids.append(token)
        seq.unsent_ids.append(token)
        if params.logprobs is not None:
            seq.unsent_logprobs.append(top_logprobs(logits, token, params.logprobs))
        reason: FinishReason | None = None
        if token in self.model.eos_token_ids and not params.ignore_eos:
            reason = "stop"
            text = seq.text.flush()
        else:
            text = seq.text.push(token)
            if seq.text.stopped:
                reason = "stop"
            elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
                text += seq.text.flush()
        if reason is None and not text:
            return None  # held back: a broken character or a possible stop string
        if reason is not None:
            self.cancel(seq.seq_id)
        return self._chunk(seq, text, reason)

    def _chunk(self, seq: _Sequence, text: str, reason: FinishReason | None) -> TokenChunk:
        ids, seq.unsent_ids = tuple(seq.unsent_ids), []
        logprobs: tuple[float, ...] | None = None
        top: tuple[tuple[tuple[str, float], ...], ...] | None = None
        texts: tuple[str, ...] = ()
        if seq.request.params.logprobs is not None:
            detok = self.model.detokenize
            logprobs = tuple(lp for lp, _ in seq.unsent_logprobs)
            top = tuple(tuple((detok([i]), v) for i, v in alts) for _, alts in seq.unsent_logprobs)
            texts = tuple(detok([i]) for i in ids)
            seq.unsent_logprobs = []
        first = not seq.prompt_reported
        seq.prompt_reported = True
        return TokenChunk(
            text,
            token_ids=ids,
            prompt_tokens=len(seq.prompt_ids) if first else 0,
            completion_tokens=len(seq.output_ids),
            finish_reason=reason,
            logprobs=logprobs,
            top_logprobs=top,
            token_texts=texts,
        )
