"""CausalLM on a tiny random Llama: deploy and load through the store's path, and greedy decoding
under continuous batching equal to ``transformers``' own ``generate`` run alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.generation import GenerateRequest, SamplingParams
from ember.models.causal_lm import CausalLM
from ember.worker.generation import GenerationEngine

VOCAB = 96


def _tiny_llama_folder(folder: Path) -> Path:
    """A Hugging Face causal-LM folder: a random float64 Llama and a word-level tokenizer (``w0`` ... ``w95``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.3,  # layers that matter: the next token is not just the last one again
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).to(torch.float64)  # float64: no two logits are near enough to tie
    model.save_pretrained(folder)
    word_level = models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0")
    backend = Tokenizer(word_level)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[CausalLM, torch.nn.Module]:
    folder = _tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"))
    source = CausalLM(folder)
    weights, assets = source.source_weights(), source.source_assets()
    assert "lm_head.weight" not in weights  # tied: stored once
    model = CausalLM(folder)
    model.setup(weights, assets, torch.device("cpu"))
    return model, source._source_model().eval()


def test_metadata_comes_from_the_config(tiny: tuple[CausalLM, torch.nn.Module]) -> None:
    model, _ = tiny
    info = model.generation_info()
    assert info.max_model_len == 128
    assert info.vocab_size == VOCAB
    assert info.kv_bytes_per_token == 2 * 2 * 2 * 8 * 8  # K and V, 2 layers, 2 kv heads, head_dim 8, float64
    assert model.tokenize("w5 w17 w3") == [5, 17, 3]


def _reference(ref: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = ref.generate(  # type: ignore[operator]
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return [int(t) for t in out[0, len(prompt) :]]


@st.composite
def _arrivals(draw: st.DrawFn) -> tuple[list[tuple[int, list[int], int]], int, int]:
    n = draw(st.integers(1, 5))
    seqs = []
    for _ in range(n):
        step = draw(st.integers(0, 6))
        prompt = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=40))
        seqs.append((step, prompt, draw(st.integers(1, 12))))
    return seqs, draw(st.integers(5, 24)), draw(st.sampled_from([0, 60, 120]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_arrivals())
def test_greedy_tokens_equal_generate_run_alone(
    tiny: tuple[CausalLM, torch.nn.Module], case: tuple[list[tuple[int, list[int], int]], int, int]
) -> None:
    _check_against_generate(*tiny, *case)


def test_greedy_tokens_survive_preemption(tiny: tuple[CausalLM, torch.nn.Module]) -> None:
    prompts = [[(7 * i + 3 * j) % (VOCAB - 1) + 1 for j in range(10 + 6 * i)] for i in range(5)]
    engine = _check_against_generate(*tiny, [(i, p, 12) for i, p in enumerate(prompts)], 8, 60)
    assert engine.preemptions > 0


def _check_against_generate(
    model: CausalLM, ref: torch.nn.Module, seqs: list[tuple[int, list[int], int]], step_tokens: int, kv_tokens: int
) -> GenerationEngine:
    """Run ``seqs`` (arrival step, prompt, tokens) through one engine; each must get exactly what
    ``generate`` gives it alone."""
    engine = GenerationEngine(
        model, max_num_seqs=3, max_step_tokens=step_tokens, kv_budget_bytes=kv_tokens * 512, max_model_len=60
    )
    got: dict[int, list[int]] = {}
    pending = sorted(enumerate(seqs), key=lambda item: item[1][0])
    step = 0
    while pending or engine.has_work:
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, n) = pending.pop(0)
            text = " ".join(f"w{t}" for t in prompt)
            engine.add(i, GenerateRequest(SamplingParams(max_tokens=n, temperature=0.0), prompt=text))
        for seq_id, chunk in engine.step():
            got.setdefault(seq_id, []).extend(chunk.token_ids)
        step += 1
    for i, (_, prompt, n) in enumerate(seqs):
        assert got[i] == _reference(ref, prompt, n), f"sequence {i} (prompt of {len(prompt)})"
    assert model.cache_bytes == 0
    return engine
