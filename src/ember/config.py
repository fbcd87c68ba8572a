"""Settings validated at the edge (pydantic), handed inward as frozen dataclasses.

``DeploySpec`` is what a user asks for (CLI flags, the admin API's JSON). ``resolve_source`` turns
its ``source`` into the class a worker instantiates: a user's ``file.py:Class`` or ``module:Class``,
or one of the built-in adapters for Hugging Face folders, ``torch.export`` programs and TorchScript.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ember.api import TensorSpec
from ember.generation import GenerationInfo

__all__ = [
    "DEFAULT_KEEPALIVE_HOT_S",
    "DEFAULT_KEEPALIVE_WARM_S",
    "DEFAULT_MAX_NUM_SEQS",
    "DEFAULT_SLO_MS",
    "DEFAULT_TPOT_SLO_MS",
    "DEFAULT_TTFT_SLO_MS",
    "DeploySpec",
    "Deployment",
    "ModelMetadata",
    "OnUnmeetable",
    "UpdateSpec",
    "resolve_source",
    "validation_message",
]

#: How long a model stays on the device after its last request, then in host memory.
DEFAULT_KEEPALIVE_HOT_S = 300.0
DEFAULT_KEEPALIVE_WARM_S = 3600.0
DEFAULT_SLO_MS = 100.0
#: Generative models' defaults: time to first token, time per output token, sequences per instance.
DEFAULT_TTFT_SLO_MS = 2000.0
DEFAULT_TPOT_SLO_MS = 200.0
DEFAULT_MAX_NUM_SEQS = 16
#: The longest keep-alive (30 days): a model that should never leave a tier is better pinned by traffic.
MAX_KEEPALIVE_S = 30 * 24 * 3600.0

#: Matched whole (``fullmatch``): ``$`` alone would let a trailing newline through.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

Kind = Literal["class", "hf", "gguf", "exported", "torchscript"]
#: What to do with a request whose deadline cannot be met even if served alone.
OnUnmeetable = Literal["refuse", "best_effort"]

_ADAPTERS: dict[str, str] = {
    "hf": "ember.models.embedding:SentenceEmbedding",
    "gguf": "ember.models.causal_lm:CausalLM",
    "exported": "ember.models.exported:ExportedProgram",
    "torchscript": "ember.models.torchscript:TorchScript",
}


#: A model name in a tenant's namespace: ``acme+resnet`` (see ``ember.auth.keys.qualify``).
QUALIFIED_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\+[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def check_name(name: str) -> str:
    whole = isinstance(name, str) and (NAME_PATTERN.fullmatch(name) or QUALIFIED_PATTERN.fullmatch(name))
    if not whole or ".." in name:
        raise ValueError(
            f"model name {name!r} is not allowed: use 1-63 letters, digits, '_', '-' or '.', starting with a "
            "letter or digit (a tenant's model may be named TENANT+NAME)"
        )
    return name


class DeploySpec(BaseModel):
    """A deployment request, as the CLI and the admin API send it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, max_length=4096)
    name: str | None = None
    kind: Kind | None = None
    slo_ms: float = Field(DEFAULT_SLO_MS, gt=0, le=3_600_000)
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    max_batch_wait_ms: float = Field(0.0, ge=0, le=60_000)
    keepalive_hot_s: float = Field(DEFAULT_KEEPALIVE_HOT_S, ge=0, le=MAX_KEEPALIVE_S)
    keepalive_warm_s: float = Field(DEFAULT_KEEPALIVE_WARM_S, ge=0, le=MAX_KEEPALIVE_S)
    max_queue: int = Field(1024, ge=1, le=1_000_000)
    #: ``refuse``: answer an unmeetable request at once with 429 + Retry-After; ``best_effort``: serve it late.
    on_unmeetable: OnUnmeetable = "refuse"
    #: Measure a few small batch sizes at deploy time to seed the latency model.
    warmup: bool = True
    #: Most instances (workers holding the model) the autoscaler may run.
    max_instances: int = Field(1, ge=1, le=1024)
    device: str = "auto"
    options: dict[str, Any] = Field(default_factory=dict)
    compress: bool = False  # keep the cool copy compressed (ember.store.compress), if that saves 5%
    #: Generative models: the objectives for time to first token and time per output token, the most
    #: sequences one instance runs at once, and the longest prompt + output (None: the model's own).
    ttft_slo_ms: float = Field(DEFAULT_TTFT_SLO_MS, gt=0, le=3_600_000)
    tpot_slo_ms: float = Field(DEFAULT_TPOT_SLO_MS, gt=0, le=600_000)
    max_num_seqs: int = Field(DEFAULT_MAX_NUM_SEQS, ge=1, le=4096)
    max_model_len: int | None = Field(None, ge=16, le=1 << 20)
    #: The tenant that owns the model; set by the gateway from the caller's key (admins may choose).
    tenant: str | None = None
    #: Set by the server for an uploaded model: the folder it was unpacked into, which ``source`` is
    #: relative to (``ember.packaging``). None: ``source`` is on the server (admin keys only).
    package: str | None = None

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str | None) -> str | None:
        from ember.auth.keys import check_tenant_name

        return None if value is None else check_tenant_name(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"device {value!r}: use auto, cpu, cuda or cuda:N")
        return value

    @property
    def located(self) -> str:
        """``source`` as a path on this machine: inside the package, if the model was uploaded."""
        return self.source if self.package is None else str(Path(self.package) / self.source)

    @model_validator(mode="after")
    def _kind(self) -> DeploySpec:
        if self.kind is None:
            object.__setattr__(self, "kind", detect_kind(self.located))
        if self.name is None:
            object.__setattr__(self, "name", check_name(default_name(self.source)))
        return self


