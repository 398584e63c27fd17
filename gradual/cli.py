"""The `gradual` command: `fit` (LightningCLI: the prune → heal → measure loop), `score`, `eval`, `prune`, `tasks`,
`compare`.

Every command but `fit` is a typed function below whose docstring is its `--help` (`gradual.command` builds the
jsonargparse parser); each takes `--config` and `--print_config`. Bad input ends with one line on stderr and exit code
2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gradual import command
from gradual.errors import UsageError, parser_error_line, usage_error_in

USAGE = """usage: gradual <command> [options]

commands:
  fit       run the prune -> heal -> measure loop (LightningCLI: dotted overrides)
  plan      a fit config's memory per device, disk per stage and recovery tokens, from the model's config alone;
            exit 2 when it does not fit the visible devices (`gradual fit --config X --plan` is the same)
  score     score and rank a model's layers with an importance metric
  eval      evaluate a model (any path or alias) on built-in and lm-eval tasks
  prune     remove layers in one shot (no recovery) and save the model
  compare   healing recipes side by side (one-shot vs gradual, SFT vs KD, LoRA vs full weights, ...) at equal
            depth and training budget
  tasks     list the built-in evaluation tasks with an example problem

Every command takes --config FILE.yaml and --print_config; `gradual <command> --help` describes its options."""


def _items(value: str | list[str] | list[int]) -> list[str]:
    """A comma-separated command-line value (`a,b`) or a YAML list, as a list of strings."""
    return [v for v in value.split(",") if v] if isinstance(value, str) else [str(v) for v in value]


def _check_at_least(low: int, **values: int | None) -> None:
    """Refuse an option below `low` (None, an unset optional limit, passes), naming it as typed."""
    for name, value in values.items():
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} {value} is invalid; it must be >= {low}")


def score(model: str, metric: str = "block_influence", span: int = 1, calibration: str | None = None,
          num_calibration: int = 32, batch_size: int = 8, max_length: int = 256, dtype: str = "float32",
          seed: int = 0, trust_remote_code: bool = False) -> int:
    """Score and rank a model's layers with an importance metric; prints a table, least important first.

    Args:
        model: The model: a hub id, a local folder, an offline alias (smollm2-135m-instruct, gemma3-270m) or
            tiny:<arch>[:<layers>].
        metric: The importance metric, one of: {metrics}.
        span: How many consecutive layers angular_distance compares (its n).
        calibration: A .txt file (one text a line) or .jsonl file (field 'text') of calibration texts; default: the
            built-in prompts.
        num_calibration: How many calibration texts to use (a seeded sample when the source has more).
        batch_size: Calibration texts per forward pass.
        max_length: Tokens kept per calibration text.
        dtype: The weights' dtype while scoring: float32, bfloat16, float16 or auto.
        seed: Seed of the calibration sample and of the random metric.
        trust_remote_code: Allow the model's own code from the hub (needed by some architectures).
    """
    from gradual import importance
    from gradual.models import check_dtype, load_model, load_tokenizer, original_layers

    if metric not in _metrics().split(", "):
        raise UsageError(f"--metric {metric!r} is not available here; allowed: {_metrics()}")
    check_dtype(dtype, "--dtype")
    _check_at_least(1, span=span, num_calibration=num_calibration, batch_size=batch_size, max_length=max_length)
    depth = len(original_layers(model, trust_remote_code=trust_remote_code))  # the config alone: a bad name ends here
    if metric in ("block_influence", "angular_distance") and span > depth:
        raise UsageError(f"--span {span} is invalid for a model of {depth} layers; allowed: 1..{depth}")
    texts = importance.calibration_texts(calibration, n=num_calibration, seed=seed)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    batches = importance.calibration_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length)
    print(importance.format_table(importance.score_layers(loaded, batches, metric, span=span, seed=seed)))
    return 0


def evaluate(model: str, tasks: str | list[str] = "", forms: str | list[str] = "generative,classification",
             fmt: str = "fewshot", n: int = 100, batch_size: int = 32, max_new_tokens: int | None = None,
             seed: int = 0, difficulty: str = "small", enable_code: bool = False,
             lm_eval_tasks: str | list[str] = "", include_path: str | None = None, limit: int | None = None,
             dtype: str = "float32", trust_remote_code: bool = False) -> int:
    """Evaluate a model on built-in and lm-eval tasks; prints one row per task and form.

    Args:
        model: The model: a hub id, a local folder (e.g. runs/demo/final), an offline alias
            (smollm2-135m-instruct, gemma3-270m) or tiny:<arch>[:<layers>].
        tasks: Built-in tasks to evaluate, comma-separated or a YAML list: {tasks}.
        forms: Forms of each built-in task, comma-separated: generative (free answer) and/or classification
            (multiple choice by log-likelihood).
        fmt: Prompt format of the built-in tasks: fewshot (worked examples) or chat (the chat template).
        n: Problems per built-in task.
        batch_size: Prompts per generation or scoring batch.
        max_new_tokens: Cap on generated tokens per answer; default: each task's own budget.
        seed: Seed of the problem sample and the few-shot examples.
        difficulty: Built-in task sizes: small (~100M models) or large (7-8B).
        enable_code: Allow humaneval, which runs model-written code in a sandbox.
        lm_eval_tasks: Names of lm-eval tasks to evaluate as well, comma-separated or a YAML list.
        include_path: A directory of local lm-eval YAML tasks.
        limit: Items per lm-eval task; default: all.
        dtype: The weights' dtype: float32, bfloat16, float16 or auto.
        trust_remote_code: Allow the model's own code from the hub (needed by some architectures).
    """
    from gradual.models import check_dtype, load_model, load_tokenizer, model_positions
    from gradual.tasks import check_task_settings, format_results_table
    from gradual.tasks import evaluate as evaluate_tasks
    from gradual.tasks.lm_eval_bridge import check_lm_eval_tasks, evaluate_lm_eval

    builtin, lm_eval = _items(tasks), _items(lm_eval_tasks)
    if not builtin and not lm_eval:
        raise UsageError("nothing to evaluate; give --tasks and/or --lm-eval-tasks")
    check_task_settings(builtin, _items(forms), fmt, enable_code, difficulty, options=True)
    _check_at_least(1, n=n, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit)
    check_dtype(dtype, "--dtype")
    if include_path is not None and not os.path.isdir(include_path):
        raise UsageError(f"--include-path {include_path!r} is not a directory")
    model_positions(model, trust_remote_code=trust_remote_code)  # reads the config alone: a bad name ends here
    if lm_eval:
        check_lm_eval_tasks(lm_eval, include_path, "--lm-eval-tasks")
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    results = {}
    if builtin:
        results.update(evaluate_tasks(loaded, tokenizer, builtin, n=n, forms=tuple(_items(forms)), fmt=fmt,
                                      batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed,
                                      enable_code=enable_code, difficulty=difficulty))
    if lm_eval:
        results.update(evaluate_lm_eval(loaded, tokenizer, lm_eval, limit=limit, include_path=include_path,
                                        batch_size=batch_size))
    print(format_results_table(results))
    return 0


def prune(model: str, out: str, layers: str | list[int] | None = None, num: int | None = None,
          metric: str = "block_influence", protect_first: int = 1, protect_last: int = 1, dtype: str = "float32",
          trust_remote_code: bool = False) -> int:
    """Remove layers in one shot (no recovery) and save the model in Hugging Face format. Give --layers or --num.

    Args:
        model: The model: a hub id, a local folder, an offline alias (smollm2-135m-instruct, gemma3-270m) or
            tiny:<arch>[:<layers>].
        out: The output folder; it must not exist yet.
        layers: Original indices of the layers to remove, comma-separated (as recorded in an already-pruned
            model's config).
        num: Remove this many layers instead, least important first by --metric on the built-in calibration texts.
        metric: The importance metric that ranks layers for --num, one of: {metrics}.
        protect_first: How many layers at the start --num never removes.
        protect_last: How many layers at the end --num never removes.
        dtype: The weights' dtype, also of the saved model: float32, bfloat16, float16 or auto.
        trust_remote_code: Allow the model's own code from the hub (needed by some architectures).
    """
    from gradual import importance, surgery
    from gradual.models import check_dtype, load_model, load_tokenizer, original_layers, save_model

    if layers is None and num is None:
        raise UsageError("gradual prune: one of the arguments --layers --num is required")
    if layers is not None and num is not None:
        raise UsageError("gradual prune: argument --num: not allowed with argument --layers")
    if not out.strip():
        raise UsageError("--out is empty; give a new folder")
    if os.path.exists(out):
        raise UsageError(f"--out {out!r} already exists; give a new folder")
    if num is not None and metric not in _metrics().split(", "):
        raise UsageError(f"--metric {metric!r} is not available here; allowed: {_metrics()}")
    check_dtype(dtype, "--dtype")
    _check_at_least(0, protect_first=protect_first, protect_last=protect_last)
    original = original_layers(model, trust_remote_code=trust_remote_code)
    depth = len(original)
    if layers is not None:
        given = _items(layers)
        if not given or not all(v.lstrip("-").isdigit() for v in given):
            raise UsageError(f"--layers {','.join(given)!r} is invalid; give original layer indices, e.g. 3,7")
        chosen = surgery.current_positions([int(v) for v in given], original)
    elif not 1 <= num < depth:
        raise UsageError(f"--num {num} is invalid for a model of {depth} layers; allowed: 1..{depth - 1}")
    elif num > depth - protect_first - protect_last:
        raise UsageError(f"--num {num} is invalid: --protect-first {protect_first} and --protect-last "
                         f"{protect_last} leave {max(0, depth - protect_first - protect_last)} of the model's "
                         f"{depth} layers to choose from")
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if layers is None:
        texts = importance.calibration_texts(None)
        scores = importance.score_layers(loaded, importance.calibration_batches(tokenizer, texts), metric)
        chosen = scores.choose(num, protect_first=protect_first, protect_last=protect_last)
    removed = surgery.remove_layers(loaded, chosen)
    save_model(loaded, tokenizer, out)
    print(f"removed original layers {removed}; {surgery.num_layers(loaded)} layers left; saved to {out}")
    return 0


def tasks(difficulty: str = "small") -> int:
    """List the built-in tasks by capability family: forms, answer kind, the offline models' measured few-shot
    generative baselines (SmolLM2-135M-Instruct and Gemma3-270M at small; ± binomial standard error, and the floor a
    model repeating one answer scores) and one example problem (evaluation split) at the chosen difficulty. A
    held-out task is near held-out when a task of its family fed recovery, far held-out otherwise.

    Args:
        difficulty: Problem size preset: {difficulties}.
    """
    from gradual.tasks import CODE_TASKS
    from gradual.tasks.builtin import get_task, task_names
    from gradual.tasks.families import FAMILIES, MODEL_BASELINES, Baseline, family_of

    def shown(measured: Baseline | None) -> str:
        return "-" if measured is None else \
            f"{measured.score:.2f} ± {measured.stderr:.2f} (floor {measured.floor:.2f}, n={measured.n})"

    known = set(task_names()) | set(CODE_TASKS)
    order = [t for family in FAMILIES.values() for t in family if t in known]
    order += [t for t in [*task_names(), *CODE_TASKS] if t not in order]
    rows = []
    for name in order:
        baselines = tuple(shown(table.get(name)) for table in MODEL_BASELINES.values())
        if name in CODE_TASKS:
            rows.append((family_of(name) or "-", name, "generative (code; needs enable_code)", "code", *baselines,
                         "HumanEval problems"))
            continue
        task = get_task(name, difficulty)
        example = task.problems("eval", 1, 0)[0]
        forms = "generative, classification" if task.has_classification else "generative"
        rows.append((family_of(name) or "-", name, forms, task.kind, *baselines,
                     f"{example.question!r} -> {example.answer!r}"))
    head = ("family", "task", "forms", "answer", *(f"{m} few-shot (small)" for m in MODEL_BASELINES),
            f"example ({difficulty})")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return 0


def _metrics() -> str:
    """The importance metrics `score` and `prune` offer (task ablation needs a task: `gradual fit` only)."""
    from gradual.importance import METRICS

    return ", ".join(m for m in METRICS if m != "task_ablation")


def score_command(argv: Sequence[str]) -> int:
    return command.run(score, argv, "gradual score", {"metrics": _metrics()})


def eval_command(argv: Sequence[str]) -> int:
    from gradual.tasks import CODE_TASKS, TASKS

    return command.run(evaluate, argv, "gradual eval", {"tasks": ", ".join([*TASKS, *CODE_TASKS])})


def prune_command(argv: Sequence[str]) -> int:
    return command.run(prune, argv, "gradual prune", {"metrics": _metrics()})


def tasks_command(argv: Sequence[str]) -> int:
    from gradual.tasks.builtin import DIFFICULTIES

    return command.run(tasks, argv, "gradual tasks", {"difficulties": ", ".join(DIFFICULTIES)})


def compare_command(argv: Sequence[str]) -> int:
    from gradual.compare import main as compare_main

    return compare_main(argv)


PLAN_USAGE = """usage: gradual plan --config FIT.yaml [fit overrides ...] [--device-memory GIB]

What a `gradual fit` run of this config needs before it runs, from the model's config alone (no weights loaded; a
local folder with config.json, the Hugging Face cache, or the built-in configs of the 7-8B models the configs name
and of the offline aliases):
per device, the student, the teacher, the trainable weights with their gradients and AdamW state, the activations
at data.batch_size x data.max_length and the loss's logits at a recovery step's peak, and the merged student with
the teacher and the evaluation's KV cache at each stage's end; disk per saved stage; recovery tokens per stage.
Exit 0 when it fits (or when nothing is there to check against), 2 with one line when it does not fit the visible
devices (CUDA devices' memory, or RAM for accelerator cpu).

  --device-memory GIB   check against devices of GIB GiB each (e.g. 80) instead of the visible ones"""


def _device_memory(argv: list[str]) -> tuple[list[str], float | None]:
    """`argv` without `--device-memory GIB` (or `=GIB`), and that value.

    Raises:
        UsageError: a value that is not a finite number > 0.
    """
    rest, value = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--device-memory" or arg.startswith("--device-memory="):
            if "=" in arg:
                text = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                text, i = argv[i + 1], i + 1
            else:
                raise UsageError("--device-memory needs a value: GiB per device, e.g. 80")
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"--device-memory {text!r} is invalid; give GiB per device, a number > 0 (e.g. 80)")
        else:
            rest.append(arg)
        i += 1
    return rest, value


def _refuse_comparison(argv: Sequence[str]) -> None:
    """A `--config` holding a `compare:` section is a comparison, which `plan` cannot size as one run: say so.

    Raises:
        UsageError: naming the file and what `plan` takes.
    """
    import yaml

    paths = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    paths += [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    for path in paths:
        if os.path.isfile(path):
            try:
                loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue  # the parser says what is wrong with it
            if isinstance(loaded, dict) and "compare" in loaded:
                raise UsageError(f"--config {path} is a `gradual compare` config; `gradual plan` takes a `gradual fit` "
                                 "config: plan one arm's run with the config compare writes for it "
                                 "(<out>/configs/<arm>-<depth>.yaml)")


def plan_command(argv: Sequence[str]) -> int:
    """Print what a fit config needs per device (`gradual.footprint`), from the model's config alone; exit 2 with
    one line when the peak does not fit the devices (the visible ones, or `--device-memory` GiB each)."""
    argv, memory = _device_memory(list(argv))
    if any(a in ("-h", "--help") for a in argv):
        print(PLAN_USAGE)
        return 0
    _refuse_comparison(argv)
    from gradual import footprint
    from gradual.lightning_cli import PlanCLI, _plain, held_logs

    with held_logs(replay=False):
        try:
            cli = PlanCLI(args=argv, run=False, parser_kwargs={"exit_on_error": False, "prog": "gradual plan"})
        except argparse.ArgumentError as e:
            raise UsageError(parser_error_line(str(e))) from None
    config = _plain(cli.config)
    shape = footprint.model_shape(config["model"]["model"], config["model"].get("trust_remote_code", False))
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    settings = footprint.settings_from_config(config, shape, gpus)
    fp = footprint.estimate(shape, settings)
    if memory is not None:
        have, device = [int(memory * footprint.GIB)] * settings.processes, f"{memory:g} GiB per device, as given"
    else:
        have, device = footprint.visible_memory(settings.accelerator)
        device = f"{settings.accelerator}: {device}"
    pool = settings.processes if settings.accelerator == "cpu" else 1  # CPU processes share one RAM
    verdict, fits = footprint.check_fit(fp, have, pool)
    print("\n".join(footprint.format_plan(fp, device, verdict)), flush=True)
    if fits is False:
        if sum(fp.evaluation.values()) >= sum(fp.training.values()):
            advice = ("the peak is each stage's end (the merged student, the teacher and the evaluation's KV cache): "
                      "lower the evaluation callbacks' batch_size (their KV cache); more DDP devices do not lower it")
        else:
            advice = "the peak is a recovery step: lower data.batch_size or data.max_length" + (
                "" if settings.quantize == "nf4" else ", quantize the student (model.quantize: nf4)") + (
                "" if settings.teacher is None or settings.teacher_quantize == "nf4"
                else ", quantize the teacher (recovery.teacher_quantize: nf4)") + \
                "; more DDP devices do not lower it"
        raise UsageError(f"plan does not fit: {verdict.removeprefix('does not fit: ')} per device ({device}); "
                         f"{advice}")
    return 0


def fit_command(argv: Sequence[str]) -> int:
    """Parse and check everything (no model loaded yet), print the plan, then run one `trainer.fit` over all stages.

    A run that fails on bad input after it started (a zero baseline on the monitored task) leaves no run
    directory behind if it created it.
    """
    import shutil

    if "--plan" in argv:  # `gradual fit --config X --plan` is `gradual plan --config X`
        return plan_command([a for a in argv if a != "--plan"])
    from gradual.lightning_cli import GradualCLI, held_logs
    from gradual.lightning_compat import rank_command

    with held_logs():  # Lightning's start-up notices print once the run is accepted
        try:
            cli = GradualCLI(args=list(argv), run=False, parser_kwargs={"exit_on_error": False})
        except argparse.ArgumentError as e:  # a value the parser rejects (type, allowed literals, unknown key)
            raise UsageError(parser_error_line(str(e))) from None
        except ValueError as e:  # jsonargparse wraps errors raised while instantiating callbacks
            raise (usage_error_in(e) or e) from None
        module = cli.model
        module.check_run_dir(cli.trainer, cli.datamodule)
    state = module.saved_state()
    if state and state.get("finished"):
        print(f"run in {module.run_dir} is already complete; see {module.run_dir / 'report.md'}")
        return 0
    if cli.trainer.is_global_zero:  # what is about to happen, before the first model loads
        from gradual.runplan import plan_lines

        print("\n".join(plan_lines(module, cli.datamodule, cli.trainer, state)), flush=True)
    existed = module.run_dir.exists()
    try:
        with rank_command(["fit", *argv]):  # the other DDP ranks run this command
            cli.trainer.fit(module, datamodule=cli.datamodule)
    except UsageError:
        if not existed and cli.trainer.is_global_zero:
            shutil.rmtree(module.run_dir, ignore_errors=True)
        raise
    if cli.trainer.is_global_zero:
        print(f"done: {module.stop_reason}; final model (stage {module.chosen_stage()}) in {module.run_dir / 'final'}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "fit": fit_command, "plan": plan_command, "score": score_command, "eval": eval_command, "prune": prune_command,
    "compare": compare_command, "tasks": tasks_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its bad input ends as one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizers' threads would warn after each fork
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
        print(f"gradual: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        return 2


if __name__ == "__main__":
    sys.exit(main())
