"""The one exception type for bad user input.

Every stage raises :class:`MskdError` (a ``ValueError``) when the user's model,
data, flags or workdir are wrong; the message names the layer, flag, file or
value and says what to do. The CLI prints it without a traceback and exits 2.
"""


class MskdError(ValueError):
    """Bad input: the message names what is wrong and how to fix it."""
