"""Errors that the CLI turns into one line on stderr and an exit code, never a traceback."""


class EvalpipeError(Exception):
    """Base of evalpipe's own errors."""

    exit_code = 1


class UserError(EvalpipeError):
    """Bad input: a name, a file, an option or a run directory that cannot be used. Exit code 2."""

    exit_code = 2


class RunFailed(EvalpipeError):
    """The run started but could not finish (engine or sandbox broke). Exit code 1; the run is resumable."""

    exit_code = 1
