"""The evaluations package's error type, in one place: every input problem (files, shapes, flags, devices, the
Inception graph) is an ``EvaluatorInputError``, which the commands report as one line without a traceback."""


class EvaluatorInputError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""
