"""Errors of the command line: what a user can fix from its one-line message.

Its own module so that `main` (which prints them) and `commands` / `rundir`
(which raise them) import it without importing each other.
"""


class CommandError(Exception):
    """An error a user can fix from its one-line message (no traceback is shown)."""
