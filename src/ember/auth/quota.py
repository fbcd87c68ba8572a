"""Per-tenant quotas: a request rate (a token bucket) and how many models, and bytes, a tenant may deploy.

The bucket is arithmetic on an injected time: :meth:`TokenBucket.take` gets ``now`` from the caller,
so the same code runs on the wall clock and on a virtual one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_LIMIT", "TenantQuota", "TokenBucket"]

#: The largest count a quota may hold (what the registry can store: a signed 64-bit integer).
MAX_LIMIT = 2**63 - 1


@dataclass(frozen=True)
class TenantQuota:
    """Limits of one tenant; None: unlimited."""

    tenant: str
    #: Sustained requests per second, and how many may come at once above it.
    rate_per_s: float | None = None
    burst: int | None = None
    #: Deployed models, and their stored bytes together.
    max_models: int | None = None
    max_bytes: int | None = None
    #: Instances its models may run at once, counted as the sum of their ``max_instances``.
    max_instances: int | None = None

    def __post_init__(self) -> None:
        if self.rate_per_s is not None and not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"rate_per_s must be a finite number above 0 (or null: unlimited), not {self.rate_per_s}")
        for name in ("burst", "max_models", "max_bytes", "max_instances"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LIMIT:
                raise ValueError(f"{name} must be 0 or more, and at most {MAX_LIMIT}, not {value}")

    def bucket(self, now: float) -> TokenBucket | None:
        if self.rate_per_s is None:
            return None
        burst = float(self.burst) if self.burst else max(1.0, self.rate_per_s)
        return TokenBucket(self.rate_per_s, burst, burst, now)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved; each request takes one."""

    rate_per_s: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0.0 if a token was taken; otherwise the seconds until one will be there."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s
