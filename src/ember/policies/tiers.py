"""The temperature tiers a model's weights move between (DESIGN.md section 2).

Policies decide in tiers (keep-alive demotes one tier at a time, the latency model predicts a load
per tier), so the enum lives here with them: importing a policy imports no storage code. The store
(``ember.store``) implements the tiers and re-exports the name.
"""

from __future__ import annotations

import enum

__all__ = ["Tier"]


class Tier(enum.StrEnum):
    """Where a model's weights are; hotter tiers serve the next request sooner."""

    HOT = "hot"
    WARM = "warm"
    COOL = "cool"
    COLD = "cold"
