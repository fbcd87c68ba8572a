"""Cluster: what the Ray backend adds to a warm request, and a cold start whose weights are on another node.

    python benchmarks/cluster.py [--duration-s 6] [--rounds 3] [--concurrency 1 32] [--nodes 1]
                                 [--cold-model minilm] [--cold-repeats 3] [--json out.json]

Claim (issue 13): on this machine the Ray hop adds at most 1 ms to the median warm request over the
local backend, and at concurrency 32 the Ray backend serves at least 70% of the local backend's
requests per second. Beside it, the time to the first answer of a model whose weights come from
another node, against one read from the local backend's cool tier.

* Cluster: Ray's multi-node test cluster (``ray.cluster_utils.Cluster``) on this host: a head with no
  CPUs for workers (as on a real cluster, where it runs ``ember serve``), and ``--nodes`` nodes of one
  CPU each, so one worker actor per node. Every node's store is its own folder.
* Local: ``python -m ember.cli serve --workers 1``; Ray: ``python -m ember.cli serve --cluster ADDRESS``.
  Both are up for the whole run; each cell is measured in ``--rounds`` slices, the two taking turns
  (so drift in the machine's load hits both alike), never at the same time.
* Warm path: ``examples/linear.py:Linear`` (16 -> 16), one row per request, OIP v2 JSON both ways,
  the keep-alive load generator of ``_common.py`` (closed loop, one connection per concurrent
  request), as ``warm_path.py`` measures it. The hop is Ray's p50 minus the local p50 at c=1; the
  throughput ratio is Ray's requests per second over the local backend's at c=32. Ember's counters
  (``/metrics``) split each server's time into compute per batch and the gateway <-> worker hop.
* Cold start: ``--cold-model`` (MiniLM by default, 90 MB of weights) deployed on both with an hour's
  keep-alive, so only the script's own unloads move it. Each round times one request, from connect
  to answer: the local backend with the model in its cool tier (``unload?tier=cool``, then
  ``--settle-s``); Ray with the weights in the store of the worker's node (unloaded to cool as well:
  the node's store keeps its copy); and Ray with the weights on another node only: a fresh node
  joins, the node that held them leaves, and the cold start fetches them from the store of ``ember
  serve``'s node (checked chunk by chunk) before loading. A fresh node has a fresh worker, which
  has not run the model's code yet; so a second deployment of the same model loads there first
  (``POST /admin/models/NAME-first/load``, timed as its own case: weights from another node *and*
  a worker's first run of the model), and the timed request then finds the worker as the other cases
  do. Ember's own figure for the promotion and the fetch's seconds (``ember status``) are recorded
  beside each.

The worker actors run under Ray's raylets, outside the server's process group: the CPU columns count
the gateway process only.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common as c
import cold_start
import numpy as np
import warm_path

HOP_GOAL_MS = 1.0
THROUGHPUT_GOAL = 0.7
#: The throughput goal holds at this concurrency and above.
THROUGHPUT_AT = 32
SERVERS = ("local", "ray")


@contextlib.contextmanager
def ray_cluster(nodes: int) -> Iterator[Any]:
    """A head with no worker CPUs and ``nodes`` nodes of one CPU each; shut down on exit."""
    from ray.cluster_utils import Cluster

    with c.step(f"starting Ray's test cluster: a head without worker CPUs and {nodes} node(s) of 1 CPU"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        with c.step("stopping Ray's test cluster"):
            cluster.shutdown()


# -- the warm path ---------------------------------------------------------------------------------


def measure_warm(args: argparse.Namespace, servers: dict[str, c.Server]) -> dict[str, list[warm_path.Cell]]:
    cells = {name: [warm_path.Cell(name, conc) for conc in args.concurrency] for name in SERVERS}
    order = list(servers.items())
    slice_s = args.duration_s / args.rounds
    for round_ in range(args.rounds):
        with c.step(f"warm path, round {round_ + 1} of {args.rounds}: {slice_s:.2f} s per cell"):
            for i, conc in enumerate(args.concurrency):
                for name, server in order if round_ % 2 == 0 else order[::-1]:
                    load, cpu, counters = warm_path.measure_cell(server, True, conc, slice_s, args)
                    cells[name][i].add(load, cpu, counters)
                    print(
                        f"    {name:>5} c={conc:<3} {load.rps:7.0f} req/s  p50 {load.percentile_ms(50):7.3f} ms"
                        f"  p99 {load.percentile_ms(99):8.3f} ms  errors {load.errors}",
                        flush=True,
                    )
    return cells


def warm_rows(cells: dict[str, list[warm_path.Cell]]) -> list[dict[str, Any]]:
    rows = []
    for name in SERVERS:
        for cell in cells[name]:
            row = cell.row()
            row["inside"] = warm_path.inside(cell.counters)
            rows.append(row)
    return rows


def warm_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    local = {r["concurrency"]: r for r in rows if r["server"] == "local"}
    ratios = []
    for ray in (r for r in rows if r["server"] == "ray"):
        base = local[ray["concurrency"]]
        per_round = [rr / lr for lr, rr in zip(base["round_rps"], ray["round_rps"], strict=True) if lr]
        ratios.append(
            {
                "concurrency": ray["concurrency"],
                "hop_p50_ms": ray["p50_ms"] - base["p50_ms"],
                "hop_p99_ms": ray["p99_ms"] - base["p99_ms"],
                "throughput_ratio": ray["rps"] / base["rps"] if base["rps"] else float("nan"),
                "throughput_ratio_per_round": per_round,
            }
        )
    return ratios


# -- cold starts -----------------------------------------------------------------------------------


def ray_workers(client: Any) -> list[dict[str, Any]]:
    return [w for w in client.status()["workers"]["workers"] if w["alive"]]


def wait_for(what: str, check: Any, timeout_s: float) -> Any:
    """Poll ``check()`` (a real cluster's state) until it is truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.2)
    return got


def timed_cold_start(client: Any, subject: Any, port: int) -> dict[str, Any]:
    """One request to a model in the cool tier; its wall time and Ember's own promotion."""
    before = client.model(subject.name)
    if before["tier"] != "cool":
        raise RuntimeError(f"{subject.name} is {before['tier']}, not cool, before the request")
    seconds = cold_start.ask(subject, port)
    after = client.model(subject.name)
    if after["cold_starts"] != before["cold_starts"] + 1:
        raise RuntimeError(f"the request caused {after['cold_starts'] - before['cold_starts']} promotions")
    return {"request_s": seconds, "server_load_s": after["last_cold_start"]["seconds"]}


def to_cool(client: Any, subject: Any, settle_s: float) -> None:
    cold_start.demote(client, subject, "cool")
    time.sleep(settle_s)  # the demotion's own work (unload, gc) is done before the request comes


def fresh_node(cluster: Any, client: Any, key: str) -> str:
    """A new node joins and every node (but the head, ``ember serve``'s) whose store holds ``key``
    leaves: no worker's node holds its weights now. The new node's id, once its worker is ready."""
    holders = set()
    for entry in client.status()["workers"]["nodes"]:
        held = (entry.get("store") or {}).get("models", {})
        if entry["alive"] and any(key in keys for keys in held.values()):
            holders.add(entry["id"])
    node = cluster.add_node(num_cpus=1)
    wait_for("the new node's worker", lambda: node.node_id in {w["node"] for w in ray_workers(client)}, 180.0)
    for victim in [n for n in cluster.list_all_nodes() if n.node_id in holders and not n.head]:
        cluster.remove_node(victim)
    wait_for("the workers of the nodes that left", lambda: not holders & {w["node"] for w in ray_workers(client)}, 60.0)
    return str(node.node_id)


def fetch_of(client: Any, node: str, key: str) -> dict[str, Any] | None:
    """The node store's fetch of ``key`` (where from, how many seconds; from ``ember status``), if any."""
    for entry in client.status()["workers"]["nodes"]:
        if entry["id"] == node and entry.get("store"):
            fetches = [f for f in entry["store"]["fetched"] if f["key"] == key]
            return dict(fetches[-1]) if fetches else None
    return None


CASES = (
    "local, cool tier",
    "ray, on the worker's node",
    "ray, on another node",
    "ray, on another node, fresh worker",
)


def with_fetch(client: Any, node: str, key: str, sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with the node store's fetch of ``key``; fails if the node did not fetch it."""
    fetch = fetch_of(client, node, key)
    if fetch is None:
        raise RuntimeError(f"node {node[:8]} did not fetch {key}: the case measured something else")
    return {**sample, "fetch_s": float(fetch["seconds"]), "fetched_from": fetch["from"]}


def measure_cold(
    args: argparse.Namespace, cluster: Any, servers: dict[str, c.Server], clients: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Each round: the local cool start, Ray's from the worker's node, then a fresh node. On the fresh
    node a second deployment of the same model (``NAME-first``) loads first, so that the timed request
    finds a worker that has run the model's code, as the other cases do; that first load is its own case."""
    subject = cold_start.SUBJECTS[args.cold_model]
    first = f"{subject.name}-first"
    samples: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    keepalive = {"keepalive_hot_s": 3600.0, "keepalive_warm_s": 3600.0, "on_unmeetable": "best_effort"}
    with c.step(f"deploying {subject.name} on both (an hour's keep-alive on the hot and warm tiers), {first} on Ray"):
        for client in clients.values():
            client.deploy(subject.source(), name=subject.name, **keepalive)
        clients["ray"].deploy(subject.source(), name=first, load=False, **keepalive)
    local, ray = clients["local"], clients["ray"]
    key = f"{subject.name}@{ray.model(subject.name)['version']}"
    first_key = f"{first}@{ray.model(first)['version']}"
    for round_ in range(args.cold_repeats):
        with c.step(f"cold starts, round {round_ + 1} of {args.cold_repeats}"):
            to_cool(local, subject, args.settle_s)
            samples[CASES[0]].append(timed_cold_start(local, subject, servers["local"].port))
            to_cool(ray, subject, args.settle_s)
            samples[CASES[1]].append(timed_cold_start(ray, subject, servers["ray"].port))
            to_cool(ray, subject, 0.0)
            node = fresh_node(cluster, ray, key)
            time.sleep(args.settle_s)
            started = time.perf_counter()
            loaded = ray.load(first)  # POST /admin/models/NAME/load: answered once it is hot
            sample = {"request_s": time.perf_counter() - started, "server_load_s": loaded["last_cold_start"]["seconds"]}
            samples[CASES[3]].append(with_fetch(ray, node, first_key, sample))
            ray.unload(first, tier="cool")
            time.sleep(args.settle_s)
            sample = timed_cold_start(ray, subject, servers["ray"].port)
            samples[CASES[2]].append(with_fetch(ray, node, key, sample))
            for case in CASES:
                last = samples[case][-1]
                fetch = f", fetch {1000 * last['fetch_s']:.1f} ms" if "fetch_s" in last else ""
                print(
                    f"    {case:>34}: {1000 * last['request_s']:8.1f} ms"
                    f" (Ember's promotion {1000 * last['server_load_s']:.1f} ms{fetch})",
                    flush=True,
                )
    return samples


def cold_rows(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    base = c.median([1000 * s["request_s"] for s in samples[CASES[0]]])
    for case in CASES:
        ms = [1000 * s["request_s"] for s in samples[case]]
        fetches = [1000 * s["fetch_s"] for s in samples[case] if s.get("fetch_s") is not None]
        rows.append(
            {
                "case": case,
                "n": len(ms),
                "median_ms": c.median(ms),
                "min_ms": min(ms),
                "max_ms": max(ms),
                "server_load_median_ms": c.median([1000 * s["server_load_s"] for s in samples[case]]),
                "fetch_median_ms": c.median(fetches),
                "ratio_over_local_cool": c.median(ms) / base,
                "samples_ms": ms,
            }
        )
    return rows


# -- the floors ------------------------------------------------------------------------------------


class Echo:
    """An actor that answers its argument, threaded and with a concurrency group as Ember's worker actor."""

    def handle(self, message: Any) -> Any:
        return message


def ray_floor(address: str, iterations: int) -> dict[str, float]:
    """The round trip of a bare Ray actor call from an asyncio driver (``ObjectRef.future()``),
    carrying one request of Linear: the least a hop through Ray calls would cost (the Ray backend
    sends requests over its own TCP connection to each actor instead); beside it the local backend's
    floor, a socketpair echo between two processes (``warm_path.socket_echo_p50_s``)."""
    import asyncio
    import pickle

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=address, namespace="ember-bench", log_to_driver=False, configure_logging=False)
    try:
        node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
        actor = (
            ray.remote(num_cpus=0, max_restarts=0, concurrency_groups={"watch": 1})(Echo)
            .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote()
        )
        message = [{"x": np.ones((1, 16), dtype=np.float32)}]

        async def trips() -> list[float]:
            took = []
            for _ in range(iterations + iterations // 10):  # the first tenth warms up
                start = time.perf_counter()
                await asyncio.wrap_future(actor.handle.remote(message).future())
                took.append(time.perf_counter() - start)
            return took[iterations // 10 :]

        took: list[float] = c.run_async(trips)
    finally:
        ray.shutdown()
    frame = len(pickle.dumps(message, protocol=5)) + 64
    return {
        "ray_actor_call_p50_us": 1e6 * c.percentile(took, 50),
        "ray_actor_call_p99_us": 1e6 * c.percentile(took, 99),
        "socketpair_echo_p50_us": 1e6 * warm_path.socket_echo_p50_s(frame, iterations),
    }


# -- the run ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from ember import Client

    load_average = [c.load_average()]
    with ray_cluster(args.nodes) as cluster:
        servers = {
            "local": c.ember_server(scratch / "local", c.free_port(), workers=1),
            "ray": c.ember_server(scratch / "ray", c.free_port(), options=["--cluster", cluster.address]),
        }
        with servers["local"], servers["ray"], Client(servers["local"].url) as local, Client(servers["ray"].url) as ray:
            clients = {"local": local, "ray": ray}
            with c.step(f"starting ember serve (local backend, 1 worker) and ember serve --cluster {cluster.address}"):
                for server in servers.values():
                    server.wait_ready("/v2/health/ready", timeout_s=240)
                wait_for("a Ray worker", lambda: len(ray_workers(ray)) == args.nodes, 240.0)
                for client in clients.values():
                    client.deploy(warm_path.SOURCE, name=warm_path.MODEL)
                answers = {name: warm_path.answer_of(server.url) for name, server in servers.items()}
                if not np.allclose(answers["local"], answers["ray"], rtol=1e-5, atol=1e-5):
                    raise SystemExit(f"the backends disagree: {answers}")
            cells = measure_warm(args, servers)
            load_average.append(c.load_average())
            samples: dict[str, list[dict[str, Any]]] = {}
            if args.cold_repeats > 0:
                for client in clients.values():  # off every device: no re-placement when nodes come and go
                    client.unload(warm_path.MODEL, tier="cool")
                samples = measure_cold(args, cluster, servers, clients)
                load_average.append(c.load_average())
        floors: dict[str, float] = {}
        if args.floor_iterations > 0:
            with c.step(f"the floors: {args.floor_iterations} bare Ray actor calls, and socketpair echoes"):
                floors = ray_floor(cluster.address, args.floor_iterations)
    return {"warm": warm_rows(cells), "cold": samples, "floors": floors, "load_average": load_average}


def report(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rows = results["warm"]
    print("\nWarm path: Linear(16, 16), one row per request, OIP v2 JSON, closed loop, rounds pooled")
    c.print_table(
        ["backend", "concurrency", "requests", "errors", "req/s", "p50 ms", "p99 ms", "gateway CPU us/req"],
        [
            [
                r["server"],
                r["concurrency"],
                r["requests"],
                r["errors"],
                r["rps"],
                r["p50_ms"],
                r["p99_ms"],
                r["cpu_us_per_request"].get("gateway", float("nan")),
            ]
            for r in rows
        ],
    )
    print("\nInside each server (from /metrics; hop = in-server - queue - compute, per batch)")
    c.print_table(
        ["backend", "concurrency", "batches", "rows/batch", "compute us/batch", "queue us/req", "hop us/batch"],
        [
            [
                r["server"],
                r["concurrency"],
                int(r["inside"]["batches"]),
                r["inside"]["rows_per_batch"],
                r["inside"]["compute_us_per_batch"],
                r["inside"]["queue_us_per_request"],
                r["inside"]["hop_us_per_batch"],
            ]
            for r in rows
        ],
    )
    ratios = warm_ratios(rows)
    goals: dict[str, Any] = {}
    for r in ratios:
        if r["concurrency"] == min(args.concurrency):
            goals["hop_p50_ms"] = r["hop_p50_ms"]
            goals["hop_met"] = r["hop_p50_ms"] <= HOP_GOAL_MS
        if r["concurrency"] == max(args.concurrency) >= THROUGHPUT_AT:
            goals["throughput_ratio"] = r["throughput_ratio"]
            goals["throughput_met"] = r["throughput_ratio"] >= THROUGHPUT_GOAL
    print(
        f"\nRay against local (goal: the hop adds <= {HOP_GOAL_MS:g} ms at p50; "
        f"throughput at c={THROUGHPUT_AT} >= {THROUGHPUT_GOAL:.0%} of local)"
    )
    c.print_table(
        ["concurrency", "hop p50 ms", "hop p99 ms", "throughput ratio", "per round"],
        [
            [
                r["concurrency"],
                r["hop_p50_ms"],
                r["hop_p99_ms"],
                r["throughput_ratio"],
                " ".join(f"{x:.2f}" for x in r["throughput_ratio_per_round"]),
            ]
            for r in ratios
        ],
    )
    floors = results["floors"]
    if floors:
        print(
            f"floors, nothing else running: a bare Ray actor call from an asyncio driver "
            f"{floors['ray_actor_call_p50_us']:.0f} us p50 ({floors['ray_actor_call_p99_us']:.0f} us p99); "
            f"a socketpair echo between two processes {floors['socketpair_echo_p50_us']:.0f} us p50"
        )
    if "hop_met" in goals:
        print(
            f"goal: the Ray hop adds <= {HOP_GOAL_MS:g} ms at p50 (c={min(args.concurrency)}): "
            f"{'met' if goals['hop_met'] else 'missed'} ({goals['hop_p50_ms']:+.3f} ms)"
        )
    if "throughput_met" in goals:
        print(
            f"goal: Ray's throughput at c={max(args.concurrency)} >= {THROUGHPUT_GOAL:.0%} of local: "
            f"{'met' if goals['throughput_met'] else 'missed'} ({goals['throughput_ratio']:.2f})"
        )
    cold: list[dict[str, Any]] = []
    if results["cold"]:
        cold = cold_rows(results["cold"])
        print(
            f"\nCold start: {args.cold_model}, one request, wall time from connect to answer (the fresh worker's "
            "case: the load call)"
        )
        c.print_table(
            ["case", "n", "median ms", "min ms", "max ms", "Ember's promotion ms", "fetch ms", "ratio to local cool"],
            [
                [
                    r["case"],
                    r["n"],
                    r["median_ms"],
                    r["min_ms"],
                    r["max_ms"],
                    r["server_load_median_ms"],
                    r["fetch_median_ms"],
                    r["ratio_over_local_cool"],
                ]
                for r in cold
            ],
        )
    averages = " -> ".join(f"{x:.2f}" for x in results["load_average"])
    print(f"\none-minute load average during the run: {averages} {c.LOAD_NOTE}")
    return {"ratios": ratios, "goals": goals, "cold_rows": cold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=6.0, help="Measured seconds per warm cell, all rounds.")
    parser.add_argument("--rounds", type=int, default=3, help="Slices per warm cell, the backends taking turns.")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="Unmeasured seconds before each slice.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="Concurrent connections.")
    parser.add_argument("--max-requests", type=int, default=100_000, help="Most requests per slice.")
    parser.add_argument("--nodes", type=int, default=1, help="Nodes of 1 CPU (one worker each) besides the head.")
    parser.add_argument(
        "--cold-model", choices=sorted(cold_start.SUBJECTS), default="minilm", help="The model of the cold starts."
    )
    parser.add_argument("--cold-repeats", type=int, default=3, help="Rounds of the three cold starts (0: skip).")
    parser.add_argument("--settle-s", type=float, default=1.5, help="Pause after a demotion, before the request.")
    parser.add_argument(
        "--floor-iterations", type=int, default=2000, help="Bare Ray actor calls for the floor (0: skip)."
    )
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ember-cluster-") as scratch:
        results = run(args, Path(scratch))
    summary = report(results, args)
    c.write_json(
        args.json,
        {
            "benchmark": "cluster",
            "machine": c.machine(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "warm_rows": results["warm"],
            **summary,
            "floors": results["floors"],
            "cold_samples": results["cold"],
            "load_average": results["load_average"],
        },
    )


if __name__ == "__main__":
    main()
