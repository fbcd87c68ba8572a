"""The model host: the models loaded in one worker, and how a batch runs through them.

A batch arrives as a list of requests (each a mapping of input name to array, batch dimension
first). The host runs each request's ``decode``, concatenates requests whose inputs agree in dtype
and trailing shape, calls ``predict`` once per such group, splits the outputs back by rows and runs
each request's ``encode``. A failure is confined to the group (or request) it happened in.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import importlib
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ember.api import ANSWER_MISMATCH, Arrays, GenerativeModel, ModelAPI, check_answer
from ember.errors import InvalidInput
from ember.generation import GenerateRequest, TokenChunk
from ember.store.convert import write_checkpoint
from ember.store.loader import LoaderConfig, load_checkpoint
from ember.store.store import WEIGHTS
from ember.worker.generation import GenerationEngine
from ember.worker.protocol import Batch, rows_of

__all__ = ["ENGINE_OPTIONS", "ClassNotFound", "ModelHost", "instantiate", "resolve_class"]

#: Load options a generative model's engine takes (from the Deployment), not its class.
ENGINE_OPTIONS = ("max_num_seqs", "max_model_len", "kv_budget_bytes", "max_step_tokens")
#: A sequence's failure: (the id of its Generate, the error, the error's kind).
SeqFailure = tuple[int, str, str]

Array = npt.NDArray[Any]


class ClassNotFound(LookupError):
    """The model reference names a class that its file or module does not define."""


def resolve_class(model_ref: str) -> type[ModelAPI]:
    """``path/to/file.py:Class`` or ``package.module:Class`` -> the class."""
    ref, sep, attr = model_ref.rpartition(":")
    if not sep or not attr:
        raise ValueError(f"model reference {model_ref!r}: write it as file.py:Class or module:Class")
    if ref.endswith(".py"):
        path = Path(ref)
        name = "ember_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ValueError(f"cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(path.parent))
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
    else:
        module = importlib.import_module(ref)
    cls = getattr(module, attr, None)
    if cls is None:
        raise ClassNotFound(_not_found(ref, attr, module))
    if not isinstance(cls, type) or not issubclass(cls, ModelAPI):
        raise ValueError(
            f"{model_ref}: {attr} is not a model class; name a class of {ref} that subclasses ember.ModelAPI"
        )
    return cls


def _not_found(ref: str, attr: str, module: ModuleType) -> str:
    """``class 'X' not found in ref``, with the closest model class the module defines."""
    models = sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, ModelAPI) and value is not ModelAPI
    )
    close = difflib.get_close_matches(attr, models, n=1, cutoff=0.5)
    if close:
        return f"class '{attr}' not found in {ref}; did you mean '{close[0]}'? Deploy {ref}:{close[0]}"
    if models:
        return f"class '{attr}' not found in {ref}; its model classes are {', '.join(models)}"
    return f"class '{attr}' not found in {ref}, which defines no subclass of ember.ModelAPI"


def instantiate(model_ref: str, options: Mapping[str, Any]) -> ModelAPI:
    return resolve_class(model_ref)(**options)


def describe(model: ModelAPI) -> dict[str, Any]:
    if isinstance(model, GenerativeModel) or model.task == "generate":
        if not isinstance(model, GenerativeModel):
            raise ValueError(f"{type(model).__name__}.task = 'generate': subclass ember.GenerativeModel instead")
        return {
            "inputs": [t.to_json() for t in model.inputs],
            "outputs": [t.to_json() for t in model.outputs],
            "max_batch_size": int(model.max_batch_size),
            "task": "generate",
            "generation": model.generation_info().to_json(),
        }
    if not model.inputs or not model.outputs:
        raise ValueError(f"{type(model).__name__} must declare its inputs and outputs (TensorSpec tuples)")
    if model.task not in (None, "embeddings"):
        raise ValueError(
            f"{type(model).__name__}.task = {model.task!r}: use 'embeddings', or None; subclass GenerativeModel"
        )
    return {
        "inputs": [t.to_json() for t in model.inputs],
        "outputs": [t.to_json() for t in model.outputs],
        "max_batch_size": int(model.max_batch_size),
        "task": model.task,
    }


class ModelHost:
    def __init__(self, device: torch.device, loader: LoaderConfig | None = None) -> None:
        self.device = device
        self.loader = loader or LoaderConfig()
        self.models: dict[str, ModelAPI] = {}
        #: The step loop of each loaded generative model, and which model each sequence runs on.
        self.engines: dict[str, GenerationEngine] = {}
        self._seq_model: dict[int, str] = {}

    def import_model(
        self,
        model_ref: str,
        options: Mapping[str, Any],
        staging: Path,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Run the model's deploy-time hooks into ``staging``; ``progress(done, total)`` hears the
        weight bytes written."""
        model = instantiate(model_ref, options)
        weights = model.source_weights()
        assets = model.source_assets()
        metadata = describe(model)
        size = write_checkpoint(staging / WEIGHTS, weights, progress=progress)
        (staging / "assets").mkdir(exist_ok=True)
        for name, data in assets.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"asset name {name!r}: use a plain file name")
            (staging / "assets" / name).write_bytes(data)
        del model, weights
        gc.collect()
        return {**metadata, "bytes": size}

    def load(
        self,
        key: str,
        model_ref: str,
        options: Mapping[str, Any],
        weights_path: Path,
        assets: Mapping[str, bytes],
    ) -> float:
        start = time.perf_counter()  # clock-ok: the worker measures its own work
        engine_options = {k: v for k, v in options.items() if k in ENGINE_OPTIONS and v is not None}
        model = instantiate(model_ref, {k: v for k, v in options.items() if k not in ENGINE_OPTIONS})
        weights = load_checkpoint(weights_path, self.device, self.loader)
        model.setup(weights, assets, self.device)
        if isinstance(model, GenerativeModel):
            self.engines[key] = GenerationEngine(model, **{k: int(v) for k, v in engine_options.items()})
        self.models[key] = model
        return time.perf_counter() - start  # clock-ok

    def unload(self, key: str) -> list[int]:
        """Forget ``key``; the ids of the sequences it was still running (stopped, never answered)."""
        # No gc.collect() here: a full collection in a process holding torch and transformers takes
        # 0.3-0.5 s, and the next message (maybe a promotion) would wait behind it. Reference
        # counting frees the model's tensors as soon as the last reference goes.
        engine = self.engines.pop(key, None)
        dropped = [] if engine is None else engine.cancel_all()
        for seq_id in dropped:
            self._seq_model.pop(seq_id, None)
        if self.models.pop(key, None) is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return dropped

    # -- generative models -------------------------------------------------------------------------

    def generate(self, key: str, seq_id: int, request: GenerateRequest) -> None:
        """Queue a sequence on ``key``'s engine: it joins at the next step."""
        engine = self.engines.get(key)
        if engine is None:
            if key in self.models:
                raise InvalidInput(f"model {key.partition('@')[0]} is not generative; call its infer route")
            raise KeyError(f"model {key} is not loaded on this worker")
        engine.add(seq_id, request)
        self._seq_model[seq_id] = key

    def cancel(self, seq_id: int) -> bool:
        """Stop a sequence and free its cache now; False if it had already finished."""
        key = self._seq_model.pop(seq_id, None)
        engine = None if key is None else self.engines.get(key)
        return engine is not None and engine.cancel(seq_id)

    @property
    def generating(self) -> bool:
        return any(engine.has_work for engine in self.engines.values())

    def step(self) -> tuple[list[tuple[int, TokenChunk]], list[SeqFailure]]:
        """One step of every generative model with work: the chunks produced, and the sequences
        that failed (a model whose step raised fails the sequences it was running)."""
        chunks: list[tuple[int, TokenChunk]] = []
        failed: list[SeqFailure] = []
        for key, engine in list(self.engines.items()):
            if not engine.has_work:
                continue
            try:
                produced = engine.step()
            except Exception as exc:
                _log_failure(key, "step")
                error = f"{type(exc).__name__}: {exc}"
                failed += [(seq_id, error, "ModelFailed") for seq_id in engine.cancel_all()]
                continue
            for seq_id, chunk in produced:
                chunks.append((seq_id, chunk))
                if chunk.finish_reason is not None:
                    self._seq_model.pop(seq_id, None)
        for seq_id, _, _ in failed:
            self._seq_model.pop(seq_id, None)
        return chunks, failed

    def infer(self, key: str, requests: list[Arrays]) -> Batch:
        model = self.models.get(key)
        if model is None:
            raise KeyError(f"model {key} is not loaded on this worker")
        start = time.perf_counter()  # clock-ok
        results: list[Arrays | str] = [""] * len(requests)
        groups: dict[tuple[Any, ...], list[tuple[int, Arrays]]] = {}
        for i, request in enumerate(requests):
            try:
                decoded = dict(model.decode(request))
            except Exception as exc:
                results[i] = f"decode failed: {type(exc).__name__}: {exc}"
                _log_failure(key, "decode")
                continue
            groups.setdefault(_signature(decoded), []).append((i, decoded))
        for members in groups.values():
            self._run_group(key, model, members, results)
        return Batch(results, time.perf_counter() - start)  # clock-ok

    def _run_group(
        self, key: str, model: ModelAPI, members: list[tuple[int, Arrays]], results: list[Arrays | str]
    ) -> None:
        rows = [rows_of(arrays) for _, arrays in members]
        if len(members) == 1:
            batch = members[0][1]
        else:
            batch = {name: np.concatenate([arrays[name] for _, arrays in members]) for name in members[0][1]}
        try:
            with torch.inference_mode():
                outputs = {name: np.asarray(value) for name, value in model.predict(batch).items()}
        except Exception as exc:
            if len(members) > 1:
                # One request may have broken the whole batch: run each alone, so that only the
                # requests that fail by themselves are answered with the error.
                for member in members:
                    self._run_group(key, model, [member], results)
                return
            _log_failure(key, "predict")
            results[members[0][0]] = f"predict failed: {type(exc).__name__}: {exc}"
            return
        total = sum(rows)
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != total:
                # Not retried request by request: a model that answers one row whatever it is given
                # would pass alone and fail every batch.
                wrong = (
                    f"{ANSWER_MISMATCH}: output '{name}' has shape {tuple(value.shape)} for a batch of {total} rows; "
                    "predict must return one row per input row, in order"
                )
                for i, _ in members:
                    results[i] = wrong
                return
        offset = 0
        for (i, _), n in zip(members, rows, strict=True):
            part = {name: value[offset : offset + n] for name, value in outputs.items()}
            offset += n
            try:
                answer = dict(model.encode(part))
            except Exception as exc:
                _log_failure(key, "encode")
                results[i] = f"encode failed: {type(exc).__name__}: {exc}"
                continue
            mismatch = check_answer(model.outputs, answer, n)
            results[i] = answer if mismatch is None else mismatch


def _log_failure(key: str, hook: str) -> None:
    """Write the model's traceback to the worker log (``ember logs`` shows it)."""
    print(f"ember worker {os.getpid()}: {key}: {hook} raised:\n{traceback.format_exc()}", file=sys.stderr, flush=True)


def _signature(arrays: Arrays) -> tuple[Any, ...]:
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in arrays.items()))
