"""The error of a run a user can fix from its one-line message.

Its own module so that the run library (`keras_dml.runs`) raises it and the
command line (`keras_dml.cli`, which prints it as one line as `CommandError`)
catches it, without either importing the other's machinery.
"""


class RunError(Exception):
    """A run cannot go on, for a reason its one-line message states with the fix.

    Raised for a missing, truncated or stale file of a run directory, an
    artefact from another run, a backbone that cannot be built. The command
    line prints it without a traceback.
    """
