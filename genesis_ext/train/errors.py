"""Errors of a training run that the command line tells apart without importing torch."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before applying that step."""
