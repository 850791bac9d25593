"""The one exception type for problems a user can fix (bad paths, bad files, bad options).

The CLI prints such an error as a single line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class AmnsegError(Exception):
    """A user-facing error whose message names the file or option and the problem."""
