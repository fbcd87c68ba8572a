"""Fakes shipped with Ember, for its own tests and for users' tests of code built on it.

``VirtualClock`` moves only when told; ``FakeWorker``/``FakeBackend`` stand in for worker processes
with a latency profile on that clock; ``FakeRunner`` stands in for a model's runner where the
controller is tested alone; ``stage_weights`` puts a model's bytes in a store;
``poisson_arrivals`` builds a repeatable arrival trace.
"""

from ember.clock import VirtualClock
from ember.testing.fakes import FakeBackend, FakeWorker, LatencyProfile, run_in_virtual_time, stage_weights
from ember.testing.runner import FakeRunner
from ember.testing.traces import poisson_arrivals

__all__ = [
    "FakeBackend",
    "FakeRunner",
    "FakeWorker",
    "LatencyProfile",
    "VirtualClock",
    "poisson_arrivals",
    "run_in_virtual_time",
    "stage_weights",
]
