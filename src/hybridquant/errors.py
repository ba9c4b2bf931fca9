"""User-facing errors.

Anything the user can fix (a wrong path, an unknown model, a mismatched
checkpoint) is raised as :class:`HybridQuantError`; the CLI prints its message
on one line and exits with code 2.
"""


class HybridQuantError(Exception):
    """A problem with the user's input, reported without a traceback."""
