"""Prices: what a run's held resources cost in dollars.

A policy set is billed for what it holds, per second of simulated time (``RunResult``): devices held
(a device with any instance on it is rented whole, by the GPU-hour) and host memory holding warm
copies (by the GB-hour). Bytes moved by loads are reported beside the bill but not priced: they move
inside one node, over its own links, and no list price charges for that.

The defaults are the ones ``scenarios/default.yaml`` states, with their sources; a scenario's
``prices:`` replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_PRICES", "GPU_HOUR_USD", "HOST_MEMORY_GB_HOUR_USD", "Bill", "Prices", "bill"]

#: One H200 GPU for an hour, on demand (``scenarios/default.yaml`` cites the source).
GPU_HOUR_USD = 4.54
#: One GB of host memory for an hour, on demand (``scenarios/default.yaml`` cites the source).
HOST_MEMORY_GB_HOUR_USD = 0.00445

_HOUR_S = 3600.0


@dataclass(frozen=True)
class Prices:
    gpu_hour_usd: float = GPU_HOUR_USD
    host_memory_gb_hour_usd: float = HOST_MEMORY_GB_HOUR_USD


DEFAULT_PRICES = Prices()


@dataclass(frozen=True)
class Bill:
    gpu_usd: float
    host_memory_usd: float

    @property
    def total_usd(self) -> float:
        return self.gpu_usd + self.host_memory_usd


def bill(gpu_seconds: float, host_memory_gb_seconds: float, prices: Prices) -> Bill:
    """The dollars of ``gpu_seconds`` of devices held and ``host_memory_gb_seconds`` of warm copies."""
    return Bill(
        gpu_seconds / _HOUR_S * prices.gpu_hour_usd,
        host_memory_gb_seconds / _HOUR_S * prices.host_memory_gb_hour_usd,
    )