class UpdateSpec(BaseModel):
    """A change to a deployed model that needs no redeploy (``ember update``, ``PATCH /admin/models/NAME``).

    Each field left out stays as it is; the merged deployment is checked as a whole
    (``DeploySpec``'s own limits apply).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    slo_ms: float | None = None
    keepalive_hot_s: float | None = None
    keepalive_warm_s: float | None = None
    on_unmeetable: OnUnmeetable | None = None

    def changes(self) -> dict[str, Any]:
        """The fields given, by name."""
        return self.model_dump(exclude_none=True)


_KINDS_OF_VALUE = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a JSON object",
    "list": "a JSON list",
}


def validation_message(exc: ValidationError, fields: Iterable[str] = ()) -> str:
    """Every problem pydantic found, in Ember's words: ``slo_ms must be greater than 0 (got -1)``.

    pydantic's own sentences ("Input should be ...", "Value error, ...") never reach a user. An
    unknown field's message lists ``fields``, the ones there are.
    """
    known = sorted(fields)
    return "; ".join(_problem(error, known) for error in exc.errors())


def _problem(error: Any, fields: list[str]) -> str:
    kind = str(error["type"])
    field = ".".join(str(part) for part in error["loc"]) or "the body"
    ctx = error.get("ctx") or {}
    got = error.get("input")
    shown = f" (got {got!r})" if isinstance(got, int | float | str | bool) and len(repr(got)) <= 80 else ""
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"])).removeprefix("Value error, ")
    if kind == "missing":
        return f"{field} is required"
    if kind == "extra_forbidden":
        known = f"; the fields are {', '.join(fields)}" if fields else ""
        return f"there is no field '{field}'{known}"
    bounds = {
        "greater_than": ("greater than", "gt"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "less_than_equal": ("at most", "le"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        bound = ctx.get(key)
        return (
            f"{field} must be {words} {bound:g}{shown}"
            if isinstance(bound, float)
            else f"{field} must be {words} {bound}{shown}"
        )
    if kind == "finite_number":
        return f"{field} must be a finite number{shown}"
    if kind == "string_too_short":
        return f"{field} must not be empty" if ctx.get("min_length") == 1 else f"{field} is too short{shown}"
    if kind == "string_too_long":
        return f"{field} must be at most {ctx.get('max_length')} characters long"
    if kind == "literal_error":
        return f"{field} must be {ctx.get('expected')}{shown}"
    if kind == "int_from_float":
        return f"{field} must be a whole number{shown}"
    for prefix, wanted in _KINDS_OF_VALUE.items():
        if kind.startswith(f"{prefix}_"):
            return f"{field} must be {wanted}{shown}"
    return f"{field} has a value Ember cannot use{shown}"


def detect_kind(source: str) -> Kind:
    if ":" in source and not Path(source).exists():
        return "class"
    path = Path(source)
    if path.is_dir():
        return "hf"
    if path.suffix == ".gguf":
        return "gguf"
    if path.suffix == ".pt2":
        return "exported"
    if path.suffix in (".pt", ".pth", ".ts", ".torchscript"):
        return "torchscript"
    raise ValueError(
        f"cannot tell what {source!r} is: give file.py:Class or module:Class, a Hugging Face folder, "
        "a .gguf file, a .pt2 (torch.export) or .pt (TorchScript) file, or pass --kind"
    )


#: Folder and file names that say nothing about the model (a package's ``model/`` folder, a Hugging
#: Face cache's ``snapshots/<commit>``): the default name comes from the folder above them.
_GENERIC_NAMES = frozenset(
    {"model", "models", "weights", "checkpoint", "checkpoints", "snapshots", "main", "hf", "export", "exported"}
)


def default_name(source: str) -> str:
    """The model name when none is given: the class name, else the folder's (or file's) own name.

    A folder keeps its whole name (``bge-small-en-v1.5``); a file loses its suffix. Generic names
    (``model``, ``weights``, a commit hash) are passed over for the folder above, and a Hugging Face
    cache folder ``models--org--name`` gives ``name``.
    """
    if ":" in source and not Path(source).exists():
        return source.rsplit(":", 1)[1].lower()
    path = Path(source.rstrip("/") or "/")
    parts = [path.name if path.is_dir() else path.stem, *(p.name for p in path.parents)]
    for part in parts:
        if part.startswith("models--"):
            part = part.rsplit("--", 1)[-1]
        if not part or part.lower() in _GENERIC_NAMES or re.fullmatch(r"[0-9a-f]{40}", part):
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", part).lower().strip(".-_")[:63]
        if name:
            return name
    return "model"


def resolve_source(spec: DeploySpec) -> tuple[str, dict[str, Any]]:
    """The ``module:Class`` (or ``file.py:Class``) a worker instantiates, and its keyword options."""
    source = spec.located
    if spec.kind == "class":
        ref, _, attr = source.rpartition(":")
        if ref.endswith(".py"):
            path = Path(ref).expanduser().resolve()
            if not path.is_file():
                raise ValueError(f"{ref} does not exist; give the path to the file that defines {attr}")
            ref = str(path)
        return f"{ref}:{attr}", dict(spec.options)
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise ValueError(f"{spec.source} does not exist")
    adapter = CAUSAL_LM if spec.kind == "hf" and is_causal_lm_folder(path) else _ADAPTERS[str(spec.kind)]
    return adapter, {**spec.options, "path": str(path)}  # options cannot move the source


#: The adapter for generative models: Hugging Face causal-LM folders and GGUF files.
CAUSAL_LM = "ember.models.causal_lm:CausalLM"


def is_causal_lm_folder(path: Path) -> bool:
    """Whether a Hugging Face folder holds a causal (generative) language model: its ``config.json``
    names an architecture ``...ForCausalLM``."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(architectures, list) and any(str(a).endswith("ForCausalLM") for a in architectures)


