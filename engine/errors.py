"""The one exception type for mistakes a user can fix (bad input, bad arguments, missing files).

The CLI prints a ``UserError`` as one line and exits with status 2 instead of a traceback.
It subclasses ``ValueError`` so library callers can catch it the usual way.
"""


class UserError(ValueError):
    """A problem with the user's input or configuration, with a message that says how to fix it."""
