"""Sentence embeddings from a sentence-transformers folder: :class:`SentenceEmbedding`.

The folder is what ``SentenceTransformer.save()`` writes (or a plain Hugging Face encoder folder):
``modules.json`` lists a Transformer, a Pooling and optionally a Normalize module; the
transformer's own folder holds ``config.json``, the weights and ``tokenizer.json``.

* Deploy time reads the folder: the encoder's weights through ``transformers`` (so its key renames,
  legacy formats and shards all apply), plus the tensors the network computes for itself
  (non-persistent buffers such as ``position_ids``), and the small JSON files as assets.
* Load time builds the encoder on the ``meta`` device from ``config.json`` and assigns the store's
  tensors into it: no parameter is initialised and no file is read.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ember.api import Batch, ModelAPI, TensorSpec
from ember.models.torchscript import independent

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["SentenceEmbedding", "assign_hf_weights"]

_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' legacy boolean keys, in the order it concatenates them.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_DEFAULT_MAX_SEQ_LENGTH = 256


@dataclass(frozen=True)
class _Recipe:
    """Everything after the encoder, read from the assets."""

    pooling: tuple[str, ...]
    normalize: bool
    max_seq_length: int
    lowercase: bool
    dim: int
    padding_side: str
    truncation_side: str


class SentenceEmbedding(ModelAPI):
    """Serve a sentence-transformers model folder on the ``/v1/embeddings`` route.

    Input ``text`` (BYTES, one UTF-8 string per row); output ``embedding`` (FP32, one vector per row).
    ``outputs`` carries the true dimension once ``source_assets()`` or ``setup()`` has run.
    """

    task = "embeddings"
    max_batch_size = 64
    inputs = (TensorSpec("text", "BYTES", (-1,)),)
    outputs = (TensorSpec("embedding", "FP32", (-1, -1)),)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    # -- deploy time -------------------------------------------------------------------------------

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        from transformers import AutoModel

        model, info = AutoModel.from_pretrained(
            str(self._layout().encoder), local_files_only=True, output_loading_info=True
        )
        missing = [key for key in info["missing_keys"] if not key.startswith("pooler.")]
        if missing:
            raise ValueError(
                f"{self.path}: the checkpoint lacks {len(missing)} tensors the encoder needs "
                f"(first: {sorted(missing)[:3]}); re-save it with transformers' save_pretrained()"
            )
        tensors = dict(model.state_dict())
        # Buffers outside the state dict (position_ids, rotary tables) are computed at construction,
        # which happens on the meta device at load time: ship their values with the weights.
        tensors.update((name, b) for name, b in model.named_buffers() if name not in tensors)
        return independent(tensors)

    def source_assets(self) -> Mapping[str, bytes]:
        layout = self._layout()
        assets = {"config.json": (layout.encoder / "config.json").read_bytes()}
        assets["tokenizer.json"] = _read_tokenizer(layout.encoder)
        optional = {
            "pooling.json": layout.pooling / "config.json" if layout.pooling else None,
            "modules.json": self.path / "modules.json",
            "sentence_bert_config.json": layout.encoder / "sentence_bert_config.json",
            "tokenizer_config.json": layout.encoder / "tokenizer_config.json",
        }
        assets.update((name, file.read_bytes()) for name, file in optional.items() if file and file.is_file())
        self._describe(_recipe(assets))
        _config(assets)  # fail now, not at load time, when transformers does not know the architecture
        return assets

    # -- load time ---------------------------------------------------------------------------------

    def setup(self, weights: Mapping[str, torch.Tensor], assets: Mapping[str, bytes], device: torch.device) -> None:
        from transformers import AutoModel

        recipe = _recipe(assets)
        self._describe(recipe)
        with torch.device("meta"):
            model = AutoModel.from_config(_config(assets))  # type: ignore[no-untyped-call]
        assign_hf_weights(model, weights, "encoder")
        self._model = model.eval().requires_grad_(False).to(device)
        self._device = device
        self._takes_token_types = "token_type_ids" in _forward_parameters(model)

        tokenizer = _tokenizer(
            assets["tokenizer.json"], recipe.max_seq_length, recipe.truncation_side, recipe.padding_side
        )
        self._tokenizer = tokenizer
        self._recipe = recipe

    # -- request time ------------------------------------------------------------------------------

    def predict(self, batch: Batch) -> Batch:
        recipe = self._recipe
        texts = [_text(item) for item in np.asarray(batch["text"]).reshape(-1).tolist()]
        if recipe.lowercase:
            texts = [text.lower() for text in texts]
        if not texts:
            return {"embedding": np.zeros((0, recipe.dim), dtype=np.float32)}
        encodings = self._tokenizer.encode_batch(texts)
        features = {
            "input_ids": torch.tensor([e.ids for e in encodings], device=self._device),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], device=self._device),
        }
        if self._takes_token_types:
            features["token_type_ids"] = torch.tensor([e.type_ids for e in encodings], device=self._device)
        with torch.inference_mode():
            output = self._model(**features)
            tokens = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            embedding = _pool(tokens.float(), features["attention_mask"], recipe.pooling)
            if recipe.normalize:
                embedding = torch.nn.functional.normalize(embedding, p=2, dim=1)
            return {"embedding": embedding.cpu().numpy()}

    # -- helpers -----------------------------------------------------------------------------------

    def _describe(self, recipe: _Recipe) -> None:
        self.outputs = (TensorSpec("embedding", "FP32", (-1, recipe.dim)),)

    def _layout(self) -> _Layout:
        return _Layout.read(self.path)


@dataclass(frozen=True)
class _Layout:
    """Where the encoder and the pooling config live inside a sentence-transformers folder."""

    encoder: Path
    pooling: Path | None

    @classmethod
    def read(cls, root: Path) -> _Layout:
        if not root.is_dir():
            raise ValueError(f"{root}: not a folder; pass the folder SentenceTransformer.save() wrote")
        modules_file = root / "modules.json"
        if not modules_file.is_file():  # a plain Hugging Face encoder: mean pooling, as sentence-transformers does
            return cls(encoder=root, pooling=None)
        found: dict[str, Path] = {}
        for module in json.loads(modules_file.read_text()):
            kind = str(module["type"]).rsplit(".", 1)[-1]
            if kind not in ("Transformer", "Pooling", "Normalize"):
                raise ValueError(
                    f"{root}: module {module['type']!r} is not supported by SentenceEmbedding (it runs "
                    "Transformer, Pooling and Normalize); write a ModelAPI class for this model"
                )
            found[kind] = root / str(module.get("path", ""))
        if "Transformer" not in found or "Pooling" not in found:
            raise ValueError(f"{modules_file}: needs a Transformer and a Pooling module")
        return cls(encoder=found["Transformer"], pooling=found["Pooling"])


def _read_tokenizer(folder: Path) -> bytes:
    file = folder / "tokenizer.json"
    if file.is_file():
        return file.read_bytes()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{folder}: no tokenizer.json and no fast tokenizer to build one from")
    return str(tokenizer.backend_tokenizer.to_str()).encode("utf-8")


def _recipe(assets: Mapping[str, bytes]) -> _Recipe:
    config = json.loads(assets["config.json"])
    pooling_config = json.loads(assets["pooling.json"]) if "pooling.json" in assets else {}
    st_config = json.loads(assets["sentence_bert_config.json"]) if "sentence_bert_config.json" in assets else {}
    modules = json.loads(assets["modules.json"]) if "modules.json" in assets else []
    tokenizer_config = json.loads(assets["tokenizer_config.json"]) if "tokenizer_config.json" in assets else {}

    pooling = _pooling_modes(pooling_config)
    width = (
        pooling_config.get("embedding_dimension")
        or pooling_config.get("word_embedding_dimension")
        or next((config[key] for key in ("hidden_size", "d_model", "dim") if key in config), None)
    )
    if not isinstance(width, int):
        raise ValueError("config.json names no hidden_size; cannot tell the embedding dimension")
    max_positions = int(config.get("max_position_embeddings", _DEFAULT_MAX_SEQ_LENGTH))
    return _Recipe(
        pooling=pooling,
        normalize=any(str(m["type"]).endswith("Normalize") for m in modules),
        max_seq_length=int(st_config.get("max_seq_length") or min(_DEFAULT_MAX_SEQ_LENGTH, max_positions)),
        lowercase=bool(st_config.get("do_lower_case", False)),
        dim=width * len(pooling),
        # sentence-transformers tokenizes through transformers, whose sides come from tokenizer_config.json
        padding_side=str(tokenizer_config.get("padding_side", "right")),
        truncation_side=str(tokenizer_config.get("truncation_side", "right")),
    )


def _pooling_modes(config: Mapping[str, Any]) -> tuple[str, ...]:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in _POOLING_MODES]
    if unknown:
        raise ValueError(f"pooling mode {unknown[0]!r} is not one of {_POOLING_MODES}")
    return modes or ("mean",)


def _config(assets: Mapping[str, bytes]) -> Any:
    from transformers import AutoConfig

    config = json.loads(assets["config.json"])
    if "model_type" not in config:
        raise ValueError("config.json has no model_type; re-save the model with transformers")
    return AutoConfig.for_model(**config)


def assign_hf_weights(model: Any, weights: Mapping[str, torch.Tensor], network: str) -> None:
    """Put ``weights`` into a meta-built Hugging Face ``model`` (``network`` names it in errors:
    "encoder", "network"): every tensor it holds must come from there; an output embedding tied to
    the input one is stored once and tied again here."""
    persistent = model.state_dict(keep_vars=True).keys()
    model.load_state_dict({name: weights[name] for name in persistent if name in weights}, strict=False, assign=True)
    buffers = dict(model.named_buffers())
    for name in weights.keys() - persistent:
        if name not in buffers:
            raise ValueError(f"weights hold {name!r}, which the {network} does not have; deploy the model again")
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, weights[name], persistent=False)
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and inputs is not None and output.weight.is_meta and not inputs.weight.is_meta:
        output.weight = inputs.weight  # tied: stored once
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"weights lack {len(left)} tensors of the {network} (first: {left[:3]}); deploy it again")


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _pool(tokens: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """sentence-transformers' Pooling, for padded batches."""
    hidden = tokens.shape[-1]
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    vectors: list[torch.Tensor] = []
    for mode in modes:
        if mode == "cls":  # the first real token, wherever padding put it
            first = mask.to(torch.int).argmax(dim=1)
            vectors.append(tokens.gather(1, first.view(-1, 1, 1).expand(-1, 1, hidden)).squeeze(1))
        elif mode == "max":
            vectors.append(tokens.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = weights.sum(dim=1).clamp(min=1e-9)
            vectors.append((tokens * weights).sum(dim=1) / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device, dtype=tokens.dtype)
            positions = positions.view(1, -1, 1) - mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
            scaled = weights * positions
            vectors.append((tokens * scaled).sum(dim=1) / scaled.sum(dim=1).clamp(min=1e-9))
        else:  # lasttoken: the last real token
            seq_len = tokens.shape[1]
            values, from_end = mask.flip(1).max(1)
            from_end = torch.where(values == 0, seq_len - 1, from_end)
            index = (seq_len - from_end - 1).view(-1, 1, 1).expand(-1, 1, hidden)
            vectors.append((tokens * weights).gather(1, index).squeeze(1))
    return torch.cat(vectors, dim=-1)


def _text(item: object) -> str:
    if isinstance(item, bytes | bytearray):
        return bytes(item).decode("utf-8")
    return str(item)


@functools.lru_cache(maxsize=8)
def _tokenizer(data: bytes, max_length: int, truncation_side: str, padding_side: str) -> Tokenizer:
    """A configured tokenizer, parsed once per worker for each distinct asset and setting.

    Parsing tokenizer.json is most of a warm load's time (about 60 ms of 90 for MiniLM); the
    assets of a stored model never change, so a worker keeps the parsed result for the next load.
    It is used read-only after this function returns.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    tokenizer.enable_truncation(max_length=max_length, direction=truncation_side)
    padding = tokenizer.padding or {}
    pad_id = int(padding.get("pad_id", 0))
    tokenizer.enable_padding(
        direction=padding_side,
        pad_id=pad_id,
        pad_type_id=int(padding.get("pad_type_id", 0)),
        pad_token=padding.get("pad_token") or tokenizer.id_to_token(pad_id) or "[PAD]",
    )  # no length: pad each batch to its longest text
    return tokenizer
