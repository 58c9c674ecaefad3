class NanovlError(ValueError):
    """Bad input (a missing file, an unsupported checkpoint, a prompt that does not fit): the message says what and how to fix it."""
