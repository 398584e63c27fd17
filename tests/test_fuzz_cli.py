"""Bad input, fuzzed: random invalid and edge-case values (numbers out of range, wrong types, empty lists, unknown
names, missing paths, mixed-up keys) go through the real parser of every subcommand, as command-line options, inside
a `--config` YAML, or both. Each must end in one line on stderr (`gradual: error: ...`), exit code 2, no traceback,
and nothing written: the example's folder (its run directory, output folder, SGR cache) is byte-for-byte what it was.

The model loaders raise, so a value that slips past the checks shows up as "model loaded", not as a slow run.
Hypothesis runs derandomized (the same examples every time, no example database).
"""

from __future__ import annotations

import hashlib
import math
import os
import string
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradual.models
from gradual.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
DEPTH = 6  # tiny:llama:6 (smoke.yaml's model)
MISSING = "<missing>"  # a Bad whose value is MISSING removes the key (a required option left out)

# ---------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------

KNOWN = {"successor", "copy", "category", "uppercase", "products", "brackets", "humaneval", "generative",
         "classification", "fewshot", "chat", "small", "large", "float32", "bfloat16", "float16", "auto", "nf4",
         "lstsq", "gradual", "one_shot", "sft", "kd", "lora", "full", "near_cut", "sgr", "tasks", "text", "sdft",
         "file", "hf", "dataset", "sgr_filtered", "transformers", "vllm", "original", "previous", "all",
         "last_good", "block_influence", "angular_distance", "reverse", "calibration_loss", "taylor", "random",
         "task_ablation", "cpu", "gpu", "cuda", "mps", "tpu", "ddp", "fsdp", "deepspeed"}


def _is_yaml_str(s: str) -> bool:
    """Whether YAML (hence a command-line value) reads `s` back as this string, not as a number, bool or null."""
    try:
        return yaml.safe_load(s) == s
    except yaml.YAMLError:
        return False


def names() -> st.SearchStrategy[str]:
    """Unknown names: random words, and near misses of real ones (case, typos, spaces)."""
    words = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)
    near = st.sampled_from(["Generative", "FEWSHOT", "successr", "block-influence", "one-shot", "fp32", "bf16",
                            "Small", "kd+", "loRA", "nf8", "lstsq2", "original_", "tiny", "last-good", "None"])
    return st.one_of(words, near).filter(lambda s: s not in KNOWN and _is_yaml_str(s))


def not_ints() -> st.SearchStrategy[Any]:
    """Values of the wrong type for an integer option."""
    return st.one_of(names(), st.floats(allow_nan=False).filter(lambda x: not x.is_integer()),
                     st.lists(st.integers(0, 5), max_size=3), st.just({"a": 1}), st.booleans())


def not_floats() -> st.SearchStrategy[Any]:
    return st.one_of(names(), st.lists(st.floats(0, 1), min_size=1, max_size=2), st.just({"x": 0.5}))


def non_finite() -> st.SearchStrategy[float]:
    return st.sampled_from([math.nan, math.inf, -math.inf])


def below(bound: int) -> st.SearchStrategy[int]:
    """Integers < bound, the ones near it more often."""
    return st.one_of(st.integers(bound - 3, bound - 1), st.integers(max_value=bound - 1))


def at_least(bound: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(bound, bound + 3), st.integers(min_value=bound))


def missing_path(suffix: str = "") -> st.SearchStrategy[str]:
    return st.builds(lambda s: f"/nonexistent/{s}{suffix}", st.text(string.ascii_lowercase, min_size=1, max_size=8))


@dataclass(frozen=True)
class Bad:
    """One invalid value: where it goes (a key path into the config; an option name for flat commands), the value
    (MISSING: the key is left out), and the kind of mistake."""

    path: tuple[str | int, ...]
    value: Any
    kind: str


def bad(kind: str, *path: str | int) -> Callable[[Any], Bad]:
    return lambda value: Bad(tuple(path), value, kind)


def entries(*pairs: tuple[Callable[[Any], Bad], st.SearchStrategy[Any]]) -> st.SearchStrategy[Bad]:
    return st.one_of([values.map(make) for make, values in pairs])


