"""Ember: serverless inference for deep-learning models.

A model is a :class:`ModelAPI` class, deployed once and then served over the Open Inference
Protocol v2, the OpenAI API and :class:`Client`; idle, it costs nothing on the device; called, it is
back in milliseconds.
"""

from ember.api import GenerativeModel, ModelAPI, SeqChunk, TensorSpec
from ember.clock import Clock, VirtualClock, WallClock
from ember.config import DeploySpec
from ember.errors import EmberError

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Clock",
    "DeploySpec",
    "EmberError",
    "EmberService",
    "GenerativeModel",
    "ModelAPI",
    "SeqChunk",
    "ServeOptions",
    "TensorSpec",
    "VirtualClock",
    "WallClock",
    "__version__",
]


def __getattr__(name: str) -> object:
    # The service and the client pull in more; import them only when asked for.
    if name in ("EmberService", "ServeOptions"):
        from ember import service

        return getattr(service, name)
    if name == "Client":
        from ember.client import Client

        return Client
    raise AttributeError(f"module 'ember' has no attribute {name!r}")
