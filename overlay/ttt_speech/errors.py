"""The errors a user can cause and fix: bad configs, data, checkpoints. Each message names the file, line, key or
tensor and what was expected, so `ttt-speech` prints it as one line and exits 2 (`--debug` shows the traceback).
Any other exception is a bug and keeps its traceback.

Each class also derives from the built-in exception that code caught before it existed (`ValueError`,
`RuntimeError`, `FileNotFoundError`), so `except ValueError` keeps working.
"""

from __future__ import annotations


class TTTSpeechError(Exception):
    """Base of the known, user-facing errors."""


class ConfigError(TTTSpeechError, ValueError):
    """A config that does not fit its schema or makes no sense; the message names the file and dotted key."""


class DataError(TTTSpeechError, ValueError):
    """Training data that cannot be used as it is; the message names the file (and line)."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A manifest, alignment, tokenizer or codes file that is not there."""


class CheckpointError(TTTSpeechError, RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and file."""


class CheckpointMismatch(CheckpointError, ValueError):
    """A checkpoint whose keys or shapes do not fit the model built for it; the message names file and keys."""


class TrainingDiverged(TTTSpeechError, RuntimeError):
    """A run stopped because its loss or gradients stayed non-finite; its last good checkpoint was restored."""