def render(value: Any) -> str:
    """A value as typed on the command line (the parser reads it as YAML)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def set_path(config: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = config
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else node.setdefault(key, {})
        if node is None:
            raise AssertionError(f"{path} crosses a null")
    if value == MISSING:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


def cli_option(path: tuple[str | int, ...], config: dict[str, Any]) -> tuple[str, Any]:
    """A dotted `gradual fit` option and its value for a change at `path`: a change inside a list (callbacks,
    sources) is given as the whole list, as a user would on the command line."""
    keys: list[str] = []
    node: Any = config
    for key in path:
        if isinstance(key, int):
            return "--" + ".".join(keys), node
        keys.append(key)
        node = node.get(key) if isinstance(node, dict) else None
    return "--" + ".".join(keys), node


def as_option(option: str, value: Any) -> list[str]:
    text = render(value)
    return [f"{option}={text}"] if text.startswith("-") else [option, text]


# ---------------------------------------------------------------------------------------------------------------
# Bad values of each command
# ---------------------------------------------------------------------------------------------------------------

def fit_bad() -> st.SearchStrategy[Bad]:
    m, s, sel, rec, lora = ("model",), ("model", "schedule"), ("model", "selection"), ("model", "recovery"), \
        ("model", "lora")
    sgr, dec, cb = ("data", "sgr"), ("data", "sgr", "decoding"), ("trainer", "callbacks")
    not_a_mapping = st.builds(lambda path, value: Bad(path, value, "type"),  # a settings group given as something else
                              st.sampled_from([s, sel, lora, rec, sgr, dec]), st.sampled_from([[1, 2], 5, [], None]))
    return st.one_of(not_a_mapping, entries(
        # numbers out of range
        (bad("range", *s, "layers_per_stage"), below(1)),
        (bad("range", *s, "max_layers"), st.one_of(below(1), at_least(DEPTH))),
        (bad("range", *s, "target_ratio"), st.one_of(st.floats(max_value=0), st.floats(min_value=1), non_finite(),
                                                     st.floats(1e-9, 0.08))),  # < 1/12 of 6 layers: removes none
        (bad("range", *s, "min_depth"), st.one_of(below(1), at_least(DEPTH))),
        (bad("range", *s, "steps_per_stage"), below(0)),
        (bad("range", *s, "final_steps"), below(0)),
        (bad("range", *s, "layers"), st.one_of(st.lists(at_least(DEPTH), min_size=1, max_size=3),
                                               st.lists(below(0), min_size=1, max_size=2),
                                               st.integers(0, DEPTH - 1).map(lambda i: [i, i]))),
        (bad("range", *sel, "span"), st.one_of(below(1), at_least(DEPTH + 1))),
        (bad("range", *sel, "protect_first"), st.one_of(below(0), at_least(DEPTH - 1))),
        (bad("range", *sel, "protect_last"), st.one_of(below(0), at_least(DEPTH - 1))),
        (bad("range", *sel, "num_calibration"), below(1)),
        (bad("range", *sel, "calibration_batch_size"), below(1)),
        (bad("range", *sel, "calibration_max_length"), below(1)),
        (bad("range", *lora, "r"), below(1)),
        (bad("range", *lora, "alpha"), below(1)),
        (bad("range", *lora, "dropout"), st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1),
                                                   non_finite())),
        (bad("range", *rec, "temperature"), st.one_of(st.floats(max_value=0), non_finite())),
        (bad("range", *rec, "sft_weight"), st.one_of(st.floats(max_value=-1e-9), non_finite())),
        (bad("range", *rec, "hidden_weight"), st.one_of(st.floats(max_value=-1e-9), non_finite())),
        (bad("range", *rec, "chunk_size"), below(1)),
        (bad("range", *rec, "near_cut_layers"), below(1)),
        (bad("range", *m, "warmup_steps"), below(0)),
        (bad("range", "model", "optimizer"), st.builds(
            lambda lr: {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}},
            st.one_of(st.floats(max_value=-1e-9), st.just(math.nan)))),
        (bad("range", "data", "batch_size"), below(1)),
        (bad("range", "data", "max_length"), below(2)),
        (bad("range", *sgr, "n_per_task"), below(1)),
        (bad("range", *sgr, "eval_n"), below(1)),
        (bad("range", *sgr, "batch_size"), below(1)),
        (bad("range", *sgr, "chunk_size"), below(1)),
        (bad("range", *sgr, "max_prompts"), below(1)),
        (bad("range", *dec, "temperature"), st.one_of(st.floats(max_value=0), non_finite())),
        (bad("range", *dec, "top_p"), st.one_of(st.floats(max_value=0), st.floats(min_value=1.0001),
                                                non_finite())),
        (bad("range", *dec, "max_new_tokens"), below(1)),
        (bad("range", *dec, "num_samples"), below(1)),
        (bad("range", *cb, 0, "init_args", "n"), below(1)),
        (bad("range", *cb, 0, "init_args", "batch_size"), below(1)),
        (bad("range", *cb, 0, "init_args", "max_new_tokens"), below(1)),
        (bad("range", *cb, 1, "init_args", "threshold"), st.one_of(st.floats(max_value=0), st.floats(min_value=1.0001),
                                                                   non_finite())),
        (bad("range", "trainer", "max_steps"), below(-1)),
        (bad("range", "trainer", "devices"), st.one_of(below(-1), st.just(0))),
        (bad("range", "trainer", "accumulate_grad_batches"), below(1)),
        (bad("range", "trainer", "gradient_clip_val"), st.one_of(st.floats(max_value=-1e-9), non_finite())),
        (bad("range", "data", "sources"), st.builds(lambda w: [{"kind": "tasks", "weight": w}],
                                                    st.one_of(st.floats(max_value=-1e-9), non_finite()))),
        (bad("range", "data", "sources"), st.sampled_from(["n_per_task", "shots", "max_texts"]).map(
            lambda k: [{"kind": "tasks" if k != "max_texts" else "text", k: 0}])),
        # wrong types
        (bad("type", *s, "max_layers"), not_ints()),
        (bad("type", *s, "steps_per_stage"), not_ints()),
        (bad("type", *s, "mode"), st.one_of(st.integers(), st.lists(st.just("gradual"), min_size=1, max_size=2))),
        (bad("type", *s, "layers"), st.one_of(names(), st.just({"a": 1}), st.lists(names(), min_size=1,
                                                                                   max_size=2))),
        (bad("type", *sel, "protect_first"), not_ints()),
        (bad("type", *lora, "r"), not_ints()),
        (bad("type", *lora, "dropout"), not_floats()),
        (bad("type", *lora, "target_modules"), st.one_of(st.integers(), st.just({"q_proj": 1}))),
        (bad("type", *rec, "temperature"), not_floats()),
        (bad("type", *m, "model"), st.one_of(st.integers(), st.lists(names(), min_size=1, max_size=2))),
        (bad("type", *m, "overwrite"), st.one_of(names(), st.just([True]))),
        (bad("type", "data", "batch_size"), not_ints()),
        (bad("type", *sgr, "tasks"), st.one_of(st.integers(), st.just({"successor": 1}))),
        (bad("type", *sgr, "decoding"), st.one_of(st.integers(), names(), st.just([1, 2]))),
        (bad("type", "data", "sources"), st.one_of(names(), st.integers(), st.just({"kind": "tasks"}))),
        (bad("type", *cb, 0, "init_args", "tasks"), st.one_of(st.integers(), st.just({"successor": 1}))),
        (bad("type", *cb, 1, "init_args", "threshold"), not_floats()),
        (bad("type", "trainer", "max_epochs"), not_ints()),
        (bad("type", "seed_everything"), st.one_of(names(), st.floats(allow_nan=False).filter(
            lambda x: not x.is_integer()), st.just([1]))),
        (bad("type", "trainer", "callbacks"), st.one_of(st.integers(), names())),
        # empty lists
        (bad("empty", *s, "layers"), st.just([])),
        (bad("empty", *lora, "target_modules"), st.just([])),
        (bad("empty", "data", "sources"), st.just([])),
        (bad("empty", *cb, 0, "init_args", "tasks"), st.just([])),
        (bad("empty", *cb, 0, "init_args", "forms"), st.just([])),
        (bad("empty", *dec, "stop"), st.just([""])),
        # unknown names
        (bad("unknown", *s, "mode"), names()),
        (bad("unknown", *sel, "metric"), st.one_of(names(), st.just("task_ablation"))),
        (bad("unknown", *rec, "loss"), names()),
        (bad("unknown", *rec, "params"), names()),
        (bad("unknown", *rec, "teacher_dtype"), names()),
        (bad("unknown", *rec, "teacher_quantize"), names()),
        (bad("unknown", *m, "dtype"), names()),
        (bad("unknown", *m, "quantize"), names()),
        (bad("unknown", *m, "repair"), names()),
        (bad("unknown", *m, "model"), st.one_of(names().map(lambda n: f"tiny:{n}"), st.just("tiny:llama:0"),
                                                st.just(""))),
        (bad("unknown", "model", "optimizer"), names().map(lambda n: {"class_path": f"torch.optim.{n}"})),
        (bad("unknown", "data", "dtype"), names()),
        (bad("unknown", *sgr, "source"), names()),
        (bad("unknown", *sgr, "responses"), names()),
        (bad("unknown", *sgr, "backend"), names()),
        (bad("unknown", *sgr, "teacher"), names()),
        (bad("unknown", *sgr, "difficulty"), names()),
        (bad("unknown", *sgr, "tasks"), st.lists(names(), min_size=1, max_size=2)),
        (bad("unknown", "data", "sources"), names().map(lambda n: [{"kind": n}])),
        (bad("unknown", "data", "sources"), names().map(lambda n: [{"kind": "tasks", "tasks": [n]}])),
        (bad("unknown", "data", "sources"), names().map(lambda n: [{"kind": "tasks", "difficulty": n}])),
        (bad("unknown", *cb, 0, "init_args", "tasks"), st.lists(names(), min_size=1, max_size=2)),
        (bad("unknown", *cb, 0, "init_args", "forms"), st.lists(names(), min_size=1, max_size=2)),
        (bad("unknown", *cb, 0, "init_args", "fmt"), names()),
        (bad("unknown", *cb, 0, "init_args", "difficulty"), names()),
        (bad("unknown", *cb, 0, "init_args", "tasks"), st.just(["humaneval"])),
        (bad("unknown", *cb, 1, "init_args", "monitor"), names()),
        (bad("unknown", *cb, 3, "init_args", "keep"), names()),
        (bad("unknown", *cb, 2, "class_path"), names().map(lambda n: f"gradual.callbacks.{n}")),
        (bad("unknown", "trainer", "accelerator"), names()),
        (bad("unknown", "trainer", "precision"), st.one_of(names(), st.sampled_from(["17", "8-mixed"]))),
        (bad("unknown", "trainer", "strategy"), st.one_of(names(), st.just(
            "lightning.pytorch.strategies.ModelParallelStrategy"))),
        (bad("unknown", "trainer", "logger"), names().map(lambda n: {"class_path": f"lightning.pytorch.loggers.{n}"})),
        # missing paths
        (bad("missing", *m, "model"), missing_path()),
        (bad("missing", *sel, "calibration"), st.one_of(missing_path(".txt"), missing_path(".jsonl"))),
        (bad("missing", *sgr), missing_path(".jsonl").map(lambda p: {"source": "file", "path": p})),
        (bad("missing", *sgr), st.just({"source": "file"})),
        (bad("missing", *sgr), missing_path().map(lambda p: {"source": "hf", "path": p})),
        (bad("missing", "data", "sources"), st.one_of(missing_path(".txt"), missing_path(".jsonl")).map(
            lambda p: [{"kind": "text", "path": p}])),
        (bad("missing", "trainer", "callbacks"), missing_path().map(lambda p: [
            {"class_path": "gradual.callbacks.LmEvalEvaluation", "init_args": {"tasks": ["t"], "include_path": p}},
            {"class_path": "gradual.callbacks.RetentionStopping", "init_args": {"monitor": "lm_eval/t"}}])),
        # mixed-up keys
        (bad("mixed", "model", "batch_size"), st.integers(1, 4)),
        (bad("mixed", "data", "lora"), st.just({"r": 4})),
        (bad("mixed", "trainer", "schedule"), st.just({"max_layers": 1})),
        (bad("mixed", "schedule"), st.just({"max_layers": 1})),
        (bad("mixed", *s, "metric"), st.just("reverse")),
        (bad("mixed", *rec, "r"), st.just(4)),
        (bad("mixed", *sgr, "threshold"), st.just(0.5)),
        (bad("mixed", *lora, "rank"), st.just(4)),
        (bad("mixed", "model", "schedul"), st.just({"max_layers": 1})),
        (bad("mixed", *cb, 0, "init_args", "threshold"), st.just(0.5)),
        (bad("mixed", *cb, 1, "init_args", "tasks"), st.just(["successor"])),
        (bad("mixed", "data", "sources"), st.just([{"kind": "tasks", "task": ["successor"]}])),
        (bad("mixed", "data", "sources"), st.just([{"kind": "sgr", "tasks": ["successor"]}])),
        (bad("mixed", "data", "sources"), st.just([{"kind": "tasks", "path": "x.txt"}])),
        (bad("mixed", "data", "sources"), st.just([{"kind": "sgr"}, {"kind": "sgr"}])),
        (bad("mixed", "data", "sources"), st.just([{"kind": "tasks", "weight": 0}])),
        (bad("mixed", *sgr), st.just({"responses": "sgr_filtered", "source": "file", "path": "x.jsonl"})),
        (bad("mixed", *dec), st.just({"do_sample": False, "num_samples": 2})),
        (bad("mixed", *m), st.just({"quantize": "nf4", "recovery": {"params": "full"}})),
        (bad("mixed", *m), st.just({"quantize": "nf4", "repair": "lstsq"})),
        (bad("mixed", *cb, 1), st.just({"class_path": "gradual.callbacks.RetentionStopping",
                                        "init_args": {"monitor": "mc_copy"}})),  # copy is not evaluated
    ))


FLAT_INT = st.one_of(below(1), not_ints())


def score_bad() -> st.SearchStrategy[Bad]:
    return entries(
        (bad("range", "span"), st.one_of(below(1), at_least(5))),
        (bad("range", "num_calibration"), below(1)),
        (bad("range", "batch_size"), below(1)),
        (bad("range", "max_length"), below(1)),
        (bad("type", "num_calibration"), not_ints()),
        (bad("type", "seed"), not_ints()),
        (bad("type", "span"), not_ints()),
        (bad("type", "trust_remote_code"), st.one_of(names(), st.integers(2, 9))),
        (bad("unknown", "metric"), st.one_of(names(), st.just("task_ablation"))),
        (bad("unknown", "dtype"), names()),
        (bad("unknown", "model"), st.one_of(names().map(lambda n: f"tiny:{n}"), st.just("tiny:llama:0"),
                                            st.just(""), st.just("[1, 2]"))),
        (bad("missing", "model"), st.one_of(missing_path(), st.just(MISSING))),
        (bad("missing", "calibration"), st.one_of(missing_path(".txt"), missing_path(".jsonl"))),
        (bad("mixed", "tasks"), st.just("successor")),
        (bad("mixed", "num"), st.integers(1, 2)),
    )


def eval_bad() -> st.SearchStrategy[Bad]:
    return entries(
        (bad("range", "n"), below(1)),
        (bad("range", "batch_size"), below(1)),
        (bad("range", "max_new_tokens"), below(1)),
        (bad("range", "limit"), below(1)),
        (bad("type", "n"), not_ints()),
        (bad("type", "tasks"), st.one_of(st.integers(), st.just({"successor": 1}))),
        (bad("type", "enable_code"), st.one_of(names(), st.integers(2, 9))),
        (bad("empty", "tasks"), st.sampled_from(["", [], ","])),
        (bad("empty", "forms"), st.sampled_from(["", [], ","])),
        (bad("unknown", "tasks"), st.one_of(names(), st.lists(names(), min_size=1, max_size=3),
                                            st.just("humaneval"))),
        (bad("unknown", "forms"), st.one_of(names(), st.lists(names(), min_size=1, max_size=2))),
        (bad("unknown", "fmt"), names()),
        (bad("unknown", "difficulty"), names()),
        (bad("unknown", "dtype"), names()),
        (bad("unknown", "lm_eval_tasks"), names().map(lambda n: f"nope_{n}")),
        (bad("unknown", "model"), st.one_of(names().map(lambda n: f"tiny:{n}"), st.just(""))),
        (bad("missing", "model"), st.one_of(missing_path(), st.just(MISSING))),
        (bad("missing", "include_path"), missing_path()),
        (bad("mixed", "metric"), st.just("reverse")),
        (bad("mixed", "layers"), st.just("1,2")),
    )


def prune_bad() -> st.SearchStrategy[Bad]:
    return entries(
        (bad("range", "num"), st.one_of(below(1), at_least(4))),
        (bad("range", "layers"), st.one_of(at_least(4).map(str), st.lists(at_least(4), min_size=1, max_size=2),
                                           st.just("0,1,2,3"), st.just([1, 1]), st.just("-1"))),
        (bad("range", "protect_first"), st.one_of(below(0), at_least(3))),
        (bad("range", "protect_last"), st.one_of(below(0), at_least(3))),
        (bad("type", "num"), not_ints()),
        (bad("type", "layers"), st.one_of(names(), st.just({"a": 1}), st.just("1.5"))),
        (bad("empty", "layers"), st.sampled_from(["", [], ","])),
        (bad("empty", "out"), st.just("")),
        (bad("unknown", "metric"), st.one_of(names(), st.just("task_ablation"))),
        (bad("unknown", "dtype"), names()),
        (bad("unknown", "model"), st.one_of(names().map(lambda n: f"tiny:{n}"), st.just(""))),
        (bad("missing", "model"), st.one_of(missing_path(), st.just(MISSING))),
        (bad("missing", "out"), st.just(MISSING)),
        (bad("mixed", "tasks"), st.just("successor")),
        (bad("mixed", "span"), st.just(2)),
    )


def tasks_bad() -> st.SearchStrategy[Bad]:
    return entries(
        (bad("unknown", "difficulty"), names()),
        (bad("type", "difficulty"), st.one_of(st.integers(), st.lists(names(), max_size=2), st.just({"a": 1}))),
        (bad("mixed", "n"), st.integers(1, 5)),
        (bad("mixed", "model"), st.just("tiny:llama:4")),
    )


def compare_bad() -> st.SearchStrategy[Bad]:
    c = ("compare",)
    arm = {"name": "a", "mode": "gradual"}
    return st.one_of(
        entries(
            (bad("range", "--depths"), st.one_of(below(1).map(str), at_least(DEPTH).map(str), st.just("1,1"))),
            (bad("range", *c, "depths"), st.one_of(st.lists(below(1), min_size=1, max_size=2),
                                                   st.lists(at_least(DEPTH), min_size=1, max_size=2))),
            (bad("range", *c, "budget_per_layer"), below(1)),
            (bad("range", *c, "arms"), st.one_of(st.floats(min_value=1.001), st.floats(max_value=-1e-9),
                                                 non_finite()).map(lambda f: [{**arm, "final_share": f}])),
            (bad("type", "--depths"), names()),
            (bad("type", *c, "depths"), st.one_of(names(), st.just({"a": 1}))),
            (bad("type", *c, "budget_per_layer"), not_ints()),
            (bad("type", *c, "arms"), st.one_of(names(), st.integers(), st.just({"name": "a"}))),
            (bad("type", *c), st.one_of(names(), st.just([1]))),
            (bad("empty", *c, "arms"), st.just([])),
            (bad("empty", *c, "depths"), st.just([])),
            (bad("empty", "--depths"), st.sampled_from(["", ","])),
            (bad("unknown", "--arms"), names()),
            (bad("unknown", *c, "arms"), names().map(lambda n: [{**arm, "mode": n}])),
            (bad("unknown", *c, "arms"), st.sampled_from(["a b", "a/b", "", "ä"]).map(lambda n: [{**arm, "name": n}])),
            (bad("unknown", *c, "arms"), names().map(lambda n: [{**arm, "overrides": {"model.recovery.loss": n}}])),
            (bad("unknown", *c, "arms"), names().map(lambda n: [{**arm, "responses": n}])),
            (bad("mixed", *c, "arms"), st.sampled_from(["model.model", "model.run_dir", "trainer.callbacks",
                                                        "model.schedule.layers", "compare.out", "model"]).map(
                lambda k: [{**arm, "overrides": {k: "x"}}])),
            (bad("mixed", *c, "arms"), st.just([{**arm, "overrides": {"model.nope": 1}}])),
            (bad("mixed", *c, "arms"), st.just([{**arm, "stages": 2}])),
            (bad("mixed", *c, "arms"), st.just([arm, arm])),
            (bad("mixed", *c, "arms"), st.just([{**arm, "final_share": 0.5, "steps_per_stage": 2}])),
            (bad("mixed", *c, "threshold"), st.just(0.5)),
            (bad("mixed", "--overwrite"), st.sampled_from(["maybe", "2"])),
        ),
        fit_bad().filter(lambda b: b.path[:2] != ("trainer", "callbacks") and b.path[:3] not in COMPARE_SETS),
    )


PLAN_READS = {("model", "dtype"), ("model", "quantize"), ("model", "recovery"), ("model", "lora"),
              ("model", "schedule"), ("model", "repair"), ("model",), ("data", "batch_size"), ("data", "max_length"),
              ("trainer", "devices")}
"""What `gradual plan` reads beside the model's config (`gradual.lightning_cli.PlanCLI`): a bad value there is
refused as `fit` refuses it; so are a wrong type and an unknown key anywhere (the shared parser). The data sources'
and callbacks' values are `fit`'s to refuse."""


def plan_bad() -> st.SearchStrategy[Bad]:
    def read(b: Bad) -> bool:
        if b.path[:2] in {("data", "sources"), ("data", "sgr"), ("trainer", "callbacks")}:
            return b.kind == "type" and b.path[:2] != ("data", "sources") and len(b.path) == 2
        return b.path[:2] in PLAN_READS or b.path[:1] == ("seed_everything",) or b.kind in ("type", "mixed")

    return fit_bad().filter(read)


COMPARE_SETS = {("model", "schedule", key) for key in ("mode", "max_layers", "target_ratio", "min_depth", "layers",
                                                       "steps_per_stage", "final_steps")}
"""Base-config keys every arm's own value replaces (`gradual.compare.plan.MANAGED`, the budget split): a bad value
there never reaches a run."""


# ---------------------------------------------------------------------------------------------------------------
# One example: its files, its command line, and what must hold afterwards
# ---------------------------------------------------------------------------------------------------------------

FLAT_BASE = {
    "score": {"model": "tiny:llama:4"},
    "eval": {"model": "tiny:llama:4", "tasks": "successor"},
    "prune": {"model": "tiny:llama:4", "num": 1, "out": "{tmp}/pruned"},
    "tasks": {},
}
BAD = {"fit": fit_bad, "score": score_bad, "eval": eval_bad, "prune": prune_bad, "tasks": tasks_bad,
       "compare": compare_bad, "plan": plan_bad}


@dataclass(frozen=True)
class Case:
    command: str
    bads: tuple[Bad, ...]
    via: str  # "cli": options on the command line; "config": all in a --config YAML; "both": base in the YAML
    existing_dir: bool  # the run directory / output folder exists (empty) beforehand

    def argv(self, tmp: Path) -> list[str]:
        """Write the example's files under `tmp` and return its command line."""
        if self.command in ("fit", "compare", "plan"):
            return self._fit_like(tmp)
        options = {k: v.replace("{tmp}", str(tmp)) if isinstance(v, str) else v
                   for k, v in FLAT_BASE[self.command].items()}
        if self.command == "prune" and any(b.path == ("layers",) for b in self.bads):
            del options["num"]  # prune takes --layers or --num
        given = dict(options)
        for b in self.bads:
            set_path(given, b.path, b.value)
        if self.via == "config":
            return [self.command, "--config", _write(tmp / "options.yaml", given)]
        argv = [self.command]
        if self.via == "both":
            base = {k: v for k, v in options.items() if given.get(k, MISSING) != MISSING}
            argv += ["--config", _write(tmp / "options.yaml", base)]
            given = {k: v for k, v in given.items() if k not in base or (type(base[k]), base[k]) != (type(v), v)}
        for key, value in given.items():
            option = "--" + key.replace("_", "-")
            if isinstance(value, bool) and key in ("trust_remote_code", "enable_code"):
                argv += [option] if value else []
            elif key in ("trust_remote_code", "enable_code", "overwrite"):
                argv += [f"{option}={render(value)}"]
            else:
                argv += as_option(option, value)
        return argv

    def _fit_like(self, tmp: Path) -> list[str]:
        config = deepcopy(SMOKE)
        config["model"]["run_dir"] = str(tmp / "run")
        config["data"]["sgr"]["cache_dir"] = str(tmp / "sgr-cache")
        options: list[str] = []
        if self.command == "compare":
            config["compare"] = {"depths": [1], "budget_per_layer": 2, "out": str(tmp / "compare"),
                                 "arms": [{"name": "no_recovery", "mode": "one_shot", "steps_per_stage": 0},
                                          {"name": "gradual_kd", "mode": "gradual",
                                           "overrides": {"model.recovery.loss": "kd"}}]}
            del config["model"]["run_dir"]
            config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]
            config["trainer"]["callbacks"][0]["init_args"]["tasks"] = ["successor"]
        in_yaml, on_cli = deepcopy(config), deepcopy(config)
        for b in self.bads:
            if b.path[0].startswith("--"):
                option = b.path[0].replace("_", "-")
                options += [f"{option}={render(b.value)}"] if option == "--overwrite" else as_option(option,
                                                                                                   b.value)
            elif self.via == "config" or b.value == MISSING or self.command == "compare":
                set_path(in_yaml, b.path, b.value)
            else:
                set_path(on_cli, b.path, b.value)
                options += as_option(*cli_option(b.path, on_cli))
        return [self.command, "--config", _write(tmp / "config.yaml", in_yaml), *options]

    def outputs(self, tmp: Path) -> list[Path]:
        """The folders a run would write: none of them may appear (or change, if it existed)."""
        return {"fit": [tmp / "run", tmp / "sgr-cache"], "compare": [tmp / "compare", tmp / "sgr-cache"],
                "prune": [tmp / "pruned"]}.get(self.command, [])


