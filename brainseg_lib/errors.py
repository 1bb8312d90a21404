"""The one error type a user is meant to see.

The CLI prints a ``BrainsegError`` as one line and exits 2; anything else that escapes is a bug
and keeps its traceback (``BRAINSEG_DEBUG=1`` shows the traceback of user errors too).
"""


class BrainsegError(Exception):
    """Bad input or setup, said in one line that names the file (and key) at fault."""
