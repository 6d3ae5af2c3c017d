"""Errors of the command line: what a user can fix from its one-line message.

Its own module so that `main` (which prints them) and `commands` (which
raises them) import it without importing each other. `CommandError` is the
run library's `keras_dml.runs.errors.RunError`: what the library raises, the
command line prints as one line.
"""

from keras_dml.runs.errors import RunError

CommandError = RunError

__all__ = ["CommandError"]
