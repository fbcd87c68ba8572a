"""Pure decisions over frozen snapshots: they do no I/O, read no clock and log nothing.

The loops that apply them live in ``scheduler/`` and ``controller/``; the simulator imports the same
functions, so each decision has one implementation.
"""

from ember.policies.batching import BatchDecision, BatchPolicy, DeadlineBatcher, QueueSnapshot
from ember.policies.keepalive import Demotion, FixedKeepAlive, KeepAlive, ModelView
from ember.policies.placement import LeastLoaded, Placement, TenantIsolated, WorkerView

__all__ = [
    "BatchDecision",
    "BatchPolicy",
    "DeadlineBatcher",
    "Demotion",
    "FixedKeepAlive",
    "KeepAlive",
    "LeastLoaded",
    "ModelView",
    "Placement",
    "QueueSnapshot",
    "TenantIsolated",
    "WorkerView",
]
