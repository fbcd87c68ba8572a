"""The seam between the controller and the workers: local processes or (later) Ray actors."""

from ember.cluster.base import ClusterBackend, WorkerHandle
from ember.cluster.local import LocalBackend

__all__ = ["ClusterBackend", "LocalBackend", "WorkerHandle"]
