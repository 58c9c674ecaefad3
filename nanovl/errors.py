"""The one exception nanovl raises for bad input, so the CLI can print it as one line."""


class NanovlError(ValueError):
    """Bad input (a missing file, an unsupported checkpoint, a prompt that does not fit): the message says what and how to fix it."""
