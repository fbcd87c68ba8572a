"""Workers as Ray actors on every node of a Ray cluster (``ember serve --cluster ray``).

Each node gets one :class:`~ember.cluster.ray_actor.WorkerActor` per GPU, or on nodes without one
(or with ``device="cpu"``) one per ``cpus_per_worker`` CPUs, up to ``workers_per_node``. An actor is
pinned to its node, started ahead with torch imported, and runs the same serve loop as a local
worker process. Ray places the actors and reports their deaths; requests do not go through Ray: once
an actor is ready, the backend opens a TCP connection to it (the address and a secret token come in
the answer of ``ready``) and speaks the local worker's frames over it
(:class:`~ember.cluster.channel.WorkerChannel`), generative streams included.

The backend polls ``ray.nodes()``: a node that joins gets its workers; a node that leaves takes its
workers with it, and each is reported lost (the controller re-places its models; its in-flight
batches fail with :class:`~ember.errors.WorkerCrashed`, which the runners retry on another worker).
A worker whose connection ends is lost too, and its actor exits. An actor that dies on a live node
is replaced at the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.cluster.base import WorkerHandle
from ember.cluster.channel import WorkerChannel
from ember.cluster.local import START_TIMEOUT_S, WorkerLimits
from ember.cluster.stores import NodeStores
from ember.errors import ClusterUnreachable, WorkerCrashed
from ember.policies.tiers import Tier

__all__ = ["RayBackend", "RayWorker", "connect", "ray_address"]

_log = logging.getLogger(__name__)

#: Seconds between two looks at the cluster's nodes.
POLL_S = 1.0
#: How long ``connect`` waits for a TCP connection to the address before calling it unreachable (and a
#: worker's connection to its actor before calling the start failed).
CONNECT_TIMEOUT_S = 5.0
#: A node whose worker failed to start is tried again after this many seconds.
RETRY_S = 5.0
#: How long ``stop`` waits for Ray to report the killed actors dead.
STOP_WAIT_S = 10.0
_WATCH = "ember-ray-watch"


def ray_address(cluster: str) -> str:
    """The address to pass to ``ray.init`` for ``--cluster``: ``ray`` means RAY_ADDRESS, else the
    cluster this host is a node of (``auto``); a ``ray://HOST:PORT`` or ``HOST:PORT`` is kept."""
    if cluster == "ray":
        return os.environ.get("RAY_ADDRESS") or "auto"
    return cluster


