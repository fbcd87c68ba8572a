"""The simulator holds a generative model's KV-cache budget on its device beside the weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from sim_cases import SMALL

from ember.errors import InvalidInput
from ember.sim.scenario import parse_scenario

HERE = Path(__file__).resolve().parent


def test_a_model_whose_weights_fit_but_not_with_its_kv_cache_is_refused() -> None:
    from ember.sim.runner import run_policy_set

    s = parse_scenario(SMALL.replace("devices_per_node: 2", "devices_per_node: 2, device_memory_gb: 40"), HERE)
    first = s.models[0]
    assert first.device_bytes == first.weights_bytes  # a one-shot model holds its weights alone
    llm = dataclasses.replace(first, kv_bytes=50 * 10**9)
    assert llm.device_bytes == first.weights_bytes + 50 * 10**9
    s = dataclasses.replace(s, models=(llm, *s.models[1:]))
    with pytest.raises(InvalidInput, match=rf"model '{first.name}' .* with its KV cache\) does not fit a device"):
        run_policy_set(s, "ember", {}, s.workload())
    with pytest.raises(InvalidInput, match="KV-cache budget"):
        dataclasses.replace(first, kv_bytes=-1)
