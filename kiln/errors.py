"""One exception type per kind of user mistake.

Each message names the file or field at fault, the allowed values, and the fix, because the
CLI prints it as a single line without a traceback.
"""


class KilnError(Exception):
    """Base of every error kiln raises for bad input; the CLI prints these as one line."""


class ConfigError(KilnError, ValueError):
    """A config field is missing, of the wrong type, or out of its allowed range."""


class CheckpointError(KilnError):
    """A source, checkpoint or engine file is missing, truncated, corrupt or does not match its config."""


class UnsupportedArchitectureError(KilnError):
    """The model's architecture has no kiln implementation."""


class EngineVersionError(KilnError):
    """An engine or checkpoint was written by an incompatible kiln format version."""


class OutputExistsError(KilnError):
    """An output directory already exists and overwriting was not asked for."""
