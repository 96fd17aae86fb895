"""The project's own error types: what the command line reports as one line.

Every error that bad input can cause (a protocol value, a data folder, a checkpoint,
a results file) derives from `DeepError`. `python -m deep` prints those as
`error: <message>` and exits with status 2; any other exception is a bug and keeps
its traceback. They stay `ValueError`s so that callers who catch ValueError still do.
"""

from __future__ import annotations


class DeepError(ValueError):
    """Base class: bad input, with a message that names what was expected."""


class ConfigError(DeepError):
    """A protocol, a command-line value or a registry name is wrong."""


class ResultsError(DeepError):
    """A results file cannot be read or resumed (malformed row, other settings)."""
