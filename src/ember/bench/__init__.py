"""Measurement harnesses: code that times Ember's parts, kept out of the runtime packages.

``load``: the load benchmark (Ember's loader beside torch.load, safetensors and the raw link),
behind ``benchmarks/load.py`` and ``ember store bench``; ``compress``: the compressed tier's part of
``benchmarks/load.py``. A server never imports these; ``store/bandwidths.py`` reads what they
measured from ``HOME/bandwidths.json``.
"""
