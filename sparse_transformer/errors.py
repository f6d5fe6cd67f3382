"""The one exception type for bad user input (config, data files, checkpoints, command line).

The command line catches :class:`UserError` and prints its message as one line to stderr with exit
status 2 and no traceback. The message names the problem and the fix.
"""


class UserError(ValueError):
    """Bad input from the user: one line that names the problem and how to fix it."""
