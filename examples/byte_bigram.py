"""A generative model small enough to read at once: bytes are its tokens, and the next byte's
logits are the row of a 257 x 257 table picked by the last byte (256 ends the text).

    ember deploy examples/byte_bigram.py:ByteBigram --max-num-seqs 8
    ember invoke byte-bigram "Hello"

The table is its only weight: ``source_weights`` makes it once at deploy time (greedy decoding
answers ``TEXT`` to any prompt), and the store hands it back to ``setup``. A bigram needs
no KV cache, so ``release`` has nothing to free; a transformer would keep each sequence's keys
and values from ``step`` to ``step`` under its ``seq_id``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch

from ember import GenerativeModel, SeqChunk
from ember.generation import GenerationInfo

END = 256
TEXT = b"Hi, Ember!"  # no byte twice: one way through


class ByteBigram(GenerativeModel):
    eos_token_ids = (END,)

    def __init__(self, step_delay_s: float = 0.0) -> None:
        #: Seconds each step takes on top of its work, to stand in for a bigger model in tests.
        self.step_delay_s = step_delay_s

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        table = torch.zeros(END + 1, END + 1)
        table[:, TEXT[0]] = 1.0  # from anywhere, start the text
        for current, following in zip(TEXT, [*TEXT[1:], END], strict=True):
            table[current, following] = 2.0
        return {"table": table}

    def generation_info(self) -> GenerationInfo:
        return GenerationInfo(max_model_len=1 << 20, kv_bytes_per_token=0, vocab_size=END + 1, chat_template=False)

    def setup(self, weights: Mapping[str, torch.Tensor], assets: Mapping[str, bytes], device: torch.device) -> None:
        self.table = weights["table"]

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t != END).decode(errors="replace")

    def step(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        last = torch.tensor([chunk.token_ids[-1] for chunk in chunks])
        return self.table[last]
