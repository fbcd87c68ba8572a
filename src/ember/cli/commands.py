"""``ember``: the command line. Thin: parse, validate, call the library.

    ember serve [--deploy SOURCE ...]     run the server (and deploy the quick start's models)
    ember deploy SOURCE [options]         import a model into the store and bring it up
    ember ls | status | logs              what is deployed, how the server is, what the workers said
    ember describe NAME                   one model in full: inputs, outputs, SLO, tier, options (ember.cli.describe)
    ember invoke NAME "prompt"            stream a generative model's answer (--max-tokens, --temperature)
    ember invoke NAME --text/--data       call a one-shot model
    ember load | unload | rm NAME         make hot now, demote (--to cool|warm), remove
    ember store ls|import|verify|export|bench   the weight store, in --home (see ember.cli.store)
    ember sim SCENARIO [--json PATH]       replay a workload against the policies in virtual time (ember.cli.sim)
    ember usage [--tenant T] [--since 1h]  device-seconds and GB-seconds per model and tenant (ember.cli.usage)
    ember keys create|ls|revoke, ember tenants set|ls   API keys and quotas (see ember.cli.keys)

Every command but ``serve`` and ``logs`` talks to a running server through :class:`ember.Client`
(``--url``, or ``EMBER_URL``) with an API key (``EMBER_API_KEY``, or the admin key file in
``EMBER_HOME``, default ``~/.ember``). An error prints ``error: <what to do>`` and exits 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import numpy.typing as npt
import typer
from rich.table import Table
from rich.text import Text

from ember import __version__
from ember.cli.common import (
    DASH,
    DEFAULT_HOME,
    HomeOption,
    UrlOption,
    absolute_source,
    cold_start,
    console,
    errors,
    fail,
    print_table,
    size_text,
)
from ember.cli.describe import describe
from ember.cli.keys import keys_app, tenants_app
from ember.cli.progress import DeployProgress
from ember.cli.serve import curl_example, is_loopback, serve
from ember.cli.sim import sim
from ember.cli.store import store_app
from ember.cli.usage import usage
from ember.client import DEFAULT_URL, Client
from ember.config import (
    DEFAULT_KEEPALIVE_HOT_S,
    DEFAULT_KEEPALIVE_WARM_S,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_SLO_MS,
    DEFAULT_TPOT_SLO_MS,
    DEFAULT_TTFT_SLO_MS,
)
from ember.errors import InvalidInput
from ember.gateway.tensors import DATATYPES

if TYPE_CHECKING:
    pass

__all__ = ["absolute_source", "app", "curl_example", "is_loopback", "main"]

Array = npt.NDArray[Any]

app = typer.Typer(
    name="ember",
    help="Serverless inference for deep-learning models: scale to zero, back in milliseconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(serve)
app.command("describe")(describe)
app.add_typer(store_app)
app.command("sim")(sim)
app.command("usage")(usage)
app.add_typer(keys_app)
app.add_typer(tenants_app)

_TIER_STYLES = {"hot": "red", "warm": "yellow", "cool": "blue"}


class Kind(StrEnum):
    CLASS = "class"
    HF = "hf"
    EXPORTED = "exported"
    TORCHSCRIPT = "torchscript"


class UnloadTier(StrEnum):
    COOL = "cool"
    WARM = "warm"


class OnUnmeetable(StrEnum):
    REFUSE = "refuse"
    BEST_EFFORT = "best-effort"


def main() -> None:
    """The ``ember`` console entry point."""
    app()


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print Ember's version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"ember {__version__}")
        raise typer.Exit()


# -- deploy ----------------------------------------------------------------------------------------


@app.command()
def deploy(
    source: Annotated[
        str, typer.Argument(help="file.py:Class, module:Class, a Hugging Face folder, a .pt2 or .pt file.")
    ],
    name: Annotated[str | None, typer.Option(help="Model name (default: from the source).")] = None,
    kind: Annotated[Kind | None, typer.Option(help="What SOURCE is (default: detected).")] = None,
    slo_ms: Annotated[
        float | None, typer.Option(min=0, help=f"Latency objective per request (default: {DEFAULT_SLO_MS:g}).")
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(min=1, help="Most rows per batch (default: the model's).")
    ] = None,
    max_batch_wait_ms: Annotated[
        float | None, typer.Option(min=0, help="Longest wait to fill a batch (default: 0).")
    ] = None,
    keepalive_hot_s: Annotated[
        float | None,
        typer.Option(
            min=0, help=f"Seconds on the device after the last request (default: {DEFAULT_KEEPALIVE_HOT_S:g})."
        ),
    ] = None,
    keepalive_warm_s: Annotated[
        float | None,
        typer.Option(min=0, help=f"Then seconds in host memory (default: {DEFAULT_KEEPALIVE_WARM_S:g})."),
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(min=1, help="Queued requests before refusing (default: 1024).")
    ] = None,
    on_unmeetable: Annotated[
        OnUnmeetable | None,
        typer.Option(
            help="A request predicted to miss its SLO even alone: refuse it at once (429 + Retry-After) "
            "or serve it late (default: refuse)."
        ),
    ] = None,
    warmup: Annotated[bool, typer.Option(help="Time a few small batches at deploy to seed the latency model.")] = True,
    max_instances: Annotated[
        int | None, typer.Option(min=1, help="Most workers holding the model at once (default: 1).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default: auto).")] = None,
    ttft_slo_ms: Annotated[
        float | None,
        typer.Option(
            min=0, help=f"Generative models: time-to-first-token objective (default: {DEFAULT_TTFT_SLO_MS:g})."
        ),
    ] = None,
    tpot_slo_ms: Annotated[
        float | None,
        typer.Option(
            min=0, help=f"Generative models: time-per-output-token objective (default: {DEFAULT_TPOT_SLO_MS:g})."
        ),
    ] = None,
    max_num_seqs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"Generative models: most sequences one instance runs at once (default: {DEFAULT_MAX_NUM_SEQS}).",
        ),
    ] = None,
    max_model_len: Annotated[
        int | None,
        typer.Option(
            min=16, help="Generative models: most tokens of prompt and answer together (default: the model's own)."
        ),
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", help="KEY=JSON passed to the model class (repeatable).")
    ] = None,
    no_load: Annotated[bool, typer.Option("--no-load", help="Import into the store but do not load it.")] = False,
    compress: Annotated[
        bool, typer.Option("--compress", help="Keep the weights compressed on disk (pays when disk reads are slow).")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Deploy a model: import its weights into the store once, then bring it up.

    A SOURCE on this machine is uploaded (a class file's folder, a Hugging Face folder, a .pt2 or .pt
    file), so the server may be anywhere; a module:Class names code on the server (admin keys only).
    """
    options = parse_options(option or [])
    resolved = absolute_source(source)
    with errors(url), Client(url, home=home) as client, DeployProgress(console, source) as progress:
        model = client.deploy(
            resolved,
            on_progress=progress,
            load=not no_load,
            name=name,
            kind=None if kind is None else kind.value,
            slo_ms=slo_ms,
            max_batch_size=max_batch_size,
            max_batch_wait_ms=max_batch_wait_ms,
            keepalive_hot_s=keepalive_hot_s,
            keepalive_warm_s=keepalive_warm_s,
            max_queue=max_queue,
            on_unmeetable=None if on_unmeetable is None else on_unmeetable.value.replace("-", "_"),
            warmup=None if warmup else False,
            max_instances=max_instances,
            device=device,
            options=options or None,
            compress=compress or None,
            ttft_slo_ms=ttft_slo_ms,
            tpot_slo_ms=tpot_slo_ms,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
        )
    generation = model.get("generation")
    objective = (
        f"SLO {model['slo_ms']:g} ms"
        if not generation
        else f"TTFT {generation['ttft_slo_ms']:g} ms, TPOT {generation['tpot_slo_ms']:g} ms"
    )
    console.print(
        f"deployed {model['name']} v{model['version']}: {model['tier']}, {size_text(int(model['bytes']))}, {objective}",
        highlight=False,
    )


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["k=1", 'name="x"']`` -> ``{"k": 1, "name": "x"}``: each value is JSON."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise typer.BadParameter(
                f"{item!r}: write KEY=JSON, like revision='\"main\"' or dim=384", param_hint="--option"
            )
        if key in options:
            raise typer.BadParameter(f"{key!r} is given twice", param_hint="--option")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            raise typer.BadParameter(
                f"{item!r}: the value is not JSON; quote a string as {key}='\"{raw}\"'", param_hint="--option"
            ) from None
    return options


