"""``ember``: the command line. Thin: parse, validate, call the library.

    ember serve [--deploy SOURCE ...]     run the server (and deploy the quick start's models)
    ember deploy SOURCE [options]         import a model into the store and bring it up
    ember ls | status | logs              what is deployed, how the server is, what the workers said
    ember invoke NAME --text/--data       call a model
    ember load | unload | rm NAME         make hot now, demote to cool, remove
    ember store ls|import|verify|export|bench   the weight store, in --home (see ember.cli_store)
    ember sim SCENARIO [--json PATH]       replay a workload against the policies in virtual time (ember.cli_sim)
    ember keys create|ls|revoke, ember tenants set|ls   API keys and quotas (see ember.cli_keys)

Every command but ``serve`` and ``logs`` talks to a running server through :class:`ember.Client`
(``--url``, or ``EMBER_URL``) with an API key (``EMBER_API_KEY``, or the admin key file in
``EMBER_HOME``, default ``~/.ember``). An error prints ``error: <what to do>`` and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import os
import re
import signal
import socket
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import httpx
import numpy as np
import numpy.typing as npt
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ember import __version__
from ember.auth.keys import ADMIN_KEY_FILE
from ember.cli_keys import keys_app, tenants_app
from ember.cli_sim import sim
from ember.cli_store import store_app
from ember.client import DEFAULT_URL, Client
from ember.config import DEFAULT_KEEPALIVE_HOT_S, DEFAULT_KEEPALIVE_WARM_S, DEFAULT_SLO_MS
from ember.errors import EmberError, InvalidInput
from ember.gateway.tensors import DATATYPES

if TYPE_CHECKING:
    import uvicorn

    from ember.config import DeploySpec
    from ember.service import EmberService, ServeOptions

__all__ = ["app", "main"]

Array = npt.NDArray[Any]

app = typer.Typer(
    name="ember",
    help="Serverless inference for deep-learning models: scale to zero, back in milliseconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(store_app)
app.command("sim")(sim)
app.add_typer(keys_app)
app.add_typer(tenants_app)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

_TIER_STYLES = {"hot": "red", "warm": "yellow", "cool": "blue"}
_DASH = "\N{EN DASH}"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

UrlOption = Annotated[
    str, typer.Option("--url", envvar="EMBER_URL", help="The Ember server to talk to.", show_envvar=True)
]
HomeOption = Annotated[
    Path,
    typer.Option("--home", envvar="EMBER_HOME", help="Ember's home: registry, store, logs.", show_envvar=True),
]
_DEFAULT_HOME = Path("~/.ember")


class Kind(StrEnum):
    CLASS = "class"
    HF = "hf"
    EXPORTED = "exported"
    TORCHSCRIPT = "torchscript"


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


# -- serve -----------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
    home: HomeOption = _DEFAULT_HOME,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (one per device on GPU hosts).")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="Torch threads per worker (0: torch's default).")] = 0,
    tick_s: Annotated[float, typer.Option(min=0.01, help="Seconds between control-loop ticks.")] = 1.0,
    spare_workers: Annotated[
        int, typer.Option(min=0, help="Workers started ahead to replace a dead one at once (0: none).")
    ] = 1,
    batch_timeout_s: Annotated[
        float, typer.Option(min=0.001, help="A batch running longer fails and its worker is replaced.")
    ] = 120.0,
    worker_memory_mb: Annotated[
        int,
        typer.Option(
            min=-1,
            help="Replace a worker after a batch once its peak memory passes this (-1: 3/4 of RAM / workers; 0: off).",
        ),
    ] = -1,
    deploy: Annotated[
        list[str] | None,
        typer.Option("--deploy", help="Deploy SOURCE at startup unless a model of its name exists (repeatable)."),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Serve requests without an API key as admin; loopback addresses only."),
    ] = False,
) -> None:
    """Run the Ember server until Ctrl-C or SIGTERM.

    Requests need an API key; the first start writes an admin key to HOME/admin.key (mode 0600).
    """
    from ember.service import ServeOptions

    if not _DEVICE.fullmatch(device):
        raise typer.BadParameter(f"{device!r}: use auto, cpu, cuda or cuda:N", param_hint="--device")
    if insecure and not is_loopback(host):
        _fail(
            f"--insecure serves without API keys, so it listens only on a loopback address (127.0.0.1, ::1, "
            f"localhost), not on {host}; drop --insecure and send keys, or use --host 127.0.0.1"
        )
    specs = [_startup_spec(source) for source in deploy or ()]
    options = ServeOptions(
        home=home.expanduser(),
        workers=workers,
        device=device,
        threads=threads,
        tick_s=tick_s,
        spare_workers=spare_workers,
        batch_timeout_s=batch_timeout_s,
        worker_memory_bytes=None if worker_memory_mb < 0 else worker_memory_mb << 20,
        insecure=insecure,
    )
    try:
        sock = _bind(host, port)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or stop what uses it")
    with sock, _errors(None):
        _run(_serve(options, sock, specs))


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (``localhost`` by name, too)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def _startup_spec(source: str) -> DeploySpec:
    from pydantic import ValidationError

    from ember.config import DeploySpec

    try:
        return DeploySpec.model_validate({"source": absolute_source(source)})
    except (ValidationError, ValueError) as exc:
        raise typer.BadParameter(f"{source}: {_validation_message(exc)}", param_hint="--deploy") from None


def _validation_message(exc: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
    return str(exc)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the service starts so a busy port fails fast."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _server(service: EmberService) -> uvicorn.Server:
    import uvicorn

    from ember.gateway.app import build_app

    class Server(uvicorn.Server):
        # `ember serve` takes SIGINT/SIGTERM itself, so it can stop its startup deploys before the service.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    # The service's lifetime is _serve's, not the app's: no lifespan (it would only log a forced stop).
    app = build_app(service, manage_lifetime=False)
    return Server(uvicorn.Config(app, log_level="warning", lifespan="off"))


async def _serve(options: ServeOptions, sock: socket.socket, specs: Sequence[DeploySpec]) -> None:
    """Start the service, serve HTTP until SIGINT/SIGTERM, then stop the deploys, the server, the service."""
    from ember.service import EmberService

    service = EmberService(options)
    server = _server(service)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    handled = (signal.SIGINT, signal.SIGTERM)

    def on_signal(sig: signal.Signals) -> None:
        if stopping.is_set() and not server.started:
            # A second signal while the workers start: stop now, without waiting for them.
            for each in handled:
                loop.remove_signal_handler(each)
            signal.raise_signal(sig)
            return
        if not server.started:
            err_console.print("stopping once the workers are up; press Ctrl-C again to stop now", style="yellow")
        # A second signal while serving skips the wait for open connections.
        server.force_exit = stopping.is_set()
        server.should_exit = True
        stopping.set()

    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    serving: asyncio.Task[None] | None = None
    deploying: asyncio.Task[None] | None = None
    try:
        # Not cancelled by a first signal: a pool stopped half-way through its start leaks workers.
        await service.start()
        if stopping.is_set():
            return
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="ember-http")
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            # What start-up built lives as long as the server: keep it out of every full collection.
            gc.freeze()
            url = _url(sock)
            console.print(f"Ember serving on {url} ({options.workers} workers)", highlight=False)
            key_file = None if options.insecure else options.home / ADMIN_KEY_FILE
            if key_file is None:
                console.print("--insecure: requests without an API key act as admin", style="yellow", highlight=False)
            else:
                console.print(f"admin API key: {key_file} (`ember keys create` makes more)", highlight=False)
            if specs:
                deploying = asyncio.create_task(_deploy_at_startup(service, specs, url, key_file), name="ember-deploy")
        await serving
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if deploying is not None:
            deploying.cancel()
            await asyncio.gather(deploying, return_exceptions=True)
        if serving is not None and not serving.done():
            server.should_exit = True
            await asyncio.gather(serving, return_exceptions=True)
        await service.stop()


async def _deploy_at_startup(
    service: EmberService, specs: Sequence[DeploySpec], url: str, key_file: Path | None
) -> None:
    from ember.errors import ModelNotFound

    for spec in specs:
        name = str(spec.name)
        try:
            info = service.info(name)
            console.print(f"{name} is already deployed (v{info.version}, {info.tier})", highlight=False)
        except ModelNotFound:
            console.print(f"deploying {spec.source} as {name} …", highlight=False)
            try:
                info = await service.deploy(spec)
            except EmberError as exc:
                _print_error(f"deploying {spec.source} failed: {exc.message}")
                continue
            except Exception as exc:
                _print_error(f"deploying {spec.source} failed: {type(exc).__name__}: {exc}; the server log has more")
                continue
            console.print(
                f"deployed {name} v{info.version}: {info.tier}, {_mb(info.bytes)} MB, "
                f"cold start {_cold(info.last_cold_start)}",
                highlight=False,
            )
        deployment = service.deployment(name)
        inputs = [t.to_json() for t in deployment.metadata.inputs]
        console.print("call it:", highlight=False)
        console.print(Text("  " + curl_example(url, name, deployment.metadata.task, inputs, key_file)))
        console.print(Text("  ember ls"))


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def curl_example(
    url: str, name: str, task: str | None, inputs: Sequence[Mapping[str, Any]], key_file: Path | None = None
) -> str:
    """A ready-to-paste ``curl`` for the model: ``/v1/embeddings`` for embedding models, else v2 infer.

    With ``key_file`` it sends the key in that file as ``Authorization: Bearer``.
    """
    if task == "embeddings":
        body: dict[str, Any] = {"model": name, "input": ["Ember keeps models warm."]}
        path = "/v1/embeddings"
    else:
        body = {"inputs": [_example_tensor(spec) for spec in inputs]}
        path = f"/v2/models/{name}/infer"
    auth = "" if key_file is None else f' -H "Authorization: Bearer $(cat {key_file})"'
    return f"curl -s {url}{path}{auth} -H 'Content-Type: application/json' -d '{json.dumps(body)}'"


def _example_tensor(spec: Mapping[str, Any]) -> dict[str, Any]:
    shape = [1 if d == -1 else int(d) for d in spec["shape"]]
    count = int(np.prod(shape))
    datatype = str(spec["datatype"])
    value: Any = {"BYTES": "hello", "BOOL": False}.get(datatype, 0)
    data: Any = [value] * count if count <= 16 else "..."
    return {"name": spec["name"], "datatype": datatype, "shape": shape, "data": data}


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
    option: Annotated[
        list[str] | None, typer.Option("--option", help="KEY=JSON passed to the model class (repeatable).")
    ] = None,
    no_load: Annotated[bool, typer.Option("--no-load", help="Import into the store but do not load it.")] = False,
    compress: Annotated[
        bool, typer.Option("--compress", help="Keep the weights compressed on disk (pays when disk reads are slow).")
    ] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Deploy a model: import its weights into the store once, then bring it up."""
    options = parse_options(option or [])
    resolved = absolute_source(source)
    with _errors(url), Client(url) as client, console.status(f"importing {source} …") as status:

        def progress(event: dict[str, Any]) -> None:
            stage = event.get("stage")
            if stage == "importing":
                status.update(f"importing {source} …")
            elif stage == "stored":
                console.print(f"[green]✓[/] stored {_mb(int(event.get('bytes', 0)))} MB", highlight=False)
                status.update("stored")
            elif stage == "loading":
                status.update(f"loading {event.get('model', '')} …")
            elif stage == "ready":
                ms = 1000 * float(event.get("load_s", 0.0))
                console.print(f"[green]✓[/] ready in {ms:.0f} ms", highlight=False)

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
        )
    console.print(
        f"deployed {model['name']} v{model['version']}: {model['tier']}, {_mb(int(model['bytes']))} MB, "
        f"SLO {model['slo_ms']:g} ms",
        highlight=False,
    )


