"""Fakes shipped with Ember, for its own tests and for users' tests of code built on it.

``VirtualClock`` moves only when told; ``FakeWorker``/``FakeBackend`` stand in for worker processes
with a latency profile on that clock (and a token stream for generative models,
``FakeWorker.generate``, timed by a ``GenerationProfile``); ``FakeRunner`` stands in for a model's runner where the
controller is tested alone; ``stage_weights`` puts a model's bytes in a store;
``poisson_arrivals`` builds a repeatable arrival trace; ``simfaas_scenario`` the scenario of SimFaaS's
one-function model; ``ScriptedGeneration`` stands in for the service's ``generate`` (token streams)
where what sits above it is tested.
"""

from ember.clock import VirtualClock
from ember.testing.fakes import (
    FakeBackend,
    FakeWorker,
    GenerationProfile,
    LatencyProfile,
    generative_description,
    run_in_virtual_time,
    stage_weights,
)
from ember.testing.generation import ScriptedGeneration
from ember.testing.runner import FakeRunner
from ember.testing.traces import SIMFAAS_COLD_S, SIMFAAS_WARM_S, poisson_arrivals, simfaas_scenario

__all__ = [
    "SIMFAAS_COLD_S",
    "SIMFAAS_WARM_S",
    "FakeBackend",
    "FakeRunner",
    "FakeWorker",
    "GenerationProfile",
    "LatencyProfile",
    "ScriptedGeneration",
    "VirtualClock",
    "generative_description",
    "poisson_arrivals",
    "run_in_virtual_time",
    "simfaas_scenario",
    "stage_weights",
]
