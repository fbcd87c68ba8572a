"""A thin synchronous client for scripts and the CLI: :class:`Client`.

Ember's core is async; this is the one sync wrapper, over ``httpx``. It speaks the admin API
(deploy with streamed progress, list, inspect, update, remove, load, unload, status), the Open Inference
Protocol v2 with binary tensors (:meth:`Client.infer`), the OpenAI embeddings route
(:meth:`Client.embed`) and, for generative models, the OpenAI chat and completion routes, streamed
(:meth:`Client.generate`)::

    with Client("http://127.0.0.1:8000") as ember:
        ember.deploy("examples/minilm.py:MiniLM", slo_ms=50)
        vectors = ember.embed("minilm", ["hello", "world"])
        for piece in ember.generate("smollm2", "Why is the sky blue?", max_tokens=64):
            print(piece, end="", flush=True)

Every request carries an API key as ``Authorization: Bearer <key>``: the ``api_key`` argument, else
``EMBER_API_KEY``, else, for a server on this machine (a loopback URL), the admin key file in the
server's home (the ``home`` argument, else ``EMBER_HOME``, default ``~/.ember``) when it is readable
here, so the server's owner needs no setup. A 401 answer says which of these to set.

An error answer from the server comes back as the matching :mod:`ember.errors` class (400
``InvalidInput``, 401 ``Unauthorized``, 403 ``Forbidden``, 404 ``ModelNotFound``, 409 ``ModelExists``,
429 ``DeadlineUnmeetable``, 503 ``Overloaded`` with ``retry_after_s``, anything else ``EmberError``).
Transport failures (the server is not running, the connection dropped) stay ``httpx`` errors.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import numpy as np
import numpy.typing as npt

from ember.auth.keyfile import read_key_file
from ember.auth.keys import ADMIN_KEY_FILE
from ember.clock import WallClock
from ember.config import DeploySpec
from ember.errors import (
    DeadlineUnmeetable,
    EmberError,
    Forbidden,
    InvalidInput,
    ModelExists,
    ModelNotFound,
    Overloaded,
    Unauthorized,
)
from ember.gateway.tensors import encode_infer_request, parse_infer_response
from ember.packaging import PACKAGE_MEDIA_TYPE, SPEC_HEADER, pack

__all__ = ["Client", "find_api_key"]

Array = npt.NDArray[Any]
Progress = Callable[[dict[str, Any]], None]

DEFAULT_URL = "http://127.0.0.1:8000"
HEADER_LENGTH = "Inference-Header-Content-Length"
_DEPLOY_OPTIONS = frozenset(DeploySpec.model_fields) - {"source", "package"}


class Client:
    """A synchronous client of one Ember server. Use it as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout_s: float = 600,
        *,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
        home: Path | str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._key_origin = "the api_key argument" if api_key else None
        key = api_key
        if not key:
            key, self._key_origin = _find_key(self.url, home)
        self._home = _home(home)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, transport=transport, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- deployments -------------------------------------------------------------------------------

    def deploy(
        self,
        source: str,
        *,
        on_progress: Progress | None = None,
        load: bool = True,
        upload: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        """Deploy ``source``; ``options`` are :class:`~ember.config.DeploySpec` fields (None = default).

        A ``source`` on this machine (``file.py:Class``, a Hugging Face folder, a .pt2 or .pt file) is
        packed and uploaded with the deploy (:mod:`ember.packaging`), so the server may be anywhere.
        Anything else (``module:Class``, or any source with ``upload=False``) names something on the
        server, which only an admin key may deploy.

        ``on_progress`` gets every event the server streams (``importing``, ``stored``, ``loading``,
        ``ready``, ``done``); returns the deployed model as ``ember ls --json`` shows it.
        """
        unknown = sorted(set(options) - _DEPLOY_OPTIONS)
        if unknown:
            raise TypeError(
                f"deploy() got unknown option(s) {', '.join(unknown)}; use {', '.join(sorted(_DEPLOY_OPTIONS))}"
            )
        body = {"source": source, **{k: v for k, v in options.items() if v is not None}}
        params = None if load else {"load": "false"}
        package = pack(source) if upload else None
        if package is None:
            with self._http.stream("POST", "/admin/models", json=body, params=params) as response:
                return self._deploy_answer(response, on_progress)
        try:
            headers = {"Content-Type": PACKAGE_MEDIA_TYPE, SPEC_HEADER: json.dumps({**body, "source": package.source})}
            with (
                package.open() as content,
                self._http.stream("POST", "/admin/models", content=content, headers=headers, params=params) as response,
            ):
                return self._deploy_answer(response, on_progress)
        finally:
            package.remove()

    def models(self) -> list[dict[str, Any]]:
        """Every deployed model, as ``ember ls`` shows them."""
        result: list[dict[str, Any]] = self._json("GET", "/admin/models")
        return result

    def model(self, name: str) -> dict[str, Any]:
        """One deployed model, as ``ember ls`` shows it."""
        result: dict[str, Any] = self._json("GET", f"/admin/models/{_segment(name)}")
        return result

    def metadata(self, name: str) -> dict[str, Any]:
        """The model's Open Inference Protocol metadata: its inputs and outputs with their datatypes."""
        result: dict[str, Any] = self._json("GET", f"/v2/models/{_segment(name)}")
        return result

    def update(
        self,
        name: str,
        *,
        slo_ms: float | None = None,
        keepalive_hot_s: float | None = None,
        keepalive_warm_s: float | None = None,
        on_unmeetable: str | None = None,
    ) -> dict[str, Any]:
        """Change a deployed model's SLO, keep-alives or on-unmeetable mode (``"refuse"`` or ``"best_effort"``)
        in place; what is left None stays. Returns the model as ``ember ls`` shows it."""
        changes = {
            "slo_ms": slo_ms,
            "keepalive_hot_s": keepalive_hot_s,
            "keepalive_warm_s": keepalive_warm_s,
            "on_unmeetable": on_unmeetable,
        }
        body = {k: v for k, v in changes.items() if v is not None}
        result: dict[str, Any] = self._json("PATCH", f"/admin/models/{_segment(name)}", json=body)
        return result

    def remove(self, name: str) -> None:
        """Remove a deployment and its stored weights."""
        self._json("DELETE", f"/admin/models/{_segment(name)}")

    def load(self, name: str) -> dict[str, Any]:
        """Make the model hot now; returns it as ``ember ls`` shows it."""
        result: dict[str, Any] = self._json("POST", f"/admin/models/{_segment(name)}/load")
        return result

    def unload(self, name: str, tier: str = "cool") -> dict[str, Any]:
        """Demote the model to ``tier``: ``"cool"`` (weights on local disk only) or ``"warm"`` (off the
        device, weights kept in host memory). It stays deployed and callable; returns it as ``ember ls``
        shows it. The server refuses another tier name with InvalidInput."""
        path = f"/admin/models/{_segment(name)}/unload"
        result: dict[str, Any] = self._json("POST", path, params={"tier": tier})
        return result

    def status(self) -> dict[str, Any]:
        """The server's status: workers and store tiers."""
        result: dict[str, Any] = self._json("GET", "/admin/status")
        return result

    def usage(self, since: float | None = None, tenant: str | None = None) -> dict[str, Any]:
        """Metered usage (``GET /admin/usage``): device-seconds and GB-seconds per model and tenant,
        since ``since`` (wall-clock seconds), of ``tenant`` (admin keys; other keys see their own)."""
        params = {k: v for k, v in (("since", None if since is None else repr(since)), ("tenant", tenant)) if v}
        result: dict[str, Any] = self._json("GET", "/admin/usage", params=params)
        return result

    # -- requests ----------------------------------------------------------------------------------

    def infer(self, name: str, inputs: Mapping[str, np.ndarray], timeout_s: float | None = None) -> dict[str, Array]:
        """Run one request over the Open Inference Protocol v2, tensors in binary both ways.

        ``timeout_s`` is the request's own deadline (sent as Triton's ``timeout`` parameter, in
        microseconds); without it the model's SLO applies.
        """
        parameters = None if timeout_s is None else {"timeout": max(1, round(timeout_s * 1e6))}
        body, header_length = encode_infer_request(inputs, binary=True, parameters=parameters)
        headers = {"Content-Type": "application/json"}
        if header_length is not None:
            headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
        response = self._http.post(f"/v2/models/{_segment(name)}/infer", content=body, headers=headers)
        if not response.is_success:
            raise self._error(response)
        raw_length = response.headers.get(HEADER_LENGTH)
        if raw_length is not None and not raw_length.strip().isdigit():
            raise EmberError(f"the server sent {HEADER_LENGTH}: {raw_length!r}, which is not a byte count")
        return parse_infer_response(response.content, None if raw_length is None else int(raw_length))

    def embed(self, name: str, texts: list[str]) -> Array:
        """Embed ``texts`` with an embedding model (``POST /v1/embeddings``): one FP32 row per text."""
        answer = self._json("POST", "/v1/embeddings", json={"model": name, "input": texts, "encoding_format": "float"})
        rows = sorted(answer["data"], key=lambda item: int(item["index"]))
        return np.asarray([row["embedding"] for row in rows], dtype=np.float32)

    def generate(
        self,
        name: str,
        prompt: str,
        *,
        chat: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Iterator[str]:
        """Stream a generative model's answer to ``prompt``, piece by piece as its tokens come.

        With ``chat`` the prompt is one user message (``POST /v1/chat/completions``; the model's chat
        template applies); without, a raw completion prompt (``POST /v1/completions``). Errors raise the
        matching :mod:`ember.errors` class, before the first piece or during the stream. Stopping the
        iteration early closes the connection, which stops the generation on the server.
        """
        body: dict[str, Any] = {"model": name, "stream": True}
        body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop}
        body.update({k: v for k, v in sampling.items() if v is not None})
        path = "/v1/chat/completions" if chat else "/v1/completions"
        with self._http.stream("POST", path, json=body) as response:
            if not response.is_success:
                response.read()
                raise self._error(response)
            yield from _stream_text(response.iter_lines(), chat)

    def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.1) -> None:
        """Wait until the server answers ``GET /v2/health/ready`` with 200; ``TimeoutError`` if it does not."""
        clock = WallClock()
        deadline = clock.now() + timeout_s
        last = "no answer yet"
        while True:
            try:
                response = self._http.get("/v2/health/ready", timeout=max(0.1, min(5.0, timeout_s)))
                if response.is_success:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if clock.now() >= deadline:
                raise TimeoutError(
                    f"Ember at {self.url} was not ready after {timeout_s:g} s ({last}); is `ember serve` running there?"
                )
            time.sleep(min(interval_s, max(0.0, deadline - clock.now())))  # clock-ok: a client polling a server

    def request_json(self, method: str, path: str, body: Any = None) -> Any:
        """Any admin API call: ``body`` as JSON, the JSON answer back (``ember keys`` and ``ember tenants``)."""
        return self._json(method, path, json=body)

    # -- internals ---------------------------------------------------------------------------------

    def _deploy_answer(self, response: httpx.Response, on_progress: Progress | None) -> dict[str, Any]:
        if not response.is_success:
            response.read()
            raise self._error(response)
        return _read_deploy_stream(response.iter_lines(), on_progress)

    def _error(self, response: httpx.Response) -> EmberError:
        error = _error_from_response(response)
        if isinstance(error, Unauthorized):
            return Unauthorized(f"{error.message.rstrip('.')}. {_key_hint(self.url, self._key_origin, self._home)}")
        return error

    def _json(self, method: str, path: str, json: Any = None, params: Mapping[str, str] | None = None) -> Any:
        response = self._http.request(method, path, json=json, params=params)
        if not response.is_success:
            raise self._error(response)
        try:
            return response.json()
        except ValueError as exc:
            raise EmberError(f"{method} {path} answered with something that is not JSON: {exc}") from exc


