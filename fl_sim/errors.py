"""The one exception type that reaches the user as a message instead of a traceback."""


class FlSimError(Exception):
    """Bad input or a failed run: the message names the culprit and says what to do.

    The CLI prints it as one paragraph and exits non-zero; nothing else is caught there.
    """


class ClientFailure(RuntimeError):
    """A client's error, its message prefixed with the client's partition id: the server
    sees only the text."""
