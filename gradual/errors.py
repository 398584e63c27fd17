"""Bad user input: one error type and a parser that raises it, so the CLI prints one line and exits with code 2."""

import argparse
from typing import NoReturn


class UsageError(ValueError):
    """Raised for invalid user input (a bad value, a missing file); the message names it and what is allowed."""


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose rejections (missing option, bad type, unknown flag) are a UsageError, so the CLI
    reports them like every other bad input: one line naming the value and what is allowed, exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")
