"""Bad user input: one error type, and the parser rejections turned into one line, so the CLI prints one line and
exits with code 2 (`gradual.cli.main`)."""

from __future__ import annotations

import re


class UsageError(ValueError):
    """Raised for invalid user input (a bad value, a missing file); the message names it and what is allowed."""


def usage_error_in(exc: BaseException | None) -> BaseException | None:
    """The UsageError behind a wrapped exception (jsonargparse wraps errors raised while instantiating classes), if
    any."""
    while exc is not None and not isinstance(exc, UsageError):
        exc = exc.__cause__ or exc.__context__
    return exc


def parser_error_line(message: str) -> str:
    """jsonargparse's multi-line report of a rejected value, as one line: the dotted key, the value, what is allowed.

    E.g. 'Parser key "model.schedule": ... Parser key "mode": Expected a typing.Literal['gradual', 'one_shot'].
    Got value: sideways' becomes "model.schedule.mode='sideways' is invalid; allowed: 'gradual', 'one_shot'".
    Only the innermost key's alternatives are listed (an outer `X | None` would add a misleading "null").
    """
    keys = list(re.finditer(r'^( *).*?Parser key "([^"]+)":', message, flags=re.MULTILINE))
    if not keys:
        return " ".join(message.split())
    parts: list[str] = []
    for m in keys:  # a nested report may repeat the whole dotted key ("data.sgr.decoding" twice)
        if not (parts and m.group(2) == ".".join(parts)):
            parts.append(m.group(2))
    key = ".".join(parts)
    last = keys[-1]
    inner = [line for line in message[last.end():].splitlines()[1:]
             if len(line) - len(line.lstrip()) > len(last.group(1))]
    unrecognized = re.search(r"unrecognized arguments: (.*)", message)
    if unrecognized:
        return f"{key}: unrecognized argument(s) {unrecognized.group(1).strip()}"
    not_accepted = re.search(r"Option '([^']+)' is not accepted", message)
    if not_accepted:  # a misspelt field of a dataclass in a list (e.g. data.sources)
        return f"{key}: unknown field {not_accepted.group(1)!r}"
    values = [v.strip() for v in re.findall(r"(?:Got|Given) value: (.*)", "\n".join(inner))
              if not v.strip().startswith("NestedArg(")]
    expected: list[str] = []
    for e in re.findall(r"Expected a (.*?)(?:\. Got value:.*)?$", "\n".join(inner), flags=re.MULTILINE):
        e = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", e.strip())
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", e)
        e = literal.group(1) if literal else {"NoneType": "null"}.get(e, e)
        if e not in expected:
            expected.append(e)
    if not expected:
        return f"{key}: {' '.join(message[last.end():].split())}"
    value = f"={values[0]!r}" if values else ""
    return f"{key}{value} is invalid; allowed: {' or '.join(expected)}"


_META = ("help", "config", "print_config")
"""Options of every command that are not keys of its config."""


def option_error_line(message: str, options: dict[str, str]) -> str:
    """A rejection by a parser of flat options (`gradual score`, `eval`, ...) as one line in argparse's words, naming
    the option as typed (`options`: config key → option string), e.g. "argument --n: invalid int value: 'x'"."""
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        names = [options.get(n.strip(), n.strip()) for n in required.group(1).split(",")]
        return f"the following arguments are required: {', '.join(names)}"
    unknown = re.fullmatch(r"Option '([^']+)' is not accepted", message.strip())
    if unknown:  # a key of a --config file that names no option
        return f"unknown option {unknown.group(1)!r}; allowed: {', '.join(k for k in options if k not in _META)}"
    key = re.match(r'Parser key "([^"]+)":', message)
    if not key or key.group(1) not in options:
        return parser_error_line(message)
    name, option = key.group(1), options[key.group(1)]
    line = parser_error_line(message)
    simple = re.fullmatch(rf"{re.escape(name)}=(.+) is invalid; allowed: (int|float)", line)
    if simple:
        return f"argument {option}: invalid {simple.group(2)} value: {simple.group(1)}"
    return f"argument {option}: {line[len(name):].lstrip('=:').strip()}"
