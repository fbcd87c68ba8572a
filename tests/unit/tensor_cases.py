"""Helpers shared by the checkpoint tests: random tensors of any dtype, compared bit for bit."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from hypothesis import strategies as st


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that NaNs, fp8 and bf16 compare bit for bit."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@st.composite
def tensors(draw: st.DrawFn, dtypes: Sequence[torch.dtype], max_dim: int) -> torch.Tensor:
    """A tensor of one of ``dtypes``, up to 4 dimensions of up to ``max_dim``, with random bytes."""
    dtype = draw(st.sampled_from(list(dtypes)))
    shape = tuple(draw(st.lists(st.integers(0, max_dim), max_size=4)))
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.tensor(list(draw(st.binary(min_size=nbytes, max_size=nbytes))), dtype=torch.uint8)
    if dtype is torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
