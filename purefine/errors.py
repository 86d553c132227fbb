"""purefine's error types.

Every error a user can cause (a config key, a dataset row, a checkpoint file, a tokenizer, a flag)
is raised as a `PurefineError` subclass whose message names the place (file, key, row or flag),
what was expected and what was found. Scripts print it on one line and exit with status 2.
"""

from __future__ import annotations


class PurefineError(Exception):
    """Base class of every error purefine raises on bad input."""


class ConfigError(PurefineError, ValueError):
    """A config key, preset name or flag is missing, unknown or out of range."""


class CheckpointError(PurefineError, ValueError):
    """A checkpoint directory or file is missing, truncated or disagrees with its config."""


class DataError(PurefineError, ValueError):
    """A dataset file or row is missing, malformed or of the wrong type."""


class TokenizerError(PurefineError, ValueError):
    """A tokenizer file is missing or malformed, or disagrees with the model."""


class WriteError(PurefineError, OSError):
    """A file or directory could not be written (disk full, no permission); what it replaces is untouched."""


class TreeError(PurefineError, ValueError):
    """A parameter tree does not have the paths or leaves an operation needs."""
