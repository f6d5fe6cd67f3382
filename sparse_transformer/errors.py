"""The one exception type for bad user input (config, data files, checkpoints, command line).

The command line catches :class:`UserError` and prints its message as one line to stderr with exit
status 2 and no traceback. The message names the problem and the fix.
"""

import json

# What json.loads raises on text that is not JSON: bad syntax, bytes that are not UTF-8, and nesting
# deeper than the parser's recursion limit (a crafted file).
BAD_JSON = (json.JSONDecodeError, UnicodeDecodeError, RecursionError)


class UserError(ValueError):
    """Bad input from the user: one line that names the problem and how to fix it."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of ``str(e)`` cut to ``limit`` characters, or the exception's type name when
    it has no text: the cause quoted inside a one-line :class:`UserError` message."""
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else type(e).__name__
