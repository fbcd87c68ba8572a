"""Attention over many sequences packed into one row, each with its own KV cache.

A step of a causal LM runs every sequence's new tokens (prefill chunks and decodes) as one packed
row: the projections, the MLPs and the norms see one matrix of all the step's tokens, so their
weights are read once per step, not once per sequence. Only attention is per sequence: this
module's attention function (registered with ``transformers``' ``AttentionInterface`` as
``ember_packed``) writes each sequence's new keys and values into its cache and attends its
queries to that sequence's cache alone (causally within the chunk). Positions come from the
step's ``position_ids``, so rotary embeddings are each sequence's own.

A :class:`SeqCache` holds one sequence's keys and values for all layers; it grows by doubling,
so appending a token copies nothing most steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ATTENTION", "Segment", "SeqCache", "packed_attention", "register"]

#: The name ``transformers`` knows the attention function by.
ATTENTION = "ember_packed"
_MIN_CAPACITY = 64


class SeqCache:
    """Keys and values of one sequence, every layer: (layers, kv_heads, capacity, head_dim) each."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self._shape = (layers, kv_heads, 0, head_dim)
        self._dtype = dtype
        self._device = device
        self.keys = torch.empty(self._shape, dtype=dtype, device=device)
        self.values = torch.empty(self._shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[2])

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` in all (the tokens already there are kept)."""
        if tokens <= self.capacity:
            return
        capacity = max(_MIN_CAPACITY, self.capacity * 2, tokens)
        layers, heads, _, dim = self._shape
        keys = torch.empty((layers, heads, capacity, dim), dtype=self._dtype, device=self._device)
        values = torch.empty_like(keys)
        used = self.capacity
        if used:
            keys[:, :, :used].copy_(self.keys)
            values[:, :, :used].copy_(self.values)
        self.keys, self.values = keys, values

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass(frozen=True)
class Segment:
    """One sequence's place in a packed step: tokens ``[offset, offset + length)`` of the row, at
    positions ``start ...`` of the sequence, whose cache is ``cache``."""

    offset: int
    length: int
    start: int
    cache: SeqCache


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``transformers``' attention signature: query (1, heads, tokens, dim), key and value (1,
    kv_heads, tokens, dim) for the whole packed row; ``kwargs["ember_segments"]`` says whose
    tokens are where. Returns (1, tokens, heads, dim)."""
    segments: Sequence[Segment] = kwargs["ember_segments"]
    layer = int(getattr(module, "layer_idx", 0))
    outputs = []
    for seg in segments:
        end = seg.start + seg.length
        rows = slice(seg.offset, seg.offset + seg.length)
        keys = seg.cache.keys[layer]
        values = seg.cache.values[layer]
        keys[:, seg.start : end].copy_(key[0, :, rows])
        values[:, seg.start : end].copy_(value[0, :, rows])
        q = query[:, :, rows]
        k = keys[:, :end].unsqueeze(0)
        v = values[:, :end].unsqueeze(0)
        mask = None
        causal = False
        if seg.length > 1:
            if seg.start == 0:
                causal = True
            else:  # a chunk after cached tokens: token i sees the cache and the chunk up to itself
                steps = torch.arange(end, device=q.device)
                mask = steps.unsqueeze(0) <= (seg.start + torch.arange(seg.length, device=q.device)).unsqueeze(1)
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=True
            )
        )
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``ember_packed`` known to ``transformers`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, packed_attention)
