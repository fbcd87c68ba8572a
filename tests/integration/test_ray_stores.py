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
from harness import EXAMPLES, ray_cluster

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
    """A head without worker CPUs and two nodes of one CPU each."""
    with ray_cluster(nodes=2) as running:
        yield running


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


def test_a_node_whose_store_cannot_be_written_takes_no_new_models_and_says_why(
    cluster: Cluster, tmp_path: Path
) -> None:
    """One node's store folder cannot be made (a file stands in its place): its workers get no model,
    the service's status says why, and once the folder can be made the node takes models again."""
    home = tmp_path / "home"
    bad = min(node.node_id for node in cluster.list_all_nodes() if not node.head)
    (home / "nodes").mkdir(parents=True)
    blocker = home / "nodes" / bad[:16]
    blocker.write_text("not a folder")

    def refusing(service: EmberService) -> str | None:
        (node,) = [n for n in service.status()["workers"]["nodes"] if n["id"] == bad]
        reason: str | None = node["store"]["refusing"]
        return reason

    async def main() -> None:
        options = ServeOptions(home=home, cluster=cluster.address, request_log=False)
        async with EmberService(options) as service:
            assert any(w["node"] == bad for w in service.status()["workers"]["workers"]), "no worker on the node"
            reason = refusing(service)
            assert reason is not None and "cannot be opened" in reason and str(blocker) in reason, reason
            source = f"{EXAMPLES / 'linear.py'}:Linear"
            for name in ("one", "two", "three"):
                await service.deploy(DeploySpec(source=source, name=name))
                key = service.deployment(name).key
                assert _hosting(service, key) and bad not in _hosting(service, key), (name, _hosting(service, key))
                assert (await service.infer(name, X))["y"].shape == (2, 16)

            blocker.unlink()  # fixed: the backend's poll asks the node again
            for _ in range(600):
                if refusing(service) is None:
                    break
                await asyncio.sleep(0.1)
            assert refusing(service) is None, "the node still refuses 60 s after its folder could be made"
            assert (home / "nodes" / bad[:16] / "models").is_dir()

    asyncio.run(main())