def absolute_source(source: str, cwd: Path | None = None) -> str:
    """``source`` with a local file or folder made absolute (the server's working directory differs).

    ``file.py:Class`` becomes ``/abs/file.py:Class``; a folder or a .pt2/.pt file becomes absolute;
    ``module:Class`` and paths that do not exist here are sent unchanged.
    """
    base = cwd or Path.cwd()

    def local(path: str) -> Path | None:
        candidate = Path(path).expanduser()
        candidate = candidate if candidate.is_absolute() else base / candidate
        return candidate.resolve() if candidate.exists() else None

    whole = local(source)
    if whole is not None:
        return str(whole)
    ref, sep, attr = source.rpartition(":")
    if sep and ref.endswith(".py") and attr:
        file = local(ref)
        if file is not None:
            return f"{file}:{attr}"
    return source


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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the deployed models: tier, traffic, SLO attainment, last cold start."""
    with _errors(url), Client(url) as client:
        models = client.models()
    if as_json:
        typer.echo(json.dumps(models, indent=2))
    elif not models:
        console.print("no models deployed; deploy one with `ember deploy SOURCE`", highlight=False)
    else:
        _print_table(models_table(models))


def models_table(models: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for header in ("name", "version", "tier", "instances", "requests", "failed", "queued"):
        table.add_column(header, justify="right" if header not in ("name", "tier") else "left")
    for header in ("SLO ms", "SLO met", "last cold start", "size MB"):
        table.add_column(header, justify="left" if header == "last cold start" else "right")
    for m in models:
        attained = m.get("slo_attainment")
        table.add_row(
            str(m["name"]),
            str(m["version"]),
            Text(str(m["tier"]), style=_TIER_STYLES.get(str(m["tier"]), "")),
            str(m["instances"]),
            str(m["requests"]),
            str(m["failed"]),
            str(m["queued"]),
            f"{float(m['slo_ms']):g}",
            _DASH if attained is None else f"{100 * float(attained):.1f}%",
            _cold(m.get("last_cold_start")),
            _mb(int(m.get("bytes", 0))),
        )
    return table


@app.command()
def status(
    url: UrlOption = DEFAULT_URL,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the server: workers and store tiers."""
    with _errors(url), Client(url) as client:
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
        _print_table(table)
    for tier in ("warm", "cool"):
        t = store.get(tier, {})
        console.print(
            Text.assemble(
                (f"{tier:>5}", _TIER_STYLES[tier]),
                f" store: {t.get('models', 0)} models, {_mb(int(t.get('bytes', 0)))} MB",
            )
        )