def find_api_key(url: str = DEFAULT_URL, home: Path | str | None = None) -> str | None:
    """``EMBER_API_KEY``, else the admin key file in ``home`` (default: ``EMBER_HOME``, else
    ``~/.ember``), else None.

    The file is read only for a server on this machine (a loopback ``url``): the local admin key is
    never sent elsewhere.
    """
    return _find_key(url, home)[0]


def _find_key(url: str, home: Path | str | None) -> tuple[str | None, str | None]:
    """The key and where it came from (None, None: no key)."""
    from_env = os.environ.get("EMBER_API_KEY", "").strip()
    if from_env:
        return from_env, "EMBER_API_KEY"
    if not _is_loopback(url):
        return None, None
    path = _home(home) / ADMIN_KEY_FILE
    from_file = read_key_file(path)
    return (from_file, str(path)) if from_file else (None, None)


def _home(home: Path | str | None) -> Path:
    return Path(home or os.environ.get("EMBER_HOME") or "~/.ember").expanduser()


def _is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key_hint(url: str, origin: str | None, home: Path) -> str:
    """What to set when the server refused this client's key (or its lack of one)."""
    if origin is None:
        if _is_loopback(url):
            return (
                f"No API key was sent: there is no readable {home / ADMIN_KEY_FILE}. Set EMBER_HOME (or pass "
                "--home) to the folder `ember serve --home` uses, or set EMBER_API_KEY to a key"
            )
        return "No API key was sent: set EMBER_API_KEY to a key for this server (`ember keys create` makes one)"
    if origin == "EMBER_API_KEY":
        return "The key in EMBER_API_KEY was refused: set EMBER_API_KEY to a live key, or unset it to use admin.key"
    if origin.endswith(ADMIN_KEY_FILE):
        return (
            f"The key in {origin} was refused: that server runs with another home; set EMBER_HOME (or pass --home) "
            "to the folder `ember serve --home` uses, or set EMBER_API_KEY"
        )
    return f"The key from {origin} was refused"