def connect(address: str) -> bool:
    """Connect this process to the Ray cluster at ``address`` (blocking); True if this call did it,
    False if the process was connected already. ClusterUnreachable with what to do when it cannot."""
    import ray

    if ray.is_initialized():
        return False
    endpoint = address.removeprefix("ray://")
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise ClusterUnreachable(
            f"--cluster {address} uses Ray Client, which needs grpcio: pip install 'ray[client]', or run "
            "`ember serve --cluster ray` on a node of the cluster"
        )
    if address != "auto":
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ClusterUnreachable(f"--cluster {address}: write ray, ray://HOST:PORT or HOST:PORT")
        try:
            socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise ClusterUnreachable(
                f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
                "`ray start --head`, or check the address (RAY_ADDRESS)"
            ) from None
    try:
        ray.init(address=address, namespace="ember", log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterUnreachable(
            f"cannot connect to the Ray cluster at {address}: {exc}; start one with `ray start --head` "
            "(then `ember serve --cluster ray` on that node), or pass its address"
        ) from None
    return True


@dataclass(frozen=True)
class NodeSlots:
    """The workers a node gets: how many, and what each actor reserves."""

    count: int
    num_cpus: float
    num_gpus: float


def node_slots(resources: dict[str, float], device: str, cpus_per_worker: float, workers_per_node: int) -> NodeSlots:
    """One worker per GPU (unless ``device`` is cpu), else one per ``cpus_per_worker`` CPUs; at most
    ``workers_per_node`` (0: no cap). A node without the device asked for gets none."""
    gpus = int(resources.get("GPU", 0))
    if gpus and device != "cpu":
        slots = NodeSlots(gpus, 0.0, 1.0)
    elif device.startswith("cuda"):
        slots = NodeSlots(0, 0.0, 0.0)
    else:
        slots = NodeSlots(int(resources.get("CPU", 0) // cpus_per_worker), cpus_per_worker, 0.0)
    if workers_per_node:
        slots = NodeSlots(min(slots.count, workers_per_node), slots.num_cpus, slots.num_gpus)
    return slots


class RayWorker(WorkerChannel):
    """One worker actor, spoken to over a TCP connection to it (see :class:`WorkerChannel`)."""

    def __init__(
        self,
        worker_id: str,
        node_id: str,
        actor: Any,
        info: dict[str, Any],
        limits: WorkerLimits,
        on_lost: Callable[[RayWorker], None],
        stores: NodeStores | None = None,
    ) -> None:
        super().__init__(worker_id, str(info["device"]), limits.batch_timeout_s)
        self._stores = stores
        self.node_id = node_id
        self.actor = actor
        self.pid = int(info["pid"])
        self.startup_s = float(info["startup_s"])
        self._address = (str(info["host"]), int(info["port"]))
        self._token = bytes(info["token"])
        self._on_lost = on_lost
        #: The keys of the models loaded there.
        self.loaded: set[str] = set()

    async def connect(self) -> None:
        """Open the connection to the actor and prove it is the gateway (the actor's token)."""
        host, port = self._address
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise WorkerCrashed(f"cannot connect to worker {self._id} at {host}:{port}: {exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(self._token)
        self._attach(reader, writer)

    def holds(self, key: str) -> Tier | None:
        """The tier of ``key`` in this worker's node store; None on the node of ``ember serve``, whose
        store is the service's own."""
        if self._stores is None or self._stores.is_home(self.node_id):
            return None
        return self._stores.tier(self.node_id, key)

    def refuses(self, key: str) -> str | None:
        """Why this worker's node takes no new model ``key``: its store lacks the weights and cannot be
        written (see :meth:`NodeStores.refusing`); None otherwise, and always on ``ember serve``'s node."""
        if self._stores is None or self._stores.is_home(self.node_id):
            return None
        if self._stores.tier(self.node_id, key) is not Tier.COLD:
            return None
        return self._stores.refusing(self.node_id)

    async def load(
        self, key: str, model_ref: str, options: dict[str, Any], weights_path: str, assets: dict[str, bytes]
    ) -> float:
        """Load ``key`` from this node's store: on another node than the service's, the node's store
        first makes it warm there (fetching it from another node if it lacks it)."""
        if self._stores is not None and not self._stores.is_home(self.node_id):
            weights_path = await self._stores.ensure(self.node_id, key)
        seconds = await super().load(key, model_ref, options, weights_path, assets)
        self.loaded.add(key)
        return seconds

    async def unload(self, key: str) -> None:
        self.loaded.discard(key)
        await super().unload(key)

    async def stopping(self) -> None:
        """The pool is stopping: its end is expected, and reported to no one."""
        await self._close(shutdown=False)

    def died(self, reason: str) -> None:
        """The actor is gone (its node left, or Ray reports it dead): fail what it owed, and tell the
        pool (once)."""
        self._lose(reason)

    def kill(self, reason: str) -> None:
        """Stop the actor; it is reported lost as for any death."""
        self._kill_actor()
        self._lose(reason)

    def _crash(self, reason: str) -> WorkerCrashed:
        return WorkerCrashed(f"worker {self._id} on node {self.node_id[:8]} was lost ({reason}); retry the request")

    def _lost(self, reason: str) -> None:
        _log.warning("worker %s (pid %d) on node %s was lost: %s", self._id, self.pid, self.node_id[:8], reason)
        self._kill_actor()  # a worker without its connection serves no one: free its slot
        self._on_lost(self)

    async def _stop_stuck(self) -> None:
        self.kill("a batch ran past the batch timeout")

    def _kill_actor(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)


class RayBackend:
    """Worker actors on every node of a Ray cluster; see the module's doc."""

    def __init__(
        self,
        address: str = "auto",
        device: str = "auto",
        threads: int = 0,
        preload: tuple[str, ...] = ("numpy", "safetensors", "transformers"),
        limits: WorkerLimits | None = None,
        *,
        cpus_per_worker: float = 1.0,
        workers_per_node: int = 0,
        poll_s: float = POLL_S,
        store_root: Path | None = None,
        node_root: Path | None = None,
    ) -> None:
        """``store_root``: the service's store, which the node of ``ember serve`` shares; ``node_root``:
        where every other node keeps its store (one folder per node under it, on that node's disk).
        Without them, every worker loads from the path the controller gives (one shared filesystem)."""
        if cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker={cpus_per_worker}: use a positive number of CPUs")
        self.address = address
        self._device = device
        self._threads = threads or max(1, int(cpus_per_worker))
        self._preload = preload
        self._limits = limits or WorkerLimits()
        self._cpus_per_worker = cpus_per_worker
        self._workers_per_node = workers_per_node
        self._poll_s = poll_s
        self._workers: dict[str, RayWorker] = {}
        #: Node id -> what ray.nodes() last said of it (address, resources, alive).
        self._nodes: dict[str, dict[str, Any]] = {}
        #: Node id -> workers being started there now; and when a node may be tried again after a failure.
        self._starting: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._callbacks: list[Callable[[RayWorker], None]] = []
        self._ready_callbacks: list[Callable[[RayWorker], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seq = itertools.count()
        self._started = False
        self._stopping = False
        self._owns_ray = False
        self.restarts = 0
        #: The node stores, once connected (with ``store_root`` and ``node_root``).
        self.stores: NodeStores | None = None
        self._store_root = store_root
        self._node_root = node_root

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._owns_ray = await loop.run_in_executor(None, connect, self.address)
        if self._store_root is not None and self._node_root is not None:
            import ray

            home = str(ray.get_runtime_context().get_node_id())
            self.stores = NodeStores(home, self._store_root, self._node_root)
        await self._poll()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if not self._workers:
            _log.warning("the Ray cluster at %s has no node for a %s worker", self.address, self._device)
        self._started = True
        self._background(self._poll_loop())

    async def stop(self) -> None:
        """Kill every actor and wait (a while) until Ray reports each dead, then disconnect."""
        import ray

        self._stopping = True
        watching = [task for task in self._tasks if task.get_name() == _WATCH]
        for task in list(self._tasks):
            if task not in watching:
                task.cancel()
        workers = list(self._workers.values())
        await asyncio.gather(*(worker.stopping() for worker in workers), return_exceptions=True)
        for worker in workers:
            with contextlib.suppress(Exception):
                ray.kill(worker.actor, no_restart=True)
        if self.stores is not None:
            await self.stores.close(STOP_WAIT_S)
        if watching:
            await asyncio.wait(watching, timeout=STOP_WAIT_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._workers.clear()
        if self._owns_ray:
            await asyncio.get_running_loop().run_in_executor(None, ray.shutdown)
            self._owns_ray = False

    def workers(self) -> tuple[RayWorker, ...]:
        return tuple(w for w in self._workers.values() if w.alive)

    def node_of(self, worker: WorkerHandle) -> str | None:
        """The id of the Ray node ``worker`` runs on (None: not one of this backend's)."""
        return worker.node_id if isinstance(worker, RayWorker) else None

    async def recycle(self, worker: WorkerHandle) -> None:
        if isinstance(worker, RayWorker):
            worker.kill("recycled")

    def on_worker_lost(self, callback: Callable[[RayWorker], None]) -> None:
        self._callbacks.append(callback)

    def on_worker_ready(self, callback: Callable[[RayWorker], None]) -> None:
        self._ready_callbacks.append(callback)

    def statistics(self) -> dict[str, Any]:
        nodes = []
        for node_id, node in sorted(self._nodes.items()):
            nodes.append(
                {
                    "id": node_id,
                    "address": node.get("NodeManagerAddress", ""),
                    "alive": bool(node.get("Alive")),
                    "resources": {k: v for k, v in node.get("Resources", {}).items() if k in ("CPU", "GPU")},
                    "workers": sorted(w.id for w in self._workers.values() if w.node_id == node_id),
                    "store": None if self.stores is None else self.stores.describe(node_id),
                }
            )
        return {
            "backend": "ray",
            "address": self.address,
            "size": sum(self._slots(node).count for node in self._nodes.values() if node.get("Alive")),
            "ready": len(self.workers()),
            "restarts": self.restarts,
            "spares": 0,
            "spare_workers": [],
            "workers": [
                {
                    "id": w.id,
                    "pid": w.pid,
                    "device": w.device,
                    "alive": w.alive,
                    "in_flight": w.in_flight,
                    "node": w.node_id,
                    "models": sorted(w.loaded),
                }
                for w in self._workers.values()
            ],
            "nodes": nodes,
        }

    # -- the nodes ---------------------------------------------------------------------------------

    def _slots(self, node: dict[str, Any]) -> NodeSlots:
        return node_slots(node.get("Resources", {}), self._device, self._cpus_per_worker, self._workers_per_node)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)  # clock-ok: polls a real cluster
            try:
                await self._poll()
            except Exception:  # the GCS may be briefly unreachable: look again at the next poll
                _log.exception("could not list the Ray cluster's nodes; trying again")

    async def _poll(self) -> None:
        import ray

        nodes = await asyncio.get_running_loop().run_in_executor(None, ray.nodes)
        self._nodes = {str(n["NodeID"]): n for n in nodes}
        alive = {node_id for node_id, n in self._nodes.items() if n.get("Alive")}
        for worker in list(self._workers.values()):
            if worker.node_id not in alive:
                worker.died("its node left the Ray cluster")
        if self.stores is not None:
            for node_id in self.stores.nodes() - alive:
                self.stores.forget(node_id)
            for node_id in alive - self.stores.nodes():
                self._background(self.stores.open(node_id))
            for node_id in self.stores.refusing_nodes() & alive:  # a disk freed or fixed is noticed
                self._background(self.stores.recheck(node_id))
        now = asyncio.get_running_loop().time()  # clock-ok: back-off of a real start
        for node_id in alive:
            if self._retry_at.get(node_id, 0.0) > now:
                continue
            slots = self._slots(self._nodes[node_id])
            have = sum(1 for w in self._workers.values() if w.node_id == node_id) + self._starting.get(node_id, 0)
            for _ in range(slots.count - have):
                self._starting[node_id] = self._starting.get(node_id, 0) + 1
                self._background(self._start_one(node_id, slots))

    async def _start_one(self, node_id: str, slots: NodeSlots) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from ember.cluster.ray_actor import WorkerActor

        n = next(self._seq)
        actor: Any = None
        worker: RayWorker | None = None
        try:
            actor = WorkerActor.options(
                num_cpus=slots.num_cpus,
                num_gpus=slots.num_gpus,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self._device, self._threads, self._preload, self._limits.memory_bytes)
            ready = asyncio.wrap_future(actor.ready.remote().future())
            info = await asyncio.wait_for(ready, START_TIMEOUT_S)
            worker = RayWorker(f"{node_id[:6]}-w{n}", node_id, actor, info, self._limits, self._lost, self.stores)
            await worker.connect()
        except Exception as exc:
            if actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            if self._stopping or isinstance(exc, asyncio.CancelledError):
                return
            self._retry_at[node_id] = asyncio.get_running_loop().time() + RETRY_S  # clock-ok
            _log.warning("a worker on Ray node %s did not start (%s: %s)", node_id[:8], type(exc).__name__, exc)
            return
        finally:
            self._starting[node_id] = self._starting.get(node_id, 1) - 1
        if self._stopping or not worker.alive:
            await worker.stopping()
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            return
        self._workers[worker.id] = worker
        self._background(self._watch(worker), _WATCH)
        if self._started:
            for callback in self._ready_callbacks:
                callback(worker)

    async def _watch(self, worker: RayWorker) -> None:
        """Wait on the actor's ``watch`` call: it raises when the actor dies, or ends it once the
        worker's connection has ended."""
        try:
            await asyncio.wrap_future(worker.actor.watch.remote().future())
        except Exception as exc:
            worker.died(f"{type(exc).__name__}")
        else:
            worker.died("its actor ended")

    def _lost(self, worker: RayWorker) -> None:
        if self._workers.get(worker.id) is not worker:
            return
        del self._workers[worker.id]
        if self._stopping:
            return
        self.restarts += 1
        for callback in self._callbacks:
            callback(worker)

    def _background(self, work: Coroutine[Any, Any, None], name: str = "ember-ray") -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
