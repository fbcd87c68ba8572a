"""Persistent deployments: what is deployed, under which version, with which settings."""

from ember.registry.sqlite import DeploymentRecord, Registry

__all__ = ["DeploymentRecord", "Registry"]