# -- what is there ---------------------------------------------------------------------------------


@app.command("ls")
def list_models(
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the deployed models: tier, traffic, SLO attainment, last cold start."""
    with errors(url), Client(url, home=home) as client:
        models = client.models()
    if as_json:
        typer.echo(json.dumps(models, indent=2))
    elif not models:
        console.print("no models deployed; deploy one with `ember deploy SOURCE`", highlight=False)
    else:
        print_table(models_table(models))


def models_table(models: Sequence[Mapping[str, Any]]) -> Table:
    """One row per model; with a generative model among them, its TTFT and TPOT attainment and output
    tokens per second too (its SLO column shows both objectives, TTFT/TPOT)."""
    generative = any(m.get("generation") for m in models)
    table = Table(box=None, header_style="bold")
    for header in ("name", "version", "tier", "instances", "requests", "failed", "queued"):
        table.add_column(header, justify="right" if header not in ("name", "tier") else "left")
    for header in ("SLO ms", "SLO met"):
        table.add_column(header, justify="right")
    if generative:
        for header in ("TTFT met", "TPOT met", "tok/s"):
            table.add_column(header, justify="right")
    for header in ("last cold start", "size"):
        table.add_column(header, justify="left" if header == "last cold start" else "right")
    for m in models:
        generation = m.get("generation")
        slo = f"{float(m['slo_ms']):g}"
        extra: list[str] = []
        if generation:
            slo = f"{float(generation['ttft_slo_ms']):g}/{float(generation['tpot_slo_ms']):g}"
            rate = f"{float(generation['tokens_per_s']):.1f}"
            extra = [_percent(generation.get("ttft_attainment")), _percent(generation.get("tpot_attainment")), rate]
        elif generative:
            extra = [DASH, DASH, DASH]
        table.add_row(
            str(m["name"]),
            str(m["version"]),
            Text(str(m["tier"]), style=_TIER_STYLES.get(str(m["tier"]), "")),
            str(m["instances"]),
            str(m["requests"]),
            str(m["failed"]),
            str(m["queued"]),
            slo,
            _percent(m.get("slo_attainment")),
            *extra,
            cold_start(m.get("last_cold_start")),
            size_text(int(m.get("bytes", 0))),
        )
    return table


def _percent(fraction: object) -> str:
    return DASH if not isinstance(fraction, int | float) else f"{100 * float(fraction):.1f}%"


@app.command()
def status(
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the server: workers and store tiers."""
    with errors(url), Client(url, home=home) as client:
        state = client.status()
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    workers = state.get("workers", {})
    store = state.get("store", {})
    console.print(
        f"Ember at {url}: {'ready' if state.get('ready') else 'not ready'}, pid {state.get('pid')}, "
        f"home {state.get('home')}, {state.get('models', 0)} models",
        highlight=False,
    )
    console.print(
        f"workers: {workers.get('ready', 0)}/{workers.get('size', 0)} ready "
        f"({workers.get('backend', '?')} backend, {workers.get('restarts', 0)} restarts)",
        highlight=False,
    )
    rows = workers.get("workers", [])
    if rows:
        table = Table(box=None, header_style="bold")
        for header in ("id", "pid", "device", "alive", "in flight"):
            table.add_column(header)
        for w in rows:
            alive = Text("yes", style="green") if w.get("alive") else Text("no", style="red")
            table.add_row(str(w.get("id")), str(w.get("pid")), str(w.get("device")), alive, str(w.get("in_flight")))
        print_table(table)
    for node in workers.get("nodes", []):
        state_text = "up" if node.get("alive") else "gone"
        held = node.get("store") or {}
        tiers = ", ".join(f"{tier}: {', '.join(keys) or '-'}" for tier, keys in sorted(held.get("models", {}).items()))
        refused = f"; takes no new models: {held['refusing']}" if held.get("refusing") else ""
        console.print(
            f"node {str(node.get('id'))[:12]} ({node.get('address')}, {state_text}): "
            f"workers {', '.join(node.get('workers', [])) or '-'}" + (f"; {tiers}" if tiers else "") + refused,
            highlight=False,
        )
    for tier in ("warm", "cool"):
        t = store.get(tier, {})
        console.print(
            Text.assemble(
                (f"{tier:>5}", _TIER_STYLES[tier]),
                f" store: {t.get('models', 0)} models, {size_text(int(t.get('bytes', 0)))}",
            )
        )
    arena = store.get("arena")
    if arena:
        console.print(
            f"warm arena: {size_text(int(arena['used_bytes']))} of {size_text(int(arena['bytes']))} in use, "
            f"largest free run {size_text(int(arena['largest_free_bytes']))}",
            highlight=False,
        )
    for name, g in (state.get("generation") or {}).items():
        console.print(
            f"generative {name}: {g.get('running', 0)} running, {g.get('waiting', 0)} waiting, "
            f"{float(g.get('tokens_per_s', 0.0)):.1f} tokens/s, TTFT met {_percent(g.get('ttft_attainment'))}, "
            f"TPOT met {_percent(g.get('tpot_attainment'))}",
            highlight=False,
        )
    links = state.get("bandwidths")
    if links:
        origin = f"measured {links.get('measured_at')}" if links.get("measured") else "defaults"
        console.print(
            f"first loads: cool->warm {links['disk_bytes_per_s'] / 1e9:.2f} GB/s, "
            f"warm->hot {links['host_to_device_bytes_per_s'] / 1e9:.2f} GB/s, setup {links['setup_s'] * 1000:.0f} ms "
            f"({origin})",
            highlight=False,
        )


# -- acting on one model ---------------------------------------------------------------------------


@app.command()
def update(
    name: str,
    slo_ms: Annotated[float | None, typer.Option(min=0, help="A new latency objective per request.")] = None,
    keepalive_hot_s: Annotated[
        float | None, typer.Option(min=0, help="New seconds on the device after the last request.")
    ] = None,
    keepalive_warm_s: Annotated[
        float | None, typer.Option(min=0, help="New seconds in host memory after that.")
    ] = None,
    on_unmeetable: Annotated[
        OnUnmeetable | None,
        typer.Option(help="A request predicted to miss its SLO even alone: refuse it at once, or serve it late."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Change a deployed model's SLO, keep-alives or on-unmeetable mode in place (no redeploy, no reload)."""
    if slo_ms is None and keepalive_hot_s is None and keepalive_warm_s is None and on_unmeetable is None:
        raise typer.BadParameter(
            "give at least one of --slo-ms, --keepalive-hot-s, --keepalive-warm-s, --on-unmeetable"
        )
    with errors(url), Client(url, home=home) as client:
        model = client.update(
            name,
            slo_ms=slo_ms,
            keepalive_hot_s=keepalive_hot_s,
            keepalive_warm_s=keepalive_warm_s,
            on_unmeetable=None if on_unmeetable is None else on_unmeetable.value.replace("-", "_"),
        )
    console.print(f"updated {model['name']}: SLO {model['slo_ms']:g} ms", highlight=False)


@app.command("rm")
def remove(name: str, url: UrlOption = DEFAULT_URL, home: HomeOption = DEFAULT_HOME) -> None:
    """Remove a model and its stored weights."""
    with errors(url), Client(url, home=home) as client:
        client.remove(name)
    console.print(f"removed {name}", highlight=False)


@app.command()
def load(name: str, url: UrlOption = DEFAULT_URL, home: HomeOption = DEFAULT_HOME) -> None:
    """Make a model hot now (on the device, ready for the next batch)."""
    with errors(url), Client(url, home=home) as client:
        model = client.load(name)
    console.print(f"{name} is {model['tier']} ({model['instances']} instances)", highlight=False)


@app.command()
def unload(
    name: str,
    to: Annotated[
        UnloadTier,
        typer.Option(help="The tier to demote to: warm keeps the weights in host memory, cool on disk only."),
    ] = UnloadTier.COOL,
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Demote a model off the device (to cool by default); it stays deployed and callable."""
    with errors(url), Client(url, home=home) as client:
        model = client.unload(name, tier=to.value)
    console.print(f"{name} is {model['tier']}", highlight=False)


@app.command()
def invoke(
    name: str,
    prompt: Annotated[
        str | None, typer.Argument(help="A prompt for a generative model (its answer streams); other models: a text.")
    ] = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="A text to send (repeatable).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Inputs as JSON, like '{\"x\": [[1, 2, 3, 4]]}'.")] = None,
    timeout_s: Annotated[float | None, typer.Option(min=0, help="The request's own deadline.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="Generative models: most tokens to generate (default: the model's).")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(min=0, max=2, help="Generative models: sampling temperature; 0 is greedy.")
    ] = None,
    chat: Annotated[
        bool,
        typer.Option("--chat/--no-chat", help="Generative models: send the prompt as a chat message, or as raw text."),
    ] = True,
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Call a model: a generative one with a prompt (the answer streams to the terminal), others with
    texts (embedding and text models) or with JSON inputs."""
    texts = [prompt, *(text or [])] if prompt is not None else text
    if (texts is None) == (data is None):
        raise typer.BadParameter("give a prompt, --text (one or more) or --data", param_hint="PROMPT / --text / --data")
    parsed: Any = None
    if data is not None:
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--data") from None
    with errors(url), Client(url, home=home) as client:
        if client.model(name).get("task") == "generate":
            if texts is None:
                fail(f"model '{name}' is generative: give it a prompt, not --data")
            _stream_answer(client, name, "\n".join(texts), chat, max_tokens, temperature)
            return
        if max_tokens is not None or temperature is not None or not chat:
            fail(f"model '{name}' is not generative: --max-tokens, --temperature and --no-chat are for generative ones")
        inputs: list[dict[str, Any]] = client.metadata(name)["inputs"]
        if texts is not None:
            outputs = _invoke_texts(client, name, texts, inputs, timeout_s)
            if outputs is None:
                return
        else:
            try:
                arrays = arrays_from_json(parsed, inputs)
            except ValueError as exc:  # the inputs do not fit what the server says the model takes
                fail(f"--data for model '{name}': {exc}")
            outputs = client.infer(name, arrays, timeout_s)
    typer.echo(json.dumps(outputs_to_json(outputs)))


def _stream_answer(
    client: Client, name: str, prompt: str, chat: bool, max_tokens: int | None, temperature: float | None
) -> None:
    """Print a generative model's answer as it comes; an error mid-answer ends the line first."""
    began = False
    try:
        for piece in client.generate(name, prompt, chat=chat, max_tokens=max_tokens, temperature=temperature):
            began = True
            sys.stdout.write(piece)
            sys.stdout.flush()
    except InvalidInput as exc:
        if chat and "chat template" in exc.message:
            fail(f"{exc.message.split(';')[0]}: call it with --no-chat")
        raise
    finally:
        if began:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _invoke_texts(
    client: Client, name: str, texts: list[str], inputs: Sequence[Mapping[str, Any]], timeout_s: float | None
) -> dict[str, Array] | None:
    """Embed the texts (an embedding model), or send them as the model's one BYTES input."""
    if len(inputs) != 1 or inputs[0]["datatype"] != "BYTES":
        shown = ", ".join(f"{i['name']} ({i['datatype']})" for i in inputs)
        fail(f"model '{name}' takes {shown}, not texts; give them with --data")
    with contextlib.suppress(InvalidInput):
        vectors = client.embed(name, texts)
        console.print(f"{vectors.shape[0]} vectors of dimension {vectors.shape[1]}", highlight=False)
        for i, row in enumerate(vectors):
            first = " ".join(f"{v:+.4f}" for v in row[:8])
            console.print(f"[{i}] {first}{' …' if row.size > 8 else ''}", highlight=False, markup=False)
        return None
    array = np.empty(len(texts), dtype=object)
    array[:] = [t.encode() for t in texts]
    return client.infer(name, {str(inputs[0]["name"]): array}, timeout_s)


def arrays_from_json(data: Any, inputs: Sequence[Mapping[str, Any]]) -> dict[str, Array]:
    """``{"x": [[1, 2, 3, 4]]}`` -> arrays of the model's declared datatypes (a missing batch axis is added)."""
    specs = {str(s["name"]): s for s in inputs}
    expected = ", ".join(f"{n} ({s['datatype']} {list(s['shape'])})" for n, s in specs.items())
    if not isinstance(data, dict) or not data:
        raise ValueError(f'give a JSON object of inputs, like {{"x": [[1, 2, 3, 4]]}}; the model takes {expected}')
    unknown = sorted(set(data) - set(specs))
    missing = sorted(set(specs) - set(data))
    if unknown or missing:
        wrong = ", ".join([*(f"unknown {n}" for n in unknown), *(f"missing {n}" for n in missing)])
        raise ValueError(f"{wrong}; the model takes {expected}")
    arrays: dict[str, Array] = {}
    for name, value in data.items():
        spec = specs[name]
        array = _array(value, str(spec["datatype"]), name)
        if array.ndim == len(spec["shape"]) - 1:
            array = array[np.newaxis]
        arrays[name] = array
    return arrays


def _array(value: Any, datatype: str, name: str) -> Array:
    if datatype == "BYTES":
        raw = np.array(value, dtype=object)
        if not all(isinstance(item, str) for item in raw.flat):
            raise ValueError(f"input {name} is BYTES: give strings in evenly nested lists")
        out = np.empty(raw.shape, dtype=object)
        out.flat[:] = [item.encode() for item in raw.flat]
        return out
    try:
        raw = np.array(value)
    except ValueError as exc:
        raise ValueError(f"input {name}: {exc}") from None
    dtype = DATATYPES[datatype]
    allowed = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}[dtype.kind]
    if raw.size and raw.dtype.kind not in allowed:
        kind = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}[dtype.kind]
        raise ValueError(f"input {name} is {datatype}: give {kind} in evenly nested lists")
    if raw.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ValueError(f"input {name} is {datatype}: values must be within [{info.min}, {info.max}]")
    return raw.astype(dtype)


def outputs_to_json(outputs: Mapping[str, Array]) -> dict[str, Any]:
    """Outputs as nested lists; BYTES as strings (UTF-8, undecodable bytes replaced)."""

    def plain(item: Any) -> Any:
        return item.decode("utf-8", "replace") if isinstance(item, bytes) else item

    result: dict[str, Any] = {}
    for name, array in outputs.items():
        if array.dtype == object:
            flat = [plain(item) for item in array.ravel().tolist()]
            result[name] = np.array(flat, dtype=object).reshape(array.shape).tolist()
        else:
            result[name] = array.tolist()
    return result


# -- logs ------------------------------------------------------------------------------------------


@app.command()
def logs(
    home: HomeOption = DEFAULT_HOME,
    worker: Annotated[int | None, typer.Option(min=0, help="Only this worker's log.")] = None,
    lines: Annotated[int, typer.Option(min=1, help="Lines from the end of each log.")] = 50,
) -> None:
    """Print the end of the worker logs (what the models printed, and their tracebacks)."""
    folder = home.expanduser() / "logs"
    if worker is not None:
        paths = [folder / f"worker-{worker}.log"]
        if not paths[0].is_file():
            fail(f"there is no {paths[0]}; `ember status` lists the workers, `ember logs` shows them all")
    else:
        paths = sorted(folder.glob("worker-*.log"), key=_worker_number)
        if not paths:
            fail(f"no worker logs under {folder}; has `ember serve` run with this --home?")
    for i, path in enumerate(paths):
        if len(paths) > 1:
            typer.echo(f"{chr(10) if i else ''}==> {path} <==")
        for line in tail_lines(path, lines):
            typer.echo(line)


def _worker_number(path: Path) -> tuple[int, str]:
    digits = path.stem.removeprefix("worker-")
    return (int(digits), "") if digits.isdigit() else (1 << 30, path.name)


def tail_lines(path: Path, count: int, block_bytes: int = 64 * 1024) -> list[str]:
    """The last ``count`` lines of a file, read from its end."""
    if count <= 0:
        return []
    with path.open("rb") as file:
        position = file.seek(0, os.SEEK_END)
        data = b""
        while position > 0 and data.count(b"\n") <= count:
            step = min(block_bytes, position)
            position -= step
            file.seek(position)
            data = file.read(step) + data
    return [line.decode("utf-8", "replace") for line in data.splitlines()[-count:]]