def _write(path: Path, data: Any) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return str(path)


@st.composite
def cases(draw: st.DrawFn, command: str, exclude: Callable[[Bad], bool] = lambda b: False) -> Case:
    strategy = BAD[command]().filter(lambda b: not exclude(b))
    first = draw(strategy)
    bads = [first]
    if draw(st.integers(0, 3)) == 0:  # sometimes two mistakes at once
        second = draw(strategy)
        if second.path[:len(first.path)] != first.path and first.path[:len(second.path)] != second.path:
            bads.append(second)
    return Case(command, tuple(bads), draw(st.sampled_from(["cli", "config", "both"])), draw(st.booleans()))


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a digest of its content (folders as 'dir')."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


@contextmanager
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("model loaded: a bad value passed every check")

    with monkeypatch.context() as patch:
        patch.setattr(gradual.models, "load_model", loaded)
        patch.setattr(gradual.models, "load_tokenizer", loaded)
        yield


def check(case: Case, root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    tmp = Path(tempfile.mkdtemp(dir=root))
    argv = case.argv(tmp)
    for out in case.outputs(tmp)[:1]:
        if case.existing_dir and case.command != "prune":  # prune refuses an existing --out by design
            out.mkdir()
    before = snapshot(root)
    capfd.readouterr()
    code = main(argv)
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gradual: error: "), (argv, code, err)
    assert snapshot(root) == before, (argv, "wrote files")


FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                            HealthCheck.filter_too_much, HealthCheck.data_too_large])
COMMANDS = ("fit", "score", "eval", "prune", "tasks", "compare", "plan")
SLOW_EXAMPLES = {"fit": 140, "score": 40, "eval": 40, "prune": 40, "tasks": 15, "compare": 40, "plan": 40}  # 355
FAST_EXAMPLES = {"fit": 25, "score": 10, "eval": 10, "prune": 10, "tasks": 5, "compare": 6, "plan": 10}


