"""Built-in adapters: the ModelAPI classes Ember uses to serve artifacts nobody wrote a class for.

* :class:`SentenceEmbedding`: a sentence-transformers (or Hugging Face encoder) folder, on the
  ``/v1/embeddings`` route.
* :class:`TorchScript`: an archive written by ``torch.jit.save``.
* :class:`ExportedProgram`: a ``torch.export`` program written by ``torch.export.save`` (``.pt2``).

Each splits its artifact at deploy time into weights (for the store) and small assets, and at load
time builds the network around the store's tensors without reading a file. They import torch, so
only worker processes import this package.
"""

from ember.models.embedding import SentenceEmbedding
from ember.models.exported import ExportedProgram
from ember.models.torchscript import TorchScript

__all__ = ["ExportedProgram", "SentenceEmbedding", "TorchScript"]
