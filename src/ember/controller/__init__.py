"""The control loop that applies the policies: keep-alive, placement, promotion on demand."""

from ember.controller.controller import ColdStart, Controller

__all__ = ["ColdStart", "Controller"]
