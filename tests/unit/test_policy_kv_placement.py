"""Placement counts a generative model's KV-cache budget beside its weights: in the pure policies, the
state layer's views, the controller's choice of a worker and the simulator's devices."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.policies import MemoryAwarePlacement, PackByMemory, PlacementRequest, WorkerView, kv_cache_bytes
from ember.service import EmberService, ServeOptions
from ember.state import Hosted, kv_bytes_of, worker_view
from ember.testing import FakeBackend, generative_description, run_in_virtual_time


def _worker(wid: str, loaded: int, capacity: int = 100) -> WorkerView:
    return WorkerView(wid, True, "cuda:0", ("r",) if loaded else (), loaded, 0, capacity)


def test_the_kv_budget_holds_every_sequence_at_full_length():
    assert kv_cache_bytes(16, 2048, 1024) == 16 * 2048 * 1024


@pytest.mark.parametrize("policy", [MemoryAwarePlacement(), PackByMemory()])
def test_weights_that_fit_are_not_placed_where_their_kv_cache_does_not(policy):
    workers = (_worker("tight", 60), _worker("roomy", 10))
    one_shot = PlacementRequest("m", 30)
    llm = PlacementRequest("llm", 30, kv_bytes=30)
    assert llm.device_bytes == 60
    assert policy.choose(one_shot, workers) == "tight"  # 30 of 40 free: the tightest fit
    assert policy.choose(llm, workers) == "roomy"  # 60 does not fit 40
    assert policy.choose(PlacementRequest("llm", 30, kv_bytes=91), workers) is None


@given(weights=st.integers(0, 200), kv=st.integers(0, 200), loaded=st.lists(st.integers(0, 100), max_size=4))
def test_a_chosen_worker_always_holds_weights_and_kv_cache(weights, kv, loaded):
    workers = tuple(_worker(f"w{i}", used, capacity=150) for i, used in enumerate(loaded))
    request = PlacementRequest("llm", weights, kv_bytes=kv)
    for policy in (MemoryAwarePlacement(), PackByMemory()):
        chosen = policy.choose(request, workers)
        if chosen is not None:
            view = next(w for w in workers if w.id == chosen)
            assert view.free_bytes is not None and view.free_bytes >= weights + kv


def test_a_worker_view_counts_the_kv_cache_of_what_it_hosts():
    view = worker_view("w", "cpu", (Hosted("llm", 100, "t", 1.0, 0.01, kv_bytes=400),), capacity_bytes=1000)
    assert view.bytes_loaded == 500 and view.free_bytes == 500


def test_two_llms_whose_kv_caches_do_not_share_a_device_go_to_two_workers(tmp_path: Path):
    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(
            clock, size=2, described=generative_description(max_model_len=1024, kv_bytes_per_token=1024)
        )
        options = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm", device_memory_bytes=3 << 20)
        async with EmberService(options, clock, backend) as service:
            source = tmp_path / "llm.py"
            source.write_text("class LLM: ...\n")
            for name in ("a", "b"):
                spec = DeploySpec.model_validate({"source": f"{source}:LLM", "name": name, "max_num_seqs": 2})
                await service.deploy(spec)
                assert kv_bytes_of(service.deployment(name)) == 2 << 20  # 2 sequences x 1024 tokens x 1 KiB
            homes = {w.id for w in backend.workers() for key in w.loaded if key.startswith(("a@", "b@"))}
            assert len(homes) == 2  # each one's 2 MiB cache leaves no room for the other's on a 3 MiB device

    run_in_virtual_time(main)
