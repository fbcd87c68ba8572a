"""The user's side of the contract: :class:`ModelAPI`.

A model is a class. Ember calls its hooks in two places:

* **Deploy time, once** (in a worker process): ``source_weights()`` and ``source_assets()`` read the
  weights and small files (tokenizers, configs) from wherever they live. Ember writes them into its
  store; no later start ever goes back to the source.
* **Load time, every promotion** (in a worker process): ``setup(weights, assets, device)`` builds the
  network around weights the store has already placed on ``device``. It must not read files: every
  byte it needs arrives through its arguments, so every model gets the platform's fast loader.

Then ``predict(batch)`` runs batches. A batch maps each input name to an array whose first
dimension is the batch (requests are concatenated along it, Triton's convention); it returns a
mapping of output names to arrays with the same first dimension. ``decode``/``encode`` optionally
convert one request's inputs / outputs before and after batching.

The smallest useful model::

    class Double(ModelAPI):
        inputs = (TensorSpec("x", "FP32", (-1, 4)),)
        outputs = (TensorSpec("y", "FP32", (-1, 4)),)

        def predict(self, batch):
            return {"y": batch["x"] * 2}

A generative model subclasses :class:`GenerativeModel` instead: the platform owns the batch, the
KV-cache budget and the token loop (tokenizing, scheduling, sampling, stop strings, streaming);
the class says how to turn text into tokens and back, and how to run one step: a list of
:class:`SeqChunk` (new tokens of running sequences, prefill chunks and decodes together) in, the
next-token logits of each out. It keeps each sequence's cache itself, keyed by ``seq_id``, until
``release(seq_id)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from ember.errors import InvalidInput
from ember.generation import ChatMessage, GenerationInfo

if TYPE_CHECKING:
    import torch

__all__ = [
    "ANSWER_MISMATCH",
    "Arrays",
    "Batch",
    "GenerativeModel",
    "ModelAPI",
    "SeqChunk",
    "TensorSpec",
    "check_answer",
]

Array = npt.NDArray[Any]
Batch = Mapping[str, Array]
#: One request's (or one answer's) tensors by name, as they travel between gateway, scheduler and worker.
Arrays = dict[str, npt.NDArray[Any]]

#: The Open Inference Protocol datatypes and the numpy dtype of each (BYTES: object arrays of bytes).
DATATYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        "BOOL": np.dtype("?"),
        "INT8": np.dtype("<i1"),
        "INT16": np.dtype("<i2"),
        "INT32": np.dtype("<i4"),
        "INT64": np.dtype("<i8"),
        "UINT8": np.dtype("<u1"),
        "UINT16": np.dtype("<u2"),
        "UINT32": np.dtype("<u4"),
        "UINT64": np.dtype("<u8"),
        "FP16": np.dtype("<f2"),
        "FP32": np.dtype("<f4"),
        "FP64": np.dtype("<f8"),
        "BYTES": np.dtype(object),
    }
)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, Open Inference Protocol datatype and shape (-1 = any size).

    The first dimension is the batch dimension.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"tensor name {self.name!r}: use letters, digits, '_' and '-'")
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor {self.name!r}: datatype {self.datatype!r} is not one of {sorted(DATATYPES)}")
        if not self.shape or any(d < -1 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: shape {self.shape} needs a batch dimension first and sizes >= -1")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))


#: How every message of :func:`check_answer` begins: a model whose answer breaks its own declaration.
ANSWER_MISMATCH = "the answer does not match the declared outputs"


def check_answer(declared: tuple[TensorSpec, ...], answer: Mapping[str, Any], rows: int) -> str | None:
    """None if ``answer`` (one request's outputs, ``rows`` rows) is what ``declared`` promises, else
    what is wrong, naming the output: a missing or undeclared output, a wrong datatype, a wrong shape.
    """
    fix = "fix predict (or encode), or the declared outputs, and redeploy"
    names = ", ".join(spec.name for spec in declared)
    for spec in declared:
        if spec.name not in answer:
            return f"{ANSWER_MISMATCH}: output '{spec.name}' is missing (predict returned {_keys(answer)}); {fix}"
        value = answer[spec.name]
        if not isinstance(value, np.ndarray):
            return f"{ANSWER_MISMATCH}: output '{spec.name}' is a {type(value).__name__}, not an array; {fix}"
        if not _fits(value.dtype, spec.datatype):
            return (
                f"{ANSWER_MISMATCH}: output '{spec.name}' is {value.dtype} but declared {spec.datatype} "
                f"({DATATYPES[spec.datatype]}); {fix}"
            )
        wanted = (rows, *spec.shape[1:])
        if value.ndim != len(wanted) or any(w != -1 and w != d for w, d in zip(wanted, value.shape, strict=False)):
            shown = "(" + ", ".join("-1" if w == -1 else str(w) for w in wanted) + ")"
            return (
                f"{ANSWER_MISMATCH}: output '{spec.name}' has shape {tuple(value.shape)} for {rows} input rows; "
                f"declared {list(spec.shape)}, so {shown} was expected; {fix}"
            )
    extra = sorted(set(answer) - {spec.name for spec in declared})
    if extra:
        undeclared = ", ".join(extra)
        return f"{ANSWER_MISMATCH}: predict returned {undeclared}, which the model does not declare ({names}); {fix}"
    return None


def _fits(dtype: np.dtype[Any], datatype: str) -> bool:
    if datatype == "BYTES":
        return dtype.kind in "OSU"
    return dtype == DATATYPES[datatype]


def _keys(answer: Mapping[str, Any]) -> str:
    return ", ".join(sorted(answer)) or "nothing"


class ModelAPI:
    """Base class of every model Ember serves. Override ``predict``; the rest has defaults."""

    #: Inputs and outputs, batch dimension first. Instances may set their own (built-in adapters do).
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    #: The most rows one ``predict`` call receives.
    max_batch_size: int = 32
    #: Which OpenAI-compatible route fits the model: ``"embeddings"`` (one BYTES input of texts, one
    #: FP32 output of shape (-1, dim)) or ``None``.
    task: str | None = None
    #: Deploy-time sources, resolved against the folder of the file defining the class.
    weights_file: ClassVar[str | None] = None
    asset_files: ClassVar[tuple[str, ...]] = ()

    # -- deploy time -------------------------------------------------------------------------------

    def source_weights(self) -> Mapping[str, torch.Tensor]:
        """Read the weights from their source. Called once, at deploy time.

        The default reads ``weights_file`` (safetensors). A model with no weights returns ``{}``.
        """
        if self.weights_file is None:
            return {}
        from safetensors.torch import load_file

        return dict(load_file(str(self._resolve(self.weights_file))))

    def source_assets(self) -> Mapping[str, bytes]:
        """Small files the model needs at setup (tokenizer, config), read once at deploy time."""
        return {Path(name).name: self._resolve(name).read_bytes() for name in self.asset_files}

    # -- load time ---------------------------------------------------------------------------------

    def setup(self, weights: Mapping[str, torch.Tensor], assets: Mapping[str, bytes], device: torch.device) -> None:
        """Build the network around ``weights`` (already on ``device``). Must not read files."""

    # -- request time ------------------------------------------------------------------------------

    def decode(self, inputs: Batch) -> Batch:
        """Convert one request's inputs before batching (default: unchanged)."""
        return inputs

    def predict(self, batch: Batch) -> Batch:
        raise NotImplementedError(f"{type(self).__name__}.predict(batch) is not written yet")

    def encode(self, outputs: Batch) -> Batch:
        """Convert one request's outputs after the batch is split (default: unchanged)."""
        return outputs

    # -- helpers -----------------------------------------------------------------------------------

    def _resolve(self, name: str) -> Path:
        path = Path(name).expanduser()
        if path.is_absolute():
            return path
        return Path(inspect.getfile(type(self))).resolve().parent / path


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's part of a step: compute ``token_ids`` at positions ``start``, ``start + 1``, ...

    ``start`` is how many of the sequence's tokens the model's cache already holds for ``seq_id``
    (0: a new sequence, or one preempted and being recomputed: its cache was released). A decode
    is one token; a prefill chunk is a slice of the prompt.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start: int


class GenerativeModel(ModelAPI):
    """Base class of generative (token by token) models. Override the tokenizer hooks, ``step``,
    ``release`` and ``generation_info``; ``setup`` builds the network as for any model.

    The platform calls ``step`` once per iteration with every sequence that computes tokens in it,
    in any mix of prefill chunks and decodes, and samples the next token of each sequence from the
    returned logits. It calls ``release(seq_id)`` when a sequence ends, is cancelled or preempted;
    a released sequence may come back with ``start == 0``, to be recomputed from its tokens.
    """

    task = "generate"
    #: The tokens that end a sequence (``finish_reason="stop"``) unless the request ignores them.
    eos_token_ids: tuple[int, ...] = ()

    # -- deploy time -------------------------------------------------------------------------------

    def generation_info(self) -> GenerationInfo:
        """Length limit, KV-cache bytes per token, vocabulary size, chat template: called at deploy
        time after ``source_weights`` and ``source_assets``, and reported in the model's metadata."""
        raise NotImplementedError(f"{type(self).__name__}.generation_info() is not written yet")

    # -- text and tokens (load time onwards) -------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """A completion prompt's tokens."""
        raise NotImplementedError(f"{type(self).__name__}.tokenize(text) is not written yet")

    def chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """A chat's tokens, through the model's chat template, ready for the assistant's answer."""
        raise InvalidInput(f"{type(self).__name__} has no chat template; send a completion prompt instead")

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids``, special tokens left out. A prefix of a multi-byte character
        may decode to U+FFFD: the platform holds such text back until the character is complete."""
        raise NotImplementedError(f"{type(self).__name__}.detokenize(token_ids) is not written yet")

    # -- steps -------------------------------------------------------------------------------------

    def step(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Run one step: the logits after the last token of each chunk, shape (len(chunks), vocab)."""
        raise NotImplementedError(f"{type(self).__name__}.step(chunks) is not written yet")

    def release(self, seq_id: int) -> None:
        """Forget ``seq_id``'s cache (it ended, was cancelled, or is preempted)."""

    def predict(self, batch: Batch) -> Batch:
        raise InvalidInput(
            f"{type(self).__name__} is a generative model: call it through /v1/chat/completions, "
            "/v1/completions or /v2/models/{name}/generate"
        )