@dataclass(frozen=True)
class ModelMetadata:
    """What the model says about itself at deploy time."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    task: str | None
    bytes: int = 0
    #: Generative models (``task == "generate"``): what the platform needs to schedule their tokens.
    generation: GenerationInfo | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "max_batch_size": self.max_batch_size,
            "task": self.task,
            "bytes": self.bytes,
            "generation": None if self.generation is None else self.generation.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelMetadata:
        return cls(
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            max_batch_size=int(data["max_batch_size"]),
            task=data.get("task"),
            bytes=int(data.get("bytes", 0)),
            generation=None if data.get("generation") is None else GenerationInfo.from_json(data["generation"]),
        )


@dataclass(frozen=True)
class Deployment:
    """A deployed model version, as everything inside Ember sees it."""

    name: str
    version: int
    model_ref: str
    options: dict[str, Any]
    metadata: ModelMetadata
    slo_ms: float
    max_batch_size: int
    max_batch_wait_ms: float
    keepalive_hot_s: float
    keepalive_warm_s: float
    max_queue: int
    device: str
    created_at: float = 0.0
    on_unmeetable: OnUnmeetable = "refuse"
    warmup: bool = True
    max_instances: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    ttft_slo_ms: float = DEFAULT_TTFT_SLO_MS
    tpot_slo_ms: float = DEFAULT_TPOT_SLO_MS
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    #: The longest prompt + output a sequence may reach (the deploy option, else the model's own).
    max_model_len: int | None = None

    @property
    def generative(self) -> bool:
        return self.metadata.task == "generate"

    @property
    def start_slo_s(self) -> float:
        """The objective a start from a lower tier counts against: a generative model's TTFT, else its SLO."""
        return (self.ttft_slo_ms if self.generative else self.slo_ms) / 1000.0

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tenant(self) -> str:
        """The tenant that owns the model (``default`` when it was deployed without one)."""
        return str(self.extra.get("tenant", "default"))
