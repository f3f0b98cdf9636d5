"""The one exception type for user errors.

Library code raises :class:`LatePhaseError` (a ``ValueError``) with a one-line message that says what is wrong and
what to do; the CLI turns it into that line on stderr and exit code 2, without a traceback.
"""


class LatePhaseError(ValueError):
    """A user error: bad input, a bad option or a model in the wrong state."""
