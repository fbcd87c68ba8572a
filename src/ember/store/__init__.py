"""Ember's store: the checkpoint format, the loader, and the warm and cool tiers of a model's weights.

See DESIGN.md sections 2 and 5. Importing this package does not import torch; the checkpoint,
conversion and loader functions import it when called.
"""

from ember.store.compress import CompressedIndex, compress_checkpoint, decompress_checkpoint, read_compressed_index
from ember.store.convert import export_safetensors, import_source, read_source, write_checkpoint
from ember.store.format import Index, TensorEntry, read_index, verify_chunks
from ember.store.loader import LoaderConfig, load_checkpoint, map_checkpoint
from ember.store.safetensors_io import map_safetensors, write_safetensors
from ember.store.store import Store, StoredModel, StoreStats, Tier, TierStats

__all__ = [
    "CompressedIndex",
    "Index",
    "LoaderConfig",
    "Store",
    "StoreStats",
    "StoredModel",
    "TensorEntry",
    "Tier",
    "TierStats",
    "compress_checkpoint",
    "decompress_checkpoint",
    "export_safetensors",
    "import_source",
    "load_checkpoint",
    "map_checkpoint",
    "map_safetensors",
    "read_compressed_index",
    "read_index",
    "read_source",
    "verify_chunks",
    "write_checkpoint",
    "write_safetensors",
]
