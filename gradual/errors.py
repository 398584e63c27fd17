"""One error type for bad user input, so the CLI can print one line and exit with code 2."""


class UsageError(ValueError):
    """Raised for invalid user input (a bad value, a missing file); the message names it and what is allowed."""
