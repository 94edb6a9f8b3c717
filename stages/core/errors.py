"""The errors a user can act on, torch-free so that the command line can name them without loading a model stack.

Each is printed by the CLI as one ``error: ...`` line (exit 2), wherever it was raised: in this process, a Ray task,
an actor or a training worker (``pipeline/rounds.user_error`` unwraps Ray's wrappers). ``StorageError`` (a run's
storage cannot be written or opened) lives in ``stages/storage/files.py``, the bottom floor, which imports nothing.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, value out of range, a file or override that is not YAML."""


class DataError(ValueError):
    """Bad input data: a pattern matching nothing, an unreadable shard, a label out of range, an empty shard."""


class BadSample(ValueError):
    """One sample that cannot be used (no image, undecodable image); counted and skipped by callers."""


class ExportError(ValueError):
    """An export that cannot be made or does not reproduce PyTorch; the CLI prints it as one line."""
