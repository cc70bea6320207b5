"""User-facing errors and the exit codes of the `jaxlm` command.

The CLI prints a JaxlmError without a traceback and exits with EXIT_USER_ERROR.
"""

EXIT_OK = 0
EXIT_RUNS_FAILED = 1  # jaxlm sweep: the sweep went through, but a run failed or was not run (see its log)
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # stopped after too many consecutive non-finite steps (and rollbacks, if enabled)
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGINT after writing a checkpoint (EX_TEMPFAIL: run again)
EXIT_CLOSED_STDOUT = 141  # the reader of stdout went away (`| head`): what a shell reports for SIGPIPE


class JaxlmError(Exception):
    """Base class for mistakes a user can fix; the message says what to change."""


class ConfigError(JaxlmError):
    """A bad configuration value, key or combination."""


class DataError(JaxlmError):
    """A data source, tokenizer or split that cannot be used."""


class CheckpointError(JaxlmError):
    """A checkpoint that cannot be written, found or restored."""


class DivergedError(Exception):
    """Training stopped: more consecutive non-finite steps than train.max_bad_steps allows."""
