"""Prices: what a run's held resources cost in dollars.

A policy set is billed for what it holds, per second of simulated time (``RunResult``): devices held
(a device with any instance on it is rented whole, by the GPU-hour) and host memory by the GB-hour,
pageable and pinned apart (pinned memory is locked: the kernel can neither swap nor share it, so a
scenario may price it higher; by default it is the same DRAM at the same price). Bytes moved by
loads are reported beside the bill but not priced: they move inside one node, over its own links,
and no list price charges for that.

The defaults are the ones ``scenarios/default.yaml`` states, with their sources; a scenario's
``prices:`` replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_PRICES", "GPU_HOUR_USD", "HOST_MEMORY_GB_HOUR_USD", "Bill", "Prices", "bill", "share"]

#: One H200 GPU for an hour, on demand (``scenarios/default.yaml`` cites the source).
GPU_HOUR_USD = 4.54
#: One GB of host memory for an hour, on demand (``scenarios/default.yaml`` cites the source).
HOST_MEMORY_GB_HOUR_USD = 0.00445

_HOUR_S = 3600.0


@dataclass(frozen=True)
class Prices:
    gpu_hour_usd: float = GPU_HOUR_USD
    host_memory_gb_hour_usd: float = HOST_MEMORY_GB_HOUR_USD
    #: Pinned host memory per GB-hour; None: the host memory price.
    pinned_memory_gb_hour_usd: float | None = None

    @property
    def pinned_gb_hour_usd(self) -> float:
        pinned = self.pinned_memory_gb_hour_usd
        return self.host_memory_gb_hour_usd if pinned is None else pinned


DEFAULT_PRICES = Prices()


@dataclass(frozen=True)
class Bill:
    gpu_usd: float
    #: All host memory: the pageable part at the host memory price plus ``pinned_memory_usd``.
    host_memory_usd: float
    pinned_memory_usd: float = 0.0

    @property
    def total_usd(self) -> float:
        return self.gpu_usd + self.host_memory_usd


def bill(gpu_seconds: float, pageable_gb_seconds: float, prices: Prices, pinned_gb_seconds: float = 0.0) -> Bill:
    """The dollars of ``gpu_seconds`` of devices held and of host memory held, pageable and pinned."""
    pinned = pinned_gb_seconds / _HOUR_S * prices.pinned_gb_hour_usd
    return Bill(
        gpu_seconds / _HOUR_S * prices.gpu_hour_usd,
        pageable_gb_seconds / _HOUR_S * prices.host_memory_gb_hour_usd + pinned,
        pinned,
    )


def share(whole: Bill, gpu_fraction: float, pageable_gb_seconds: float, pinned_gb_seconds: float,
          prices: Prices) -> Bill:  # fmt: skip
    """One model class's part of ``whole``: the devices' dollars split by its share of the weights on them
    (``gpu_fraction`` of the GPU-memory GB-seconds), its own host memory at the prices."""
    own = bill(0.0, pageable_gb_seconds, prices, pinned_gb_seconds)
    return Bill(whole.gpu_usd * gpu_fraction, own.host_memory_usd, own.pinned_memory_usd)