@pytest.fixture
def fuzz_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory that holds every example (relative paths, the default SGR cache and run folders land
    inside it, so the snapshot sees them), with the model loaders raising."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRADUAL_CACHE", str(tmp_path / "cache"))
    with no_model_loads(monkeypatch):
        yield tmp_path


def fuzz(command: str, examples: int, root: Path, capfd: pytest.CaptureFixture[str],
         exclude: Callable[[Bad], bool] = lambda b: False) -> None:
    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(case=cases(command, exclude))
    def one(case: Case) -> None:
        check(case, root, capfd)

    one()


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_values_end_in_one_line_exit_2_and_write_nothing(command: str, fuzz_root: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    """The fast variant: a few examples of every command (lm-eval's task index, half a minute, is left out)."""
    fuzz(command, FAST_EXAMPLES[command], fuzz_root, capfd, exclude=lambda b: b.path == ("lm_eval_tasks",))


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_many_bad_values_end_in_one_line_exit_2_and_write_nothing(command: str, fuzz_root: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    fuzz(command, SLOW_EXAMPLES[command], fuzz_root, capfd)


# ---------------------------------------------------------------------------------------------------------------
# End to end: a real `gradual` process, whose stderr also holds what Lightning's own log handlers print
# ---------------------------------------------------------------------------------------------------------------

DRIVER = """
import sys
from gradual.cli import main
for argv in {cases!r}:
    code = main(argv)
    sys.stdout.flush()
    print(f"exit {{code}}", file=sys.stderr)
    print("---", file=sys.stderr, flush=True)
"""


@pytest.mark.slow  # a fresh process imports Lightning: ~15 s
def test_a_real_process_prints_one_line_for_values_rejected_late(tmp_path: Path) -> None:
    """Rejections after the Trainer is built (an FSDP strategy with LoRA, a strategy class given as a name, a
    callback value) print one line on stderr, without Lightning's start-up notices ("Seed set to 0", "GPU
    available: ...") or a traceback, and leave no run directory."""
    config = _write(tmp_path / "smoke.yaml", {**SMOKE, "model": {**SMOKE["model"], "run_dir": str(tmp_path / "r")}})
    fit = ["fit", "--config", config]
    cases = [[*fit, "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy"],
             [*fit, "--trainer.strategy", '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}'],
             [*fit, "--trainer.devices", "-2"],
             [*fit, "--trainer.accumulate_grad_batches", "0"],
             [*fit, "--model.lora.r", "0"]]
    result = subprocess.run([sys.executable, "-c", DRIVER.format(cases=cases)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=False)
    outputs = result.stderr.split("---\n")[:len(cases)]
    assert len(outputs) == len(cases), result.stderr[-3000:]
    for argv, err in zip(cases, outputs, strict=True):
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("exit ")]
        assert "exit 2" in err and len(lines) == 1 and lines[0].startswith("gradual: error: "), (argv, err)
    assert "class_path: lightning.pytorch.strategies.ModelParallelStrategy" in outputs[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # lm-eval indexes its stock tasks first (~15 s)
def test_an_unknown_lm_eval_task_is_refused_before_any_model_loads(fuzz_root: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "--model", "tiny:llama:4", "--lm-eval-tasks", "arc_easy,no_such_task_x"]
    assert main(argv) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        "gradual: error: --lm-eval-tasks: lm-eval task(s) 'no_such_task_x' not found; see `lm-eval ls tasks`"]
