"""Every jsonargparse wording the one-line errors rely on, produced by the real `gradual fit` and `gradual score` /
`eval` parsers and read by `gradual.errors.read_rejection`: a jsonargparse release that rewords one fails here, not
by printing a garbled line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_fit import SMOKE

from gradual import cli, command
from gradual.compare.run import FitParser
from gradual.errors import Rejection, fit_error_line, option_error_line, parser_error_line, read_rejection
from gradual.lightning_cli import held_logs

FIELDS = ("key", "value", "expected", "unrecognized", "not_accepted", "required")
LITERAL = ("'gradual', 'one_shot'",)


def rejection(parse: Callable[[], Any]) -> tuple[str, Rejection]:
    with pytest.raises(argparse.ArgumentError) as caught:
        parse()
    return str(caught.value), read_rejection(str(caught.value))


def read(r: Rejection) -> dict[str, Any]:
    return {name: getattr(r, name) for name in FIELDS}


def nothing(**found: Any) -> dict[str, Any]:
    return {"key": None, "value": None, "expected": (), "unrecognized": None, "not_accepted": None, "required": (),
            **found}


@pytest.fixture(scope="module")
def fit_parser() -> argparse.ArgumentParser:
    with held_logs(replay=False):
        return FitParser(yaml.safe_load(SMOKE.read_text())).parser


FIT = {
    "literal": (["--model.schedule.mode", "sideways"],
                nothing(key="model.schedule.mode", value="sideways", expected=LITERAL),
                "model.schedule.mode='sideways' is invalid; allowed: 'gradual', 'one_shot'"),
    "literal_in_a_mapping": (["--model.schedule", '{"mode": "sideways"}'],
                             nothing(key="model.schedule.mode", value="sideways", expected=LITERAL),
                             "model.schedule.mode='sideways' is invalid; allowed: 'gradual', 'one_shot'"),
    "optional_int": (["--model.schedule.max_layers", "x"],
                     nothing(key="model.schedule.max_layers", value="x", expected=("int", "null")),
                     "model.schedule.max_layers='x' is invalid; allowed: int or null"),
    "int": (["--data.batch_size", "2.5"], nothing(key="data.batch_size", value="2.5", expected=("int",)),
            "data.batch_size='2.5' is invalid; allowed: int"),
    "field_of_a_dataclass_in_a_list": (["--data.sources", '[{"kind": 3}]'],
                                       nothing(key="data.sources.kind", value="3", expected=("str",)),
                                       "data.sources.kind='3' is invalid; allowed: str"),
    "unknown_field_in_a_list": (["--data.sources", '[{"kind": "sgr", "wieght": 1}]'],
                                nothing(key="data.sources", not_accepted="wieght"),
                                "data.sources: unknown field 'wieght'"),
    "class_init_arg": (["--model.lr_scheduler", '{"class_path": "torch.optim.lr_scheduler.StepLR", '
                                                '"init_args": {"step_size": "x"}}'],
                       nothing(key="model.lr_scheduler.step_size", value="x", expected=("int",)),
                       "model.lr_scheduler.step_size='x' is invalid; allowed: int"),
    "unrecognized": (["--model.nope", "1"], nothing(unrecognized="--model.nope 1"),
                     "unrecognized arguments: --model.nope 1"),
}


@pytest.mark.parametrize("case", sorted(FIT))
def test_the_fit_parsers_wording_is_read(case: str, fit_parser: argparse.ArgumentParser) -> None:
    argv, found, line = FIT[case]
    message, r = rejection(lambda: fit_parser.parse_args(argv))
    assert read(r) == found, message
    assert parser_error_line(message) == line


def test_compare_names_an_unknown_field_as_the_fit_option(fit_parser: argparse.ArgumentParser) -> None:
    message, _ = rejection(lambda: fit_parser.parse_args(["--data.sources", '[{"kind": "sgr", "wieght": 1}]']))
    assert fit_error_line(message) == "data.sources.wieght is not a `gradual fit` option"


def test_an_unknown_key_of_a_section_is_reported_whole(fit_parser: argparse.ArgumentParser) -> None:
    """No key is named in jsonargparse's words here: the line is its message as it is."""
    message, r = rejection(lambda: fit_parser.parse_args(["--data.sgr.decoding", '{"nope": 1}']))
    assert read(r) == nothing() and "'sgr.decoding.nope'" in parser_error_line(message)


def _flat(fn: Callable[..., int], prog: str) -> argparse.ArgumentParser:
    return command.function_parser(fn, prog, {"metrics": "m", "tasks": "t"})


def test_the_flat_parsers_wording_is_read(tmp_path: Path) -> None:
    score, evaluate = _flat(cli.score, "gradual score"), _flat(cli.evaluate, "gradual eval")
    (tmp_path / "bad.yaml").write_text("model: m\nbogus: 1\n")
    cases = [
        (score, [], nothing(required=("model",)), "the following arguments are required: --model"),
        (score, ["--model", "m", "--num-calibration", "x"],
         nothing(key="num_calibration", value="x", expected=("int",)),
         "argument --num-calibration: invalid int value: 'x'"),
        (score, ["--config", str(tmp_path / "bad.yaml")], nothing(not_accepted="bogus"),
         "unknown option 'bogus'; allowed: model, metric, span"),
        (score, ["--model", "m", "--bogus"], nothing(unrecognized="--bogus"), "unrecognized arguments: --bogus"),
        (score, ["--config", "/nonexistent.yaml"], nothing(key="config"),
         "argument --config: File does not exist: '/nonexistent.yaml'"),
        (evaluate, ["--model", "m", "--max-new-tokens", "x"],
         nothing(key="max_new_tokens", value="x", expected=("int", "null")),
         "argument --max-new-tokens: 'x' is invalid; allowed: int or null"),
    ]
    for parser, argv, found, line in cases:
        message, r = rejection(lambda parser=parser, argv=argv: parser.parse_args(argv))
        assert read(r) == found, message
        options = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
        assert option_error_line(message, options).startswith(line), (message, line)
