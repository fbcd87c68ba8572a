"""Per-model queues ordered by deadline, and the loop that turns them into batches."""

from ember.scheduler.device import DeviceArbiter
from ember.scheduler.queue import ModelQueue, Pending
from ember.scheduler.runner import ModelRunner

__all__ = ["DeviceArbiter", "ModelQueue", "ModelRunner", "Pending"]
