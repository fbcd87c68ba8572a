"""Ember's one error tree, mapped once to HTTP statuses.

    EmberError                      500  (base; never raised bare)
    ├── InvalidInput                400  the request is malformed or does not fit the model
    │   └── TooLarge                413/431  over an edge limit (body, headers); the message names it
    ├── Unauthorized                401  no API key, or not a valid one
    ├── Forbidden                   403  the key's role does not allow this (on a model it may see)
    ├── ModelNotFound               404  no deployment of that name (or not visible to the caller)
    ├── ModelExists                 409  a deployment of that name already exists
    ├── Refused                     (retryable; carries ``retry_after_s``)
    │   ├── Overloaded              503  a bounded queue is full
    │   ├── DeadlineUnmeetable      429  the request's deadline cannot be (or was not) met
    │   ├── QuotaExceeded           429  the tenant is over its request rate or its model quota
    │   ├── ModelUnavailable        503  the model cannot be brought up right now
    │   └── ShuttingDown            503  the server is draining
    ├── WorkerCrashed               500  the worker running the batch died (after one retry)
    ├── ModelFailed                 500  the model's own code raised
    ├── CorruptCheckpoint           500  stored weights fail their checksum
    ├── StorageFull                 507  the disk under Ember's home has no room for the weights
    ├── ClusterUnreachable          503  ``ember serve --cluster`` cannot reach the cluster named
    └── InternalError               500  a bug in Ember

Every message says what happened and what to do next. The gateway turns an error into
``{"error": message}`` with the status above and, for ``Refused``, a ``Retry-After`` header.
"""

from __future__ import annotations

import math

__all__ = [
    "ClusterUnreachable",
    "CorruptCheckpoint",
    "DeadlineUnmeetable",
    "EmberError",
    "Forbidden",
    "InternalError",
    "InvalidInput",
    "ModelExists",
    "ModelFailed",
    "ModelNotFound",
    "ModelUnavailable",
    "Overloaded",
    "QuotaExceeded",
    "Refused",
    "ShuttingDown",
    "StorageFull",
    "TooLarge",
    "Unauthorized",
    "WorkerCrashed",
]


class EmberError(Exception):
    """Base of every error Ember raises on purpose."""

    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"error": self.message}


class InvalidInput(EmberError):
    http_status = 400


class TooLarge(InvalidInput):
    """Over an edge limit; 413 for a body, 431 for the request's headers."""

    http_status = 413

    def __init__(self, message: str, http_status: int = 413) -> None:
        super().__init__(message)
        self.http_status = http_status


class Unauthorized(EmberError):
    http_status = 401


class Forbidden(EmberError):
    http_status = 403


class ModelNotFound(EmberError):
    http_status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' is not deployed; `ember ls` lists the deployed models")
        self.name = name


class ModelExists(EmberError):
    http_status = 409


class Refused(EmberError):
    """Ember declined the work; the caller may retry after ``retry_after_s``."""

    http_status = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class Overloaded(Refused):
    http_status = 503


class DeadlineUnmeetable(Refused):
    http_status = 429


class QuotaExceeded(Refused):
    http_status = 429


class ModelUnavailable(Refused):
    http_status = 503


class ShuttingDown(Refused):
    http_status = 503


class WorkerCrashed(EmberError):
    http_status = 500


class ModelFailed(EmberError):
    http_status = 500


class CorruptCheckpoint(EmberError):
    http_status = 500


class StorageFull(EmberError):
    http_status = 507


class ClusterUnreachable(EmberError):
    http_status = 503


class InternalError(EmberError):
    http_status = 500
