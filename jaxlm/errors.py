"""User-facing errors. The CLI prints these without a traceback and exits with code 2."""


class JaxlmError(Exception):
    """Base class for mistakes a user can fix; the message says what to change."""


class ConfigError(JaxlmError):
    """A bad configuration value, key or combination."""


class DataError(JaxlmError):
    """A data source, tokenizer or split that cannot be used."""


class CheckpointError(JaxlmError):
    """A checkpoint that cannot be written, found or restored."""
