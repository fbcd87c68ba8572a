"""TinyEmbed: an 8-dimensional text embedder with seeded random weights, for /v1/embeddings without
a real model (each text's bytes, bucketed, through one linear layer, normalised)."""

from collections.abc import Mapping

import numpy as np
import torch

from ember.api import Batch, ModelAPI, TensorSpec

DIM = 8


class TinyEmbed(ModelAPI):
    inputs = (TensorSpec("text", "BYTES", (-1,)),)
    outputs = (TensorSpec("embedding", "FP32", (-1, DIM)),)
    max_batch_size = 32
    task = "embeddings"

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(7)
        return {"weight": torch.randn(256, DIM, generator=generator)}

    def setup(self, weights: Mapping[str, torch.Tensor], assets: Mapping[str, bytes], device: torch.device) -> None:
        self.weight = weights["weight"].cpu().numpy()

    def predict(self, batch: Batch) -> Batch:
        counts = np.zeros((len(batch["text"]), 256), dtype=np.float32)
        for row, text in enumerate(batch["text"]):
            data = text if isinstance(text, bytes) else str(text).encode()
            counts[row] = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
        vectors = counts @ self.weight
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return {"embedding": (vectors / np.maximum(norms, 1e-6)).astype(np.float32)}
