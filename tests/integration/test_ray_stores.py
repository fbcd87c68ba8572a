"""A store on every node of a Ray cluster: weights fetched node to node and checked, and cold starts
placed where the weights already are. An Ember service in this process drives Ray's multi-node test
cluster (a head without worker CPUs, two nodes of one CPU, each node's store in its own folder).

Skipped when Ray is not installed (``pip install 'ember-serve[ray]'``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from harness import EXAMPLES

pytest.importorskip("ray")
from ray.cluster_utils import Cluster

from ember.cluster.ray import RayBackend
from ember.config import DeploySpec
from ember.service import EmberService, ServeOptions
from ember.store import Store, Tier

pytestmark = pytest.mark.ray

X = {"x": np.ones((2, 16), dtype=np.float32)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    running = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            running.add_node(num_cpus=1)
        running.wait_for_nodes()
        yield running
    finally:
        running.shutdown()


def _hosting(service: EmberService, key: str) -> list[str]:
    """The nodes whose workers have ``key`` loaded."""
    return [w["node"] for w in service.status()["workers"]["workers"] if key in w["models"]]


def _flip_last_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF
    path.write_bytes(bytes(data))


def test_weights_travel_node_to_node_checked_and_cold_starts_stay_local(cluster: Cluster, tmp_path: Path) -> None:
    async def main() -> None:
        options = ServeOptions(home=tmp_path / "home", cluster=cluster.address, request_log=False)
        async with EmberService(options) as service:
            backend = service.backend
            assert isinstance(backend, RayBackend) and backend.stores is not None
            stores = backend.stores
            await service.deploy(DeploySpec(source=f"{EXAMPLES / 'linear.py'}:Linear"))
            key = service.deployment("linear").key
            (first,) = _hosting(service, key)
            assert not stores.is_home(first)
            # It came from the service's node (where it was imported), and is warm on the node it runs on.
            (fetched,) = [f for f in stores.fetches if f.node == first]
            assert fetched.source == stores.home
            assert stores.tier(first, key) is Tier.WARM

            # Locality: cold again (off every device, and out of the service's host memory), the next
            # request's cold start goes back to the node where the weights are warm.
            await service.unload("linear", "cool")
            assert not _hosting(service, key)
            out = await service.infer("linear", X)
            assert out["y"].shape == (2, 16)
            assert _hosting(service, key) == [first]

            # A corrupt copy on a peer is discarded, and fetched again from the next source.
            (other,) = [n for n in stores.nodes() if n not in (first, stores.home)]
            _flip_last_data_byte(stores.root_of(first) / "models" / key / "weights.ember")
            path = await stores.ensure(other, key)
            assert Path(path).is_file()
            (second,) = [f for f in stores.fetches if f.node == other]
            assert second.source == stores.home  # the peer (tried first) failed its checksums
            copy = Store(stores.root_of(other))
            try:
                copy.verify(key)
            finally:
                copy.close()

            # A sound peer is preferred over the service's node.
            third = cluster.add_node(num_cpus=1)
            for _ in range(1200):  # the backend's next poll opens its store
                if stores.is_open(third.node_id):
                    break
                await asyncio.sleep(0.1)
            assert stores.is_open(third.node_id), "the new node's store did not open within 120 s"
            await stores.ensure(third.node_id, key)
            (last,) = [f for f in stores.fetches if f.node == third.node_id]
            assert last.source == other

    asyncio.run(main())
