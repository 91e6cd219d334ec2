"""User-facing errors: one clear line naming the file or config key."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user (file, folder, config value, mask file).

    The CLI prints ``str(err)`` as a single line and exits non-zero; the message
    must name the offending file path or config key.
    """


class ConfigError(UserInputError):
    """An invalid config value. Message starts with the dotted key, e.g. ``stage1.patch_size: ...``."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config {key}: {message}")


class TrainingDivergedError(RuntimeError):
    """NaN/Inf loss during training; names the stage and step."""