def _segment(name: str) -> str:
    """``name`` as one URL path segment."""
    return quote(name, safe="")


def _read_deploy_stream(lines: Iterator[str], on_progress: Progress | None) -> dict[str, Any]:
    """Follow the NDJSON deploy progress; the ``done`` event's model, or the ``error`` event raised."""
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise EmberError(f"the server sent a deploy progress line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(event, dict):
            raise EmberError(f"the server sent a deploy progress line that is not an object: {line[:200]!r}")
        stage = event.get("stage")
        if stage == "error":
            raise _error_from(int(event.get("status", 500)), str(event.get("error", "the deploy failed")))
        if on_progress is not None:
            on_progress(event)
        if stage == "done":
            model: dict[str, Any] = event["model"]
            return model
    raise EmberError(
        "the server ended the deploy stream before it finished; `ember ls` shows whether the model was deployed"
    )


def _stream_text(lines: Iterator[str], chat: bool) -> Iterator[str]:
    """The text of each server-sent chunk of an OpenAI stream, until ``data: [DONE]``."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise EmberError(f"the server sent a stream event that is not JSON: {data[:200]!r}") from exc
        if not isinstance(chunk, dict):
            raise EmberError(f"the server sent a stream event that is not an object: {data[:200]!r}")
        if "error" in chunk:
            raise EmberError(_error_message(chunk["error"]))
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                yield str(text)
    raise EmberError("the server ended the stream before it finished (no [DONE]); retry the request")


def _error_message(error: Any) -> str:
    """An error body's message: ``{"error": "..."}``, or OpenAI's ``{"error": {"message": "..."}}``."""
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return str(error)


def _error_from_response(response: httpx.Response) -> EmberError:
    try:
        body = response.json()
        message = _error_message(body["error"]) if isinstance(body, dict) and "error" in body else response.text
    except ValueError:
        message = response.text
    message = message.strip() or f"HTTP {response.status_code} {response.reason_phrase}"
    return _error_from(response.status_code, message, response.headers.get("Retry-After"))


def _error_from(status: int, message: str, retry_after: str | None = None) -> EmberError:
    """The :mod:`ember.errors` class the server raised, rebuilt from its HTTP status and message."""
    if status in (400, 413, 422, 431):
        return InvalidInput(message)
    if status == 401:
        return Unauthorized(message)
    if status == 403:
        return Forbidden(message)
    if status == 404:
        # ModelNotFound builds its message from a name; here the server's message is already whole.
        error = ModelNotFound.__new__(ModelNotFound)
        EmberError.__init__(error, message)
        error.name = ""
        return error
    if status == 409:
        return ModelExists(message)
    if status == 429:
        return DeadlineUnmeetable(message, _retry_after_s(retry_after))
    if status == 503:
        return Overloaded(message, _retry_after_s(retry_after))
    return EmberError(message)


def _retry_after_s(header: str | None) -> float:
    try:
        return max(0.0, float(header)) if header is not None else 1.0
    except ValueError:
        return 1.0
