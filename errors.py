"""The one exception type that reaches users.

Library code raises `DyninferError` for anything the user can fix (bad spec, missing
file, data too short, mismatched artifact). The CLI prints its message as one line and
exits with code 2; anything else is a bug and keeps its traceback.
"""


class DyninferError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
