"""``ember serve``: bind the port, start the service and the HTTP server, deploy the startup models,
and stop it all in order on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import re
import signal
import socket
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.text import Text

from ember.auth.keys import ADMIN_KEY_FILE, METRICS_KEY_FILE
from ember.cli.common import (
    DEFAULT_HOME,
    HomeOption,
    absolute_source,
    cold_start,
    console,
    err_console,
    errors,
    fail,
    print_error,
    size_text,
)
from ember.errors import EmberError

if TYPE_CHECKING:
    import uvicorn

    from ember.config import DeploySpec
    from ember.service import EmberService, ServeOptions

__all__ = ["curl_example", "is_loopback", "serve"]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
    home: HomeOption = DEFAULT_HOME,
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
    warm_budget_mb: Annotated[
        int,
        typer.Option(
            min=0,
            help="Host memory for warm models, in MB: one shared-memory arena allocated at start (0: no arena, "
            "a file per warm model, unlimited).",
        ),
    ] = 0,
    deploy: Annotated[
        list[str] | None,
        typer.Option(
            "--deploy",
            help="Deploy SOURCE (or NAME=SOURCE) at startup unless a model of its name exists (repeatable).",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Serve requests without an API key as admin; loopback addresses only."),
    ] = False,
    request_log: Annotated[
        bool,
        typer.Option(
            "--request-log/--no-request-log", help="Write one JSON line per request to HOME/logs/requests.jsonl."
        ),
    ] = True,
    otel: Annotated[
        bool,
        typer.Option(
            "--otel",
            help="Export OpenTelemetry spans over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT); needs ember-serve[otel].",
        ),
    ] = False,
    cluster: Annotated[
        str,
        typer.Option(
            help="Where workers run: local (--workers processes here), or a Ray cluster: ray (RAY_ADDRESS, or "
            "the cluster this host is a node of), ray://HOST:PORT or HOST:PORT; needs ember-serve[ray].",
        ),
    ] = "local",
    cpus_per_worker: Annotated[
        float, typer.Option(min=0.01, help="With a Ray cluster: CPUs per worker on nodes without a GPU.")
    ] = 1.0,
) -> None:
    """Run the Ember server until Ctrl-C or SIGTERM.

    Requests need an API key; the first start writes an admin key to HOME/admin.key (mode 0600).
    """
    from ember.service import ServeOptions

    if not _DEVICE.fullmatch(device):
        raise typer.BadParameter(f"{device!r}: use auto, cpu, cuda or cuda:N", param_hint="--device")
    if insecure and not is_loopback(host):
        fail(
            f"--insecure serves without API keys, so it listens only on a loopback address (127.0.0.1, ::1, "
            f"localhost), not on {host}; drop --insecure and send keys, or use --host 127.0.0.1"
        )
    from ember.cluster.factory import check_cluster

    try:
        check_cluster(cluster)
    except EmberError as exc:
        fail(exc.message)
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
        warm_budget_bytes=warm_budget_mb * 1_000_000 or None,
        insecure=insecure,
        request_log=request_log,
        otel=otel,
        cluster=cluster,
        cpus_per_worker=cpus_per_worker,
    )
    try:
        sock = _bind(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or stop what uses it")
    with sock, errors(None):
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

    name, _, path = source.partition("=") if "=" in source else ("", "", source)
    fields: dict[str, str] = {"source": absolute_source(path)}
    if name:
        fields["name"] = name
    try:
        return DeploySpec.model_validate(fields)
    except (ValidationError, ValueError) as exc:
        raise typer.BadParameter(f"{source}: {_validation_message(exc)}", param_hint="--deploy") from None


def _validation_message(exc: Exception) -> str:
    from pydantic import ValidationError

    from ember.config import validation_message

    return validation_message(exc) if isinstance(exc, ValidationError) else str(exc)


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
    from ember.gateway.connections import HEAD_TIMEOUT_S, Connections, protocol_factory

    class Server(uvicorn.Server):
        # `ember serve` takes SIGINT/SIGTERM itself, so it can stop its startup deploys before the service.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    # The service's lifetime is _serve's, not the app's: no lifespan (it would only log a forced stop).
    app = build_app(service, manage_lifetime=False)
    # Idle and half-sent connections are closed, and key-less ones capped (ember.gateway.connections).
    http = protocol_factory(Connections())
    return Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", http=http, timeout_keep_alive=int(HEAD_TIMEOUT_S))
    )


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
            console.print(f"Ember serving on {url} ({_pool_text(service)})", highlight=False)
            console.print(f"first loads predicted with {service.bandwidths.describe()}", highlight=False)
            if (arena := service.store.statistics().arena) is not None:
                console.print(
                    f"warm arena: {size_text(arena.bytes)} of shared memory, allocated and touched in "
                    f"{service.store_open_s * 1000:.0f} ms (huge pages: {'yes' if arena.huge_pages else 'no'})",
                    highlight=False,
                )
            if service.bandwidths.warning is not None:
                err_console.print(f"warning: {service.bandwidths.warning}", style="yellow", highlight=False)
            key_file = None if options.insecure else options.home / ADMIN_KEY_FILE
            if key_file is None:
                console.print("--insecure: requests without an API key act as admin", style="yellow", highlight=False)
            else:
                console.print(f"admin API key: {key_file} (`ember keys create` makes more)", highlight=False)
            metrics_key = options.home / METRICS_KEY_FILE
            console.print(f"metrics key: {metrics_key} (opens GET /metrics alone, for Prometheus)", highlight=False)
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
                print_error(f"deploying {spec.source} failed: {exc.message}")
                continue
            except Exception as exc:
                print_error(f"deploying {spec.source} failed: {type(exc).__name__}: {exc}; the server log has more")
                continue
            console.print(
                f"deployed {name} v{info.version}: {info.tier}, {size_text(info.bytes)}, "
                f"cold start {cold_start(info.last_cold_start)}",
                highlight=False,
            )
        deployment = service.deployment(name)
        inputs = [t.to_json() for t in deployment.metadata.inputs]
        console.print("call it:", highlight=False)
        console.print(Text("  " + curl_example(url, name, deployment.metadata.task, inputs, key_file)))
        console.print(Text("  ember ls"))


def _pool_text(service: EmberService) -> str:
    """``2 workers``, or for a cluster ``6 workers on 3 Ray nodes``."""
    stats = service.backend.statistics()
    ready = int(stats.get("ready", 0))
    nodes = [n for n in stats.get("nodes", ()) if n.get("alive")]
    if stats.get("backend") == "ray":
        return f"{ready} workers on {len(nodes)} Ray nodes at {stats.get('address')}"
    return f"{ready} workers"


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def curl_example(
    url: str, name: str, task: str | None, inputs: Sequence[Mapping[str, Any]], key_file: Path | None = None
) -> str:
    """A ready-to-paste ``curl`` for the model: ``/v1/embeddings`` for embedding models,
    ``/v1/chat/completions`` for generative ones, else v2 infer.

    With ``key_file`` it sends the key in that file as ``Authorization: Bearer``.
    """
    if task == "embeddings":
        body: dict[str, Any] = {"model": name, "input": ["Ember keeps models warm."]}
        path = "/v1/embeddings"
    elif task == "generate":
        body = {"model": name, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        path = "/v1/chat/completions"
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