# -- acting on one model ---------------------------------------------------------------------------


@app.command("rm")
def remove(name: str, url: UrlOption = DEFAULT_URL) -> None:
    """Remove a model and its stored weights."""
    with _errors(url), Client(url) as client:
        client.remove(name)
    console.print(f"removed {name}", highlight=False)


@app.command()
def load(name: str, url: UrlOption = DEFAULT_URL) -> None:
    """Make a model hot now (on the device, ready for the next batch)."""
    with _errors(url), Client(url) as client:
        model = client.load(name)
    console.print(f"{name} is {model['tier']} ({model['instances']} instances)", highlight=False)


@app.command()
def unload(name: str, url: UrlOption = DEFAULT_URL) -> None:
    """Demote a model to the cool tier; it stays deployed and callable."""
    with _errors(url), Client(url) as client:
        model = client.unload(name)
    console.print(f"{name} is {model['tier']}", highlight=False)


@app.command()
def invoke(
    name: str,
    text: Annotated[list[str] | None, typer.Option("--text", help="A text to send (repeatable).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Inputs as JSON, like '{\"x\": [[1, 2, 3, 4]]}'.")] = None,
    timeout_s: Annotated[float | None, typer.Option(min=0, help="The request's own deadline.")] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Call a model with texts (embedding and text models) or with JSON inputs."""
    if (text is None) == (data is None):
        raise typer.BadParameter("give either --text (one or more) or --data", param_hint="--text / --data")
    parsed: Any = None
    if data is not None:
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--data") from None
    with _errors(url), Client(url) as client:
        inputs: list[dict[str, Any]] = client.metadata(name)["inputs"]
        if text is not None:
            outputs = _invoke_texts(client, name, text, inputs, timeout_s)
            if outputs is None:
                return
        else:
            try:
                arrays = arrays_from_json(parsed, inputs)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--data") from None
            outputs = client.infer(name, arrays, timeout_s)
    typer.echo(json.dumps(outputs_to_json(outputs)))


def _invoke_texts(
    client: Client, name: str, texts: list[str], inputs: Sequence[Mapping[str, Any]], timeout_s: float | None
) -> dict[str, Array] | None:
    """Embed the texts (an embedding model), or send them as the model's one BYTES input."""
    if len(inputs) != 1 or inputs[0]["datatype"] != "BYTES":
        shown = ", ".join(f"{i['name']} ({i['datatype']})" for i in inputs)
        raise typer.BadParameter(f"model {name!r} takes {shown}, not texts; use --data", param_hint="--text")
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
    home: HomeOption = _DEFAULT_HOME,
    worker: Annotated[int | None, typer.Option(min=0, help="Only this worker's log.")] = None,
    lines: Annotated[int, typer.Option(min=1, help="Lines from the end of each log.")] = 50,
) -> None:
    """Print the end of the worker logs (what the models printed, and their tracebacks)."""
    folder = home.expanduser() / "logs"
    if worker is not None:
        paths = [folder / f"worker-{worker}.log"]
        if not paths[0].is_file():
            _fail(f"there is no {paths[0]}; `ember status` lists the workers, `ember logs` shows them all")
    else:
        paths = sorted(folder.glob("worker-*.log"), key=_worker_number)
        if not paths:
            _fail(f"no worker logs under {folder}; has `ember serve` run with this --home?")
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


# -- shared ----------------------------------------------------------------------------------------


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f}"


def _cold(last: Mapping[str, Any] | None) -> str:
    if not last:
        return _DASH
    return f"{last.get('tier', '?')} {1000 * float(last.get('seconds', 0.0)):.0f} ms"


def _print_table(table: Table) -> None:
    # Piped, a table keeps its natural width instead of folding to 80 columns.
    (console if console.is_terminal else Console(width=200)).print(table)


def _print_error(message: str) -> None:
    err_console.print(Text(f"error: {message}", style="red"))


def _fail(message: str) -> NoReturn:
    _print_error(message)
    raise typer.Exit(1)


@contextlib.contextmanager
def _errors(url: str | None) -> Iterator[None]:
    """Ember's errors and transport failures as one red line and exit status 1."""
    try:
        yield
    except EmberError as exc:
        _fail(exc.message)
    except httpx.ConnectError:
        _fail(f"cannot reach Ember at {url}; start it with `ember serve`, or pass --url (EMBER_URL)")
    except httpx.TimeoutException:
        _fail(f"Ember at {url} did not answer in time; `ember status` shows whether it is busy")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        _fail(f"talking to Ember at {url} failed: {exc}")


if __name__ == "__main__":
    main()
