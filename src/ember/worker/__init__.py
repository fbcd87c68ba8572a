"""The worker process: a runtime started ahead, hosting models and running their batches.

User code runs only here. ``python -m ember.worker`` is started by a cluster backend.
"""
