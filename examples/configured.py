"""Models built from a Hugging Face config with random weights from a fixed seed: the benchmarks' GPU models.

    ember deploy examples/configured.py:ResNet50      # ResNet-50, fp16, 25.6 M parameters
    ember deploy examples/configured.py:Decoder1B     # a Llama-3.2-1B-shaped decoder, bf16, 1.24 B parameters

No weights are downloaded: ``source_weights`` builds the network on the ``meta`` device and fills every
tensor from one seeded generator (on the GPU where there is one, which is fast, then to host memory).
Every load after that builds the network on ``meta`` and takes its tensors from Ember's store, as any
model does. ``ResNetTiny`` and ``DecoderTiny`` are the same code at a size that runs anywhere in
seconds (the tests and the benchmarks' CPU checks use them).

Each answers the question its kind is served for, with small outputs: the ResNet the top class of each
image (``image``: FP32, N x 3 x 224 x 224), the decoder the next token after each prompt
(``input_ids``: INT64, N x L), one forward pass (a prefill) per batch.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ember.api import Batch, ModelAPI, TensorSpec


def _filled(model: torch.nn.Module, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """``model``'s state (built on ``meta``) filled from a seeded generator and cast to ``dtype``, on the CPU.

    Matrices and convolutions are normal with a fan-in scale (so activations stay finite through the
    depth), norms' and batch norms' scales are one, biases, running means and counters zero, running
    variances one. A tensor tied to another is left out; ``setup`` ties it again.
    """
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(where).manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, meta in model.state_dict(keep_vars=True).items():
        if id(meta) in seen:  # a tied tensor (a head sharing the embedding) is stored once
            continue
        seen.add(id(meta))
        target = dtype if meta.dtype.is_floating_point else meta.dtype
        tensor = torch.empty(meta.shape, dtype=target, device=where)
        leaf = name.rsplit(".", 1)[-1]
        if not meta.dtype.is_floating_point or leaf in ("bias", "running_mean"):
            tensor.zero_()
        elif leaf == "running_var" or (leaf == "weight" and meta.dim() == 1):
            tensor.fill_(1)
        else:
            fan_in = max(1, meta[0].numel()) if meta.dim() > 1 else 1
            tensor.normal_(0.0, fan_in**-0.5, generator=generator)
        state[name] = tensor.cpu()
    return state


class _Configured(ModelAPI):
    """The shared part: build on ``meta`` from ``config()``, fill at deploy, assign at load."""

    dtype: ClassVar[torch.dtype] = torch.float16
    seed: ClassVar[int] = 0

    def config(self) -> Any:
        raise NotImplementedError

    def network(self, config: Any) -> torch.nn.Module:
        raise NotImplementedError

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        with torch.device("meta"):
            model = self.network(self.config())
        return _filled(model, self.dtype, self.seed)

    def setup(self, weights: Mapping[str, torch.Tensor], assets: Mapping[str, bytes], device: torch.device) -> None:
        config = self.config()
        with torch.device("meta"):
            model = self.network(config)
        model.load_state_dict(weights, assign=True, strict=False)
        model.tie_weights()
        with torch.device(device):  # buffers computed at construction, not stored (rotary frequencies)
            self.rebuild(model, config)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"{type(self).__name__}: no weights for {left[:3]}")
        self.model = model.eval()
        self.device = device

    def rebuild(self, model: torch.nn.Module, config: Any) -> None:
        """Build again, on the target device, the parts whose buffers are computed rather than stored."""


class ResNet50(_Configured):
    """ResNet-50 (``transformers.ResNetConfig()``'s defaults are ResNet-50), 1000 classes, fp16."""

    inputs = (TensorSpec("image", "FP32", (-1, 3, 224, 224)),)
    outputs = (TensorSpec("label", "INT64", (-1,)),)
    max_batch_size = 32
    dtype = torch.float16

    def config(self) -> Any:
        from transformers import ResNetConfig

        return ResNetConfig(num_labels=1000)

    def network(self, config: Any) -> torch.nn.Module:
        from transformers import ResNetForImageClassification

        return ResNetForImageClassification(config)

    def predict(self, batch: Batch) -> Batch:
        with torch.inference_mode():
            image = torch.as_tensor(batch["image"]).to(self.device, self.dtype, non_blocking=True)
            logits = self.model(pixel_values=image).logits
        return {"label": logits.argmax(-1).cpu().numpy()}


class ResNetTiny(ResNet50):
    """The same network at one block per stage and narrow stages, fp32 (runs on a CPU in milliseconds)."""

    dtype = torch.float32

    def config(self) -> Any:
        from transformers import ResNetConfig

        return ResNetConfig(
            num_labels=10, embedding_size=8, hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 1], layer_type="basic"
        )


class Decoder1B(_Configured):
    """A decoder shaped like Llama-3.2-1B (16 layers, hidden 2048, GQA 32/8, vocabulary 128256), bf16."""

    inputs = (TensorSpec("input_ids", "INT64", (-1, -1)),)
    outputs = (TensorSpec("next_token", "INT64", (-1,)),)
    max_batch_size = 16
    dtype = torch.bfloat16

    #: vocabulary, hidden, intermediate, layers, attention heads, key-value heads, positions
    sizes: ClassVar[tuple[int, ...]] = (128256, 2048, 8192, 16, 32, 8, 8192)

    def config(self) -> Any:
        from transformers import LlamaConfig

        vocab, hidden, intermediate, layers, heads, kv_heads, positions = self.sizes
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=positions,
            tie_word_embeddings=True,
        )

    def network(self, config: Any) -> torch.nn.Module:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(config)

    def rebuild(self, model: torch.nn.Module, config: Any) -> None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        model.model.rotary_emb = LlamaRotaryEmbedding(config)  # type: ignore[union-attr]

    def predict(self, batch: Batch) -> Batch:
        with torch.inference_mode():
            ids = torch.as_tensor(batch["input_ids"]).to(self.device, non_blocking=True)
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        return {"next_token": logits[:, -1].argmax(-1).cpu().numpy()}


class DecoderTiny(Decoder1B):
    """The same decoder at 2 layers, hidden 64, vocabulary 512, fp32."""

    dtype = torch.float32
    sizes = (512, 64, 128, 2, 4, 2, 512)
