"""The generative engine with a toy byte-level model: batching, preemption, sampling, stop strings, text."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from ember.api import GenerativeModel, SeqChunk
from ember.errors import InvalidInput
from ember.generation import ChatMessage, GenerateRequest, GenerationInfo, SamplingParams, TokenChunk
from ember.worker.generation import GenerationEngine

EOS = 256
ANSWER = "héllo wörld, the end"


class ToyLM(GenerativeModel):
    """Bytes are tokens. After a prompt's ``|``, it says ANSWER then EOS (greedy); its logits are
    otherwise a pseudo-random function of the sequence's whole history. It checks that every step
    continues each sequence's cache exactly where it left off."""

    eos_token_ids = (EOS,)

    def __init__(self, max_model_len: int = 64) -> None:
        self.max_model_len = max_model_len
        self.cache: dict[int, list[int]] = {}
        self.steps: list[list[tuple[int, int]]] = []

    def generation_info(self) -> GenerationInfo:
        return GenerationInfo(self.max_model_len, kv_bytes_per_token=8, vocab_size=257)

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.tokenize("".join(f"<{m.role}>{m.content}" for m in messages) + "|")

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t != EOS).decode(errors="replace")

    def step(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        self.steps.append([(c.seq_id, len(c.token_ids)) for c in chunks])
        rows = []
        for chunk in chunks:
            history = self.cache.setdefault(chunk.seq_id, [])
            assert chunk.start == len(history), "a step must continue the sequence's cache"
            history.extend(chunk.token_ids)
            rows.append(self._logits(history))
        return torch.stack(rows)

    def release(self, seq_id: int) -> None:
        self.cache.pop(seq_id, None)

    def _logits(self, history: list[int]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(hash(tuple(history)) % (1 << 62))
        logits = torch.randn(257, generator=generator, dtype=torch.float64)
        if ord("|") in history:
            said = len(history) - 1 - history.index(ord("|"))
            answer = ANSWER.encode()
            logits[answer[said] if said < len(answer) else EOS] += 100.0
        return logits


def _req(prompt: str = "q|", **params: object) -> GenerateRequest:
    merged: dict[str, object] = {"max_tokens": 100, "temperature": 0.0, **params}
    return GenerateRequest(SamplingParams(**merged), prompt=prompt)  # type: ignore[arg-type]


def _drain(engine: GenerationEngine) -> dict[int, list[TokenChunk]]:
    out: dict[int, list[TokenChunk]] = {}
    for _ in range(10_000):
        if not engine.has_work:
            return out
        for seq_id, chunk in engine.step():
            out.setdefault(seq_id, []).append(chunk)
    raise AssertionError("the engine never finished")


def _text(chunks: list[TokenChunk]) -> str:
    return "".join(c.text for c in chunks)


def test_greedy_answer_with_usage_and_eos() -> None:
    engine = GenerationEngine(ToyLM(), max_num_seqs=4)
    assert engine.add(1, _req("abc|")) == 4
    chunks = _drain(engine)[1]
    assert _text(chunks) == ANSWER
    assert chunks[0].prompt_tokens == 4
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens == len(ANSWER.encode()) + 1  # the EOS counts
    assert all("\ufffd" not in c.text for c in chunks)  # é and ö are two bytes each: held, then sent whole


def test_max_tokens_and_model_length_end_with_length() -> None:
    engine = GenerationEngine(ToyLM(max_model_len=12), max_num_seqs=2)
    engine.add(1, _req("ab|", max_tokens=3))
    engine.add(2, _req("abcdef|"))
    out = _drain(engine)
    assert out[1][-1].finish_reason == "length" and out[1][-1].completion_tokens == 3
    assert out[2][-1].finish_reason == "length" and out[2][-1].completion_tokens == 12 - 7
    assert _text(out[1]) == "hé"  # 3 bytes: h, then é's two


def test_stop_strings_are_held_back_and_cut() -> None:
    engine = GenerationEngine(ToyLM(), max_num_seqs=2)
    engine.add(1, _req(stop=("ld,", "zzz")))
    engine.add(2, _req(stop=("wör",), ignore_eos=True, max_tokens=40))
    out = _drain(engine)
    assert _text(out[1]) == "héllo wör" and out[1][-1].finish_reason == "stop"
    assert _text(out[2]) == "héllo " and out[2][-1].finish_reason == "stop"
    assert all(not c.text.endswith("w") for c in out[2])  # "w" was held until "wör" was decided


def test_ignore_eos_runs_to_max_tokens() -> None:
    engine = GenerationEngine(ToyLM(), max_num_seqs=1)
    engine.add(1, _req(ignore_eos=True, max_tokens=30))
    chunks = _drain(engine)[1]
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 30


def test_chat_and_bad_requests() -> None:
    engine = GenerationEngine(ToyLM(max_model_len=16), max_num_seqs=2)
    engine.add(1, GenerateRequest(SamplingParams(max_tokens=5, temperature=0), messages=(ChatMessage("user", "hi"),)))
    assert _text(_drain(engine)[1]) == "héll"
    with pytest.raises(InvalidInput, match="max_model_len 16"):
        engine.add(2, _req("x" * 16))
    with pytest.raises(InvalidInput, match="empty"):
        engine.add(3, _req(""))
    with pytest.raises(InvalidInput, match="top_p"):
        engine.add(4, _req(top_p=0.0))
    assert not engine.has_work


def test_seeded_sampling_does_not_depend_on_batch_mates() -> None:
    def run(mates: int, order: int) -> list[int]:
        engine = GenerationEngine(ToyLM(max_model_len=200), max_num_seqs=8, max_step_tokens=16)
        rng = random.Random(order)
        ids = list(range(mates + 1))
        rng.shuffle(ids)
        for i in ids:
            prompt = "sampled" if i == 0 else "mate" * rng.randint(1, 9)
            engine.add(i, _req(prompt, temperature=0.8, top_p=0.9, seed=7 if i == 0 else i, max_tokens=20))
        return [t for c in _drain(engine)[0] for t in c.token_ids]

    alone = run(0, 0)
    assert len(alone) == 20
    assert run(5, 1) == alone
    assert run(7, 2) == alone


def test_preemption_recomputes_and_never_truncates() -> None:
    model = ToyLM(max_model_len=40)
    engine = GenerationEngine(model, max_num_seqs=4, kv_budget_bytes=8 * 50, max_step_tokens=8)
    for i in range(4):
        engine.add(i, _req(f"p{i}|", ignore_eos=True, max_tokens=30))
    out = _drain(engine)
    assert engine.preemptions > 0
    for i in range(4):
        assert out[i][-1].completion_tokens == 30 and out[i][-1].finish_reason == "length"
        assert _text(out[i]).startswith(ANSWER)
    assert model.cache == {}  # every sequence's cache was released
    assert all(sum(n for _, n in step) <= 8 for step in model.steps)


def test_cancel_frees_the_cache_at_once() -> None:
    model = ToyLM()
    engine = GenerationEngine(model, max_num_seqs=2)
    engine.add(1, _req())
    engine.add(2, _req())
    engine.step()
    engine.step()
    assert set(model.cache) == {1, 2}
    assert engine.cancel(1)
    assert set(model.cache) == {2} and engine.num_running == 1
    assert not engine.cancel(1)
    _drain(engine)
    assert model.cache == {}


def test_logprobs_are_reported_per_token() -> None:
    engine = GenerationEngine(ToyLM(), max_num_seqs=1)
    engine.add(1, _req(logprobs=2, max_tokens=3))
    chunks = _drain(engine)[1]
    ids = [t for c in chunks for t in c.token_ids]
    logprobs = [lp for c in chunks for lp in c.logprobs or ()]
    tops = [top for c in chunks for top in c.top_logprobs or ()]
    assert len(logprobs) == len(ids) == len(tops) == 3
    assert all(-1e-6 < lp <= 0 for lp in logprobs)  # greedy picks a token with almost all the mass
    assert all(len(top) == 2 and top[0][1] >= top[1][1] for top in tops)
    assert next(t for c in chunks for t in c.token_texts) == "h"
