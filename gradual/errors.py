"""Bad user input: one error type, and the parser rejections turned into one line, so the CLI prints one line and
exits with code 2 (`gradual.cli.main`).

Our own checks raise `UsageError` with its line; a value jsonargparse rejects while parsing reaches us only as
`argparse.ArgumentError` text (its `__cause__` is a TypeError or KeyError of text too). That text is read in one
place, `read_rejection`; the lines are built from what it read. `tests/test_errors.py` pins every wording it relies
on, so a jsonargparse release that rewords one fails there instead of printing a garbled line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class UsageError(ValueError):
    """Raised for invalid user input (a bad value, a missing file); the message names it and what is allowed."""


def usage_error_in(exc: BaseException | None) -> BaseException | None:
    """The UsageError behind a wrapped exception (jsonargparse wraps errors raised while instantiating classes), if
    any."""
    while exc is not None and not isinstance(exc, UsageError):
        exc = exc.__cause__ or exc.__context__
    return exc


@dataclass(frozen=True)
class Rejection:
    """What a jsonargparse rejection says (`read_rejection`).

    Attributes:
        text: the whole message on one line.
        key: the dotted key rejected (`model.schedule.mode`; a nested report's keys joined), None when it names none.
        detail: what follows the innermost key, on one line.
        value: the value given, None when the message shows none.
        expected: the innermost alternatives allowed (`'gradual', 'one_shot'` for a Literal, `int`, `null`, ...).
        unrecognized: the command-line arguments no option took.
        not_accepted: a key that a config section (or a dataclass in a list) does not have.
        required: the keys of required options that were not given.
    """

    text: str
    key: str | None = None
    detail: str = ""
    value: str | None = None
    expected: tuple[str, ...] = ()
    unrecognized: str | None = None
    not_accepted: str | None = None
    required: tuple[str, ...] = ()


def read_rejection(message: str) -> Rejection:
    """Read jsonargparse's (multi-line) report of a rejected value: the one function that parses its wording.

    E.g. 'Parser key "model.schedule": ... Parser key "mode": Expected a typing.Literal['gradual', 'one_shot'].
    Got value: sideways' is key `model.schedule.mode`, value `sideways`, expected `'gradual', 'one_shot'`. Only the
    innermost key's alternatives are kept (an outer `X | None` would add a misleading "null").
    """
    text = " ".join(message.split())
    required = re.match(r"the following arguments are required: (.*)", message)
    unrecognized = re.search(r"unrecognized arguments: (.*)", message)
    not_accepted = re.search(r"Option '([^']+)' is not accepted", message)
    found = {"text": text, "required": tuple(n.strip() for n in required.group(1).split(",")) if required else (),
             "unrecognized": unrecognized.group(1).strip() if unrecognized else None,
             "not_accepted": not_accepted.group(1) if not_accepted else None}
    keys = list(re.finditer(r'^( *).*?Parser key "([^"]+)":', message, flags=re.MULTILINE))
    if not keys:
        return Rejection(**found)
    key = keys[0].group(2)
    for m in keys[1:]:  # a nested report names a field of the outer key, or the whole dotted key again
        name = m.group(2)
        key = name if name == key or name.startswith(f"{key}.") else f"{key}.{name}"
    last = keys[-1]
    detail = " ".join(message[last.end():].split())
    if unrecognized or not_accepted:  # a key or an argument is rejected, not a value
        return Rejection(**found, key=key, detail=detail)
    inner = "\n".join(line for line in message[last.end():].splitlines()[1:]
                      if len(line) - len(line.lstrip()) > len(last.group(1)))
    given = re.findall(r"(?:Got|Given) value: (.*?)(?:\. Got value:.*)?$", inner, flags=re.MULTILINE)
    values = [v.strip() for v in given if not v.strip().startswith("NestedArg(")]
    expected: list[str] = []
    for e in re.findall(r"Expected a (.*?)(?:\. Got value:.*)?$", inner, flags=re.MULTILINE):
        e = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", e.strip())
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", e)
        e = literal.group(1) if literal else {"NoneType": "null"}.get(e, e)
        if e not in expected:
            expected.append(e)
    return Rejection(**found, key=key, detail=detail, value=values[0] if values else None, expected=tuple(expected))


def _problem(r: Rejection) -> str:
    """What is wrong at the rejected key, when it is not a value against allowed types (no `expected`)."""
    if r.unrecognized is not None:
        return f"unrecognized argument(s) {r.unrecognized}"
    if r.not_accepted is not None:  # a misspelt field of a dataclass in a list (e.g. data.sources)
        return f"unknown field {r.not_accepted!r}"
    return r.detail


def _allowed(r: Rejection) -> str:
    return f"is invalid; allowed: {' or '.join(r.expected)}"


def parser_error_line(message: str) -> str:
    """jsonargparse's report of a rejected `gradual fit` value as one line: the dotted key, the value, what is
    allowed, e.g. "model.schedule.mode='sideways' is invalid; allowed: 'gradual', 'one_shot'"."""
    return _key_line(read_rejection(message))


def _key_line(r: Rejection) -> str:
    if r.key is None:
        return r.text
    if not r.expected:
        return f"{r.key}: {_problem(r)}"
    return f"{r.key}{'' if r.value is None else f'={r.value!r}'} {_allowed(r)}"


def fit_error_line(message: str) -> str:
    """A rejection of a `gradual compare` arm's `gradual fit` config as one line. An unknown key is named as the
    dotted `gradual fit` option it would be (arms' overrides are written so), not as a field of its section (which
    jsonargparse reports as a failed `X | None` union)."""
    r = read_rejection(message)
    if r.not_accepted is not None and r.key:
        return f"{r.key}.{r.not_accepted} is not a `gradual fit` option"
    return _key_line(r)


_META = ("help", "config", "print_config")
"""Options of every command that are not keys of its config."""


def option_error_line(message: str, options: dict[str, str]) -> str:
    """A rejection by a parser of flat options (`gradual score`, `eval`, ...) as one line in argparse's words, naming
    the option as typed (`options`: config key → option string), e.g. "argument --n: invalid int value: 'x'"."""
    r = read_rejection(message)
    if r.required:
        return f"the following arguments are required: {', '.join(options.get(n, n) for n in r.required)}"
    if r.not_accepted is not None and r.key is None:  # a key of a --config file that names no option
        return f"unknown option {r.not_accepted!r}; allowed: {', '.join(k for k in options if k not in _META)}"
    if r.key not in options:
        return _key_line(r)
    option = options[r.key]
    if not r.expected:
        return f"argument {option}: {_problem(r)}"
    if r.value is not None and r.expected in (("int",), ("float",)):
        return f"argument {option}: invalid {r.expected[0]} value: {r.value!r}"
    return f"argument {option}: {'' if r.value is None else f'{r.value!r} '}{_allowed(r)}"
