"""Ember's HTTP gateway: the Open Inference Protocol v2 front door."""
