"""The error a method raises for a user-caused configuration problem; importable without torch (the CLI catches it)."""

from __future__ import annotations


class MethodConfigError(ValueError):
    """A user-caused configuration error (bad hyperparameter, missing artifact)."""
