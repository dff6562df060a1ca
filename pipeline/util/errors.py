"""User-facing errors.

Every failure a user can cause (a bad name, a missing file, a store that does not match)
raises a subclass of `EnspipeError` with one clear sentence. The CLI prints that sentence
on one line and exits non-zero; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class EnspipeError(Exception):
    """A failure caused by the user's input or environment, reported in one line."""


class DataError(EnspipeError):
    """A dataset cannot be found, read or matched."""


class ModelError(EnspipeError):
    """A model name, checkpoint or weight file is wrong."""


class AttackError(EnspipeError):
    """An attack name or parameter is wrong."""


class StoreError(EnspipeError):
    """A perturbation store is missing, incomplete, corrupt or does not match."""


class ConfigError(EnspipeError):
    """A configuration value or job spec is wrong."""
