"""Ember's store: the checkpoint format and the warm and cool tiers of a model's weights.

See DESIGN.md sections 2 and 5. Importing this package does not import torch; the checkpoint
functions import it when called.
"""

from ember.store.checkpoint import map_checkpoint, write_checkpoint
from ember.store.store import Store, StoredModel, StoreStats, Tier, TierStats

__all__ = [
    "Store",
    "StoreStats",
    "StoredModel",
    "Tier",
    "TierStats",
    "map_checkpoint",
    "write_checkpoint",
]
