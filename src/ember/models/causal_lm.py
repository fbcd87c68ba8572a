"""Causal language models from a Hugging Face folder or a GGUF file: :class:`CausalLM`.

* Deploy time reads the source once through ``transformers``: a folder with
  ``AutoModelForCausalLM.from_pretrained(folder)``, a GGUF file with
  ``from_pretrained(its folder, gguf_file=its name)`` (the ``gguf`` package dequantizes it). The
  weights go to the store (a tied output embedding is stored once, as the input embedding); the
  config and the tokenizer (``save_pretrained``: ``tokenizer.json``, its config and the chat
  template) become assets.
* Load time builds the network on the ``meta`` device from the config, assigns the store's tensors
  (tying the output embedding back to the input one) and reads the tokenizer from the assets.
* Each step runs all its sequences' new tokens (prefill chunks and decodes) as one packed row
  through the network, with per-sequence KV caches (:mod:`ember.models.kv_attention`): one read of
  the weights per step, whatever the batch.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ember.api import GenerativeModel, SeqChunk
from ember.generation import ChatMessage, GenerationInfo
from ember.models.embedding import assign_hf_weights
from ember.models.kv_attention import ATTENTION, Segment, SeqCache, register
from ember.models.torchscript import independent

__all__ = ["CausalLM"]

#: Config keys that say how the source was stored, not what the network is.
_SOURCE_ONLY_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


class CausalLM(GenerativeModel):
    """Serve a Hugging Face causal-LM folder, or a ``.gguf`` file, on the generate routes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._source: Any = None
        self._config: dict[str, Any] | None = None
        self._chat_template = False
        self._caches: dict[int, SeqCache] = {}

    # -- deploy time -------------------------------------------------------------------------------

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        model = self._source_model()
        tensors = dict(model.state_dict())
        tied = _tied_output(model)
        if tied is not None:
            tensors.pop(tied, None)
        # Buffers outside the state dict (rotary tables) are computed at construction, which
        # happens on the meta device at load time: ship their values with the weights.
        tensors.update((name, b) for name, b in model.named_buffers() if name not in tensors)
        return independent(tensors)

    def source_assets(self) -> Mapping[str, bytes]:
        from transformers import AutoTokenizer

        model = self._source_model()
        config = {k: v for k, v in model.config.to_dict().items() if k not in _SOURCE_ONLY_KEYS}
        config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        assets = {"config.json": json.dumps(config, indent=1).encode()}
        folder, gguf = self._where()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf, local_files_only=True)
        with tempfile.TemporaryDirectory() as out:
            tokenizer.save_pretrained(out)
            for file in Path(out).iterdir():
                if file.is_file():
                    assets[file.name] = file.read_bytes()
        self._config = config
        self._chat_template = bool(getattr(tokenizer, "chat_template", None))
        return assets

    def generation_info(self) -> GenerationInfo:
        if self._config is None:
            raise RuntimeError("generation_info() needs source_assets() or setup() first")
        return _info(self._config, self._chat_template)

    def _source_model(self) -> Any:
        if self._source is None:
            from transformers import AutoModelForCausalLM

            folder, gguf = self._where()
            self._source = AutoModelForCausalLM.from_pretrained(
                str(folder), gguf_file=gguf, local_files_only=True, dtype="auto"
            )
        return self._source

    def _where(self) -> tuple[Path, str | None]:
        if self.path.is_file() and self.path.suffix == ".gguf":
            return self.path.parent, self.path.name
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{self.path}: give a Hugging Face causal-LM folder (with config.json) or a .gguf file")
        return self.path, None

    # -- load time ---------------------------------------------------------------------------------

    def setup(self, weights: Mapping[str, torch.Tensor], assets: Mapping[str, bytes], device: torch.device) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        register()
        config_dict = json.loads(assets["config.json"])
        config = AutoConfig.for_model(**config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION)  # type: ignore[no-untyped-call]
        assign_hf_weights(model, weights, "network")
        self._model = model.eval().requires_grad_(False)
        self._device = device
        self._tokenizer = _tokenizer(tuple(sorted((k, v) for k, v in assets.items() if k != "config.json")))
        self._config = config_dict
        self._chat_template = bool(getattr(self._tokenizer, "chat_template", None))
        eos = config_dict.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self._tokenizer.eos_token_id is not None:
            ids.add(int(self._tokenizer.eos_token_id))
        self.eos_token_ids = tuple(sorted(int(i) for i in ids))
        self._shape = (int(config.num_hidden_layers), _kv_heads(config_dict), _head_dim(config_dict))
        self._dtype = next(model.parameters()).dtype

    # -- text and tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not self._chat_template:
            return super().chat(messages)
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        text = self._tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return list(self._tokenizer.encode(str(text), add_special_tokens=False))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    # -- steps -------------------------------------------------------------------------------------

    def step(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        ids: list[int] = []
        positions: list[int] = []
        segments: list[Segment] = []
        last: list[int] = []
        for chunk in chunks:
            cache = self._caches.get(chunk.seq_id)
            if cache is None:
                cache = self._caches[chunk.seq_id] = SeqCache(*self._shape, self._dtype, self._device)
            n = len(chunk.token_ids)
            cache.reserve(chunk.start + n)
            segments.append(Segment(len(ids), n, chunk.start, cache))
            ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + n))
            last.append(len(ids) - 1)
        output = self._model(
            input_ids=torch.tensor([ids], device=self._device),
            position_ids=torch.tensor([positions], device=self._device),
            use_cache=False,
            logits_to_keep=torch.tensor(last, device=self._device),
            ember_segments=segments,
        )
        logits: torch.Tensor = output.logits[0]
        return logits

    def release(self, seq_id: int) -> None:
        self._caches.pop(seq_id, None)

    @property
    def cache_bytes(self) -> int:
        """Bytes the sequences' caches hold now (each grows by doubling: up to twice its tokens)."""
        return sum(c.nbytes for c in self._caches.values())


def _info(config: Mapping[str, Any], chat_template: bool) -> GenerationInfo:
    max_len = next((config[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len") if k in config), 2048)
    dtype_bytes = torch.empty((), dtype=getattr(torch, str(config.get("dtype") or "float32"))).element_size()
    layers = int(config["num_hidden_layers"])
    return GenerationInfo(
        max_model_len=int(max_len),
        kv_bytes_per_token=2 * layers * _kv_heads(config) * _head_dim(config) * dtype_bytes,
        vocab_size=int(config["vocab_size"]),
        chat_template=chat_template,
    )


def _kv_heads(config: Mapping[str, Any]) -> int:
    return int(config.get("num_key_value_heads") or config["num_attention_heads"])


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _tied_output(model: Any) -> str | None:
    """The state-dict name of the output embedding when it shares its tensor with the input one."""
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or inputs is None or output.weight is not inputs.weight:
        return None
    owner = next((name for name, m in model.named_modules(remove_duplicate=False) if m is output), None)
    return None if owner is None else f"{owner}.weight"


@functools.lru_cache(maxsize=4)
def _tokenizer(files: tuple[tuple[str, bytes], ...]) -> Any:
    """The tokenizer saved in the assets, parsed once per worker for each distinct set of files."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, data in files:
            (Path(folder) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
