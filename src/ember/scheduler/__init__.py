"""Per-model queues ordered by deadline, the loop that turns them into batches, and the seats and
streams of generative models."""

from ember.scheduler.device import DeviceArbiter
from ember.scheduler.generative import GenerativeRunner
from ember.scheduler.queue import ModelQueue, Pending
from ember.scheduler.runner import ModelRunner

__all__ = ["DeviceArbiter", "GenerativeRunner", "ModelQueue", "ModelRunner", "Pending"]
