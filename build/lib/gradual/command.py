"""The parsers of `gradual score`, `eval`, `prune`, `tasks` and `compare`: jsonargparse (the parser LightningCLI
gives `gradual fit`) built from a typed function whose docstring is the help.

Every parameter becomes an option `--name-with-dashes` (its YAML key keeps the underscores) with the docstring's
sentence as help; a parameter without a default is required; a `bool` defaulting to False is a flag. Every command
gets `--config` (a YAML file of these keys) and `--print_config` (prints one). A rejection is a one-line UsageError
in argparse's words, raised before the command runs.
"""

from __future__ import annotations

import argparse
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import docstring_parser
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from gradual.errors import UsageError, option_error_line

CONFIG_HELP = ("A YAML file of these options, keys as --print_config writes them (with underscores); options given "
               "after it override it.")


class Verbatim:
    """An option type that keeps a value exactly as YAML reads it (a command-line value is read as YAML).

    Use as `Annotated[<hint>, Verbatim("<name in the help>")]` for a section handed on to another parser: a plain
    `dict`/`Any` hint would let jsonargparse expand `class_path` specs inside it (adding every default), so the
    caller would not get what the file says.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, value: Any) -> Any:
        return yaml.safe_load(value) if isinstance(value, str) else value

    def __repr__(self) -> str:
        return self.name


def function_parser(fn: Callable[..., Any], prog: str, fill: Mapping[str, str] | None = None) -> ArgumentParser:
    """A parser of `fn`'s parameters; `fill` completes `{name}` fields in the help (lists known only at run time).

    Raises:
        TypeError: a parameter the docstring does not describe (every option must say what it is).
    """
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    helps = {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}
    hints = typing.get_type_hints(fn, include_extras=True)
    description = " ".join(part for part in (doc.short_description, doc.long_description) if part)
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
    for name, param in inspect.signature(fn).parameters.items():
        if not helps.get(name):
            raise TypeError(f"{fn.__qualname__}: parameter {name!r} has no description in the docstring")
        text = helps[name]
        for field, value in (fill or {}).items():
            text = text.replace("{" + field + "}", value)
        kwargs: dict[str, Any] = {"dest": name, "help": text}
        if param.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = param.default
        hint = hints[name]
        verbatim = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Verbatim)]
        if hint is bool and param.default is False:
            kwargs["action"] = ActionYesNo(no_prefix=None)
        else:
            kwargs["type"] = verbatim[0] if verbatim else hint
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)
    return parser


def parse(parser: ArgumentParser, argv: Sequence[str], require_config: bool = False) -> Namespace | None:
    """Parse `argv`; None when `--help` or `--print_config` printed and nothing is left to do.

    Raises:
        UsageError: a rejected option, in one line naming the command and the option as typed.
    """
    options = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    try:
        namespace = parser.parse_args(list(argv))
    except argparse.ArgumentError as e:
        raise UsageError(f"{parser.prog}: {option_error_line(str(e), options)}") from None
    except SystemExit as e:  # --help and --print_config exit 0 after printing
        if e.code:
            raise
        return None
    if require_config and not namespace.get("config"):
        raise UsageError(f"{parser.prog}: the following arguments are required: --config")
    return namespace


def arguments(fn: Callable[..., Any], namespace: Namespace) -> dict[str, Any]:
    """`fn`'s keyword arguments from a parsed namespace (plain dicts, not jsonargparse Namespaces)."""
    values = namespace.as_dict()
    return {name: values[name] for name in inspect.signature(fn).parameters}


def check_ints(fn: Callable[..., Any], values: Mapping[str, Any], prog: str) -> None:
    """Refuse a YAML boolean given for an integer option: jsonargparse lets `true` through an `int | None` union
    (a bool is an int to Python), where `--num true` would mean one layer.

    Raises:
        UsageError: in argparse's words, naming the option as typed.
    """
    hints = typing.get_type_hints(fn)
    for name, value in values.items():
        allowed = typing.get_args(hints[name]) or (hints[name],)
        if isinstance(value, bool) and int in allowed and bool not in allowed:
            raise UsageError(f"{prog}: argument --{name.replace('_', '-')}: invalid int value: {value!r}")


def run(fn: Callable[..., int], argv: Sequence[str], prog: str, fill: Mapping[str, str] | None = None) -> int:
    """Parse `argv` with `fn`'s parser and call `fn` (exit code 0 after `--help` or `--print_config`)."""
    namespace = parse(function_parser(fn, prog, fill), argv)
    if namespace is None:
        return 0
    values = arguments(fn, namespace)
    check_ints(fn, values, prog)
    return fn(**values)


SectionHint = Annotated[dict[str, Any] | None, Verbatim("mapping")]
"""A YAML mapping passed on as it is (e.g. a `gradual fit` config section)."""
