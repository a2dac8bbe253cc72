"""User-facing errors: one line that says what went wrong and what to do."""


class EdgewiseError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line, without a traceback."""
