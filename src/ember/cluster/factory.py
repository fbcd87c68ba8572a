"""The backend ``ember serve --cluster`` names: ``local`` (worker processes of this machine) or a Ray
cluster (``ray``, ``ray://HOST:PORT``, ``HOST:PORT``). The service builds it here and never asks which."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ember.cluster.base import ClusterBackend
from ember.cluster.local import LocalBackend, WorkerLimits
from ember.errors import ClusterUnreachable

__all__ = ["LOCAL", "backend_for", "check_cluster"]

LOCAL = "local"


def check_cluster(cluster: str) -> None:
    """ClusterUnreachable if ``cluster`` is not ``local`` and Ray is not installed (or it is malformed)."""
    if cluster == LOCAL:
        return
    if importlib.util.find_spec("ray") is None:
        raise ClusterUnreachable(f"--cluster {cluster} needs Ray on every node: pip install 'ember-serve[ray]'")
    if cluster != "ray" and ":" not in cluster:
        raise ClusterUnreachable(f"--cluster {cluster}: use local, ray, ray://HOST:PORT or HOST:PORT")


def backend_for(
    cluster: str,
    *,
    size: int,
    log_dir: Path,
    device: str,
    threads: int,
    preload: tuple[str, ...],
    limits: WorkerLimits,
    spares: int,
    warm_arena: Path | None,
    cpus_per_worker: float = 1.0,
    store_root: Path | None = None,
    node_root: Path | None = None,
) -> ClusterBackend:
    """``size`` and ``spares`` size the local pool; a Ray cluster sizes itself by its nodes (one
    worker per GPU, or per ``cpus_per_worker`` CPUs), and keeps a store on each node: the service's
    (``store_root``) on its own node, ``node_root/<node>`` on the others."""
    if cluster == LOCAL:
        return LocalBackend(size, log_dir, device, threads, preload, limits, spares, warm_arena)
    check_cluster(cluster)
    from ember.cluster.ray import RayBackend, ray_address

    return RayBackend(
        ray_address(cluster),
        device,
        threads,
        preload,
        limits,
        cpus_per_worker=cpus_per_worker,
        store_root=store_root,
        node_root=node_root,
    )
