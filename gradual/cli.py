"""The `gradual` command: `fit` (LightningCLI: the prune → heal → measure loop), `score`, `eval`, `compare`.

Bad input ends with one line on stderr and exit code 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence

from gradual.errors import OneLineParser

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

USAGE = """usage: gradual <command> [options]

commands:
  fit       run the prune -> heal -> measure loop (LightningCLI: --config, --print_config, dotted overrides)
  score     score and rank a model's layers with an importance metric
  eval      evaluate a model (any path or alias) on built-in and lm-eval tasks
  prune     remove layers in one shot (no recovery) and save the model
  compare   healing recipes side by side (one-shot vs gradual, SFT vs KD, LoRA vs full weights, ...) at equal
            depth and training budget
  tasks     list the built-in evaluation tasks with an example problem

`gradual <command> --help` describes each command's options."""


def _split(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def score_command(argv: Sequence[str]) -> int:
    from gradual import importance

    p = OneLineParser(prog="gradual score", description="Score and rank a model's layers.")
    p.add_argument("--model", required=True, help="hub id, local path, smollm2-135m-instruct or tiny:<arch>")
    p.add_argument("--metric", default="block_influence", help=f"one of: {', '.join(importance.METRICS)}")
    p.add_argument("--span", type=int, default=1, help="angular distance span n")
    p.add_argument("--calibration", default=None, help=".txt (one text a line) or .jsonl (field 'text') file")
    p.add_argument("--num-calibration", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    from gradual.errors import UsageError
    from gradual.models import load_model, load_tokenizer

    if args.metric not in importance.METRICS or args.metric == "task_ablation":
        allowed = [m for m in importance.METRICS if m != "task_ablation"]
        raise UsageError(f"--metric {args.metric!r} is not available here; allowed: {', '.join(allowed)}")
    texts = importance.calibration_texts(args.calibration, n=args.num_calibration, seed=args.seed)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    batches = importance.calibration_batches(tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length)
    scores = importance.score_layers(model, batches, args.metric, span=args.span, seed=args.seed)
    print(importance.format_table(scores))
    return 0


def eval_command(argv: Sequence[str]) -> int:
    from gradual.tasks import CODE_TASKS, TASKS

    p = OneLineParser(prog="gradual eval", description="Evaluate a model on built-in and lm-eval tasks.")
    p.add_argument("--model", required=True, help="hub id, local path (e.g. runs/demo/final), alias or tiny:<arch>")
    p.add_argument("--tasks", type=_split, default=[], help=f"comma-separated built-in tasks: {', '.join(TASKS)}")
    p.add_argument("--forms", type=_split, default=["generative", "classification"])
    p.add_argument("--fmt", default="fewshot", help="fewshot or chat")
    p.add_argument("--n", type=int, default=100, help="problems per task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's own budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", default="small", help="built-in task sizes: small (~100M models) or large (7-8B)")
    p.add_argument("--enable-code", action="store_true", help="allow humaneval (runs model code in a sandbox)")
    p.add_argument("--lm-eval-tasks", type=_split, default=[], help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="directory of local lm-eval YAML tasks")
    p.add_argument("--limit", type=int, default=None, help="lm-eval items per task")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    from gradual.errors import UsageError
    from gradual.models import load_model, load_tokenizer
    from gradual.tasks import evaluate, format_results_table
    from gradual.tasks.builtin import check_difficulty
    from gradual.tasks.lm_eval_bridge import evaluate_lm_eval

    if not args.tasks and not args.lm_eval_tasks:
        raise UsageError("nothing to evaluate; give --tasks and/or --lm-eval-tasks")
    unknown = [t for t in args.tasks if t not in TASKS and t not in CODE_TASKS]
    if unknown:
        allowed = ", ".join([*TASKS, *CODE_TASKS])
        raise UsageError(f"unknown task(s) {', '.join(map(repr, unknown))}; allowed: {allowed}")
    if any(t in CODE_TASKS for t in args.tasks) and not args.enable_code:
        raise UsageError("task 'humaneval' runs model-written code; add --enable-code to allow it")
    if args.fmt not in ("fewshot", "chat"):
        raise UsageError(f"--fmt {args.fmt!r} is unknown; allowed: fewshot, chat")
    check_difficulty(args.difficulty)
    if args.include_path and not os.path.isdir(args.include_path):
        raise UsageError(f"--include-path {args.include_path!r} is not a directory")
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    results = {}
    if args.tasks:
        results.update(evaluate(model, tokenizer, args.tasks, n=args.n, forms=tuple(args.forms), fmt=args.fmt,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                enable_code=args.enable_code, difficulty=args.difficulty))
    if args.lm_eval_tasks:
        results.update(evaluate_lm_eval(model, tokenizer, args.lm_eval_tasks, limit=args.limit,
                                        include_path=args.include_path, batch_size=args.batch_size))
    print(format_results_table(results))
    return 0


def prune_command(argv: Sequence[str]) -> int:
    from gradual import importance

    p = OneLineParser(prog="gradual prune", description="Remove layers in one shot (no recovery) and save "
                                "the model in Hugging Face format.")
    p.add_argument("--model", required=True, help="hub id, local path, smollm2-135m-instruct or tiny:<arch>")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=_split, help="comma-separated original indices of the layers to remove "
                       "(as recorded in an already-pruned model's config)")
    which.add_argument("--num", type=int, help="remove this many layers, least important first by --metric")
    p.add_argument("--metric", default="block_influence", help=f"one of: {', '.join(importance.METRICS)}")
    p.add_argument("--protect-first", type=int, default=1)
    p.add_argument("--protect-last", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    from gradual import surgery
    from gradual.errors import UsageError
    from gradual.models import load_model, load_tokenizer, original_layers, save_model

    if os.path.exists(args.out):
        raise UsageError(f"--out {args.out!r} already exists; give a new folder")
    original = original_layers(args.model, trust_remote_code=args.trust_remote_code)
    depth = len(original)
    if args.layers is not None:
        if not all(v.lstrip("-").isdigit() for v in args.layers):
            raise UsageError(f"--layers {','.join(args.layers)!r} is invalid; give original layer indices, e.g. 3,7")
        layers = surgery.current_positions([int(v) for v in args.layers], original)
    elif not 1 <= args.num < depth:
        raise UsageError(f"--num {args.num} is invalid for a model of {depth} layers; allowed: 1..{depth - 1}")
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if args.layers is None:
        texts = importance.calibration_texts(None)
        scores = importance.score_layers(model, importance.calibration_batches(tokenizer, texts), args.metric)
        layers = scores.choose(args.num, protect_first=args.protect_first, protect_last=args.protect_last)
    removed = surgery.remove_layers(model, layers)
    save_model(model, tokenizer, args.out)
    print(f"removed original layers {removed}; {surgery.num_layers(model)} layers left; saved to {args.out}")
    return 0


def tasks_command(argv: Sequence[str]) -> int:
    from gradual.tasks import CODE_TASKS
    from gradual.tasks.builtin import DIFFICULTIES, get_task, task_names

    p = OneLineParser(prog="gradual tasks", description="List the built-in tasks: forms, answer kind, "
                                "and one example problem (evaluation split) at the chosen difficulty.")
    p.add_argument("--difficulty", default="small", help=f"problem size preset: {', '.join(DIFFICULTIES)}")
    args = p.parse_args(argv)
    rows = []
    for name in task_names():
        task = get_task(name, args.difficulty)
        example = task.problems("eval", 1, 0)[0]
        forms = "generative, classification" if task.has_classification else "generative"
        rows.append((name, forms, task.kind, f"{example.question!r} -> {example.answer!r}"))
    rows += [(name, "generative (code; needs enable_code)", "code", "HumanEval problems") for name in CODE_TASKS]
    head = ("task", "forms", "answer", f"example ({args.difficulty})")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    return 0


def compare_command(argv: Sequence[str]) -> int:
    from gradual.compare import main as compare_main

    return compare_main(argv)


def _usage_error_in(exc: BaseException | None) -> BaseException | None:
    """The UsageError behind a wrapped exception, if any."""
    from gradual.errors import UsageError

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
    key = ".".join(m.group(2) for m in keys)
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


def fit_command(argv: Sequence[str]) -> int:
    """Parse and check everything (no model loaded yet), then run one `trainer.fit` over all stages.

    A run that fails on bad input after it started (a zero baseline on the monitored task) leaves no run
    directory behind if it created it.
    """
    import shutil

    from gradual.errors import UsageError
    from gradual.lightning_cli import GradualCLI

    script = sys.argv[0]
    sys.argv = [f"{script} fit"]
    try:
        cli = GradualCLI(args=list(argv), run=False, parser_kwargs={"exit_on_error": False})
    except argparse.ArgumentError as e:  # a value the parser itself rejects (type, allowed literals, unknown key)
        raise UsageError(parser_error_line(str(e))) from None
    except ValueError as e:  # jsonargparse wraps errors raised while instantiating callbacks
        raise (_usage_error_in(e) or e) from None

    module = cli.model
    module.check_run_dir()
    state = module.saved_state()
    if state and state.get("finished"):
        print(f"run in {module.run_dir} is already complete; see {module.run_dir / 'report.md'}")
        return 0
    existed = module.run_dir.exists()
    sys.argv = [script, "fit", *argv]  # Lightning's DDP launcher starts the other ranks with this command
    try:
        cli.trainer.fit(module, datamodule=cli.datamodule)
    except UsageError:
        if not existed and cli.trainer.is_global_zero:
            shutil.rmtree(module.run_dir, ignore_errors=True)
        raise
    if cli.trainer.is_global_zero:
        print(f"done: {module.stop_reason}; final model (stage {module.chosen_stage()}) in {module.run_dir / 'final'}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "fit": fit_command, "score": score_command, "eval": eval_command, "prune": prune_command,
    "compare": compare_command, "tasks": tasks_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    from gradual.errors import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"gradual: error: unknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UsageError as e:
        print(f"gradual: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
