"""The errors embedpipe raises on purpose, and the exit code each maps to.

`UsageError` and `InputError` are the user's to fix (exit 2, one line, no
traceback); `PipelineError` is a runtime failure with its cause named (exit 1).
"""


class EmbedpipeError(Exception):
    exit_code = 1


class UsageError(EmbedpipeError):
    """A flag or config value is wrong."""

    exit_code = 2


class InputError(EmbedpipeError):
    """The input data, model or output location cannot be used."""

    exit_code = 2


class PipelineError(EmbedpipeError):
    """The run started but failed; the message names the cause."""

    exit_code = 1
