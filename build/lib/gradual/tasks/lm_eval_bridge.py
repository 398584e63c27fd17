"""Any lm-eval task, run on the live (pruned, healed) model object through lm-eval's HFLM.

Stock task names work where their data is reachable; a local YAML task directory (`include_path`) with
`dataset_path: json` and `data_files` runs fully offline. Each task's main metric (the first entry of its
`metric_list`, e.g. acc or exact_match) becomes the TaskResult score, so lm-eval results sit in the same tables
and retention checks as the built-in tasks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.tasks.result import TaskResult


def _main_metric(task_results: dict, config: dict | None) -> tuple[str, float] | None:
    """(metric key, value): the config's first listed metric under any filter, else the first numeric metric."""
    numeric = {k: v for k, v in task_results.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if config and config.get("metric_list"):
        wanted = config["metric_list"][0]["metric"]
        for key, value in numeric.items():
            if key.split(",")[0] == wanted:
                return key, float(value)
    for key, value in numeric.items():
        return key, float(value)
    return None


_MANAGERS: dict[tuple[str | None, bool], object] = {}


def _task_manager(include_path: str | None, include_defaults: bool):
    """A cached lm-eval TaskManager: indexing lm-eval's thousands of stock YAMLs takes half a minute, and the
    evaluation callback asks for the same index after every stage."""
    from lm_eval.tasks import TaskManager

    key = (include_path, include_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=include_path, include_defaults=include_defaults)
    return _MANAGERS[key]


def _manager_for(tasks: Sequence[str], include_path: str | None, include_defaults: bool | None):
    """The TaskManager that knows every one of `tasks`: the local directory's alone when it holds them all (or
    `include_defaults=False`), else one with lm-eval's stock tasks too (`include_defaults` None or True).

    Raises:
        UsageError: `include_path` is not a directory, or a task is found in neither.
    """
    if include_path is not None and not os.path.isdir(include_path):
        raise UsageError(f"include_path {include_path!r} is not a directory of lm-eval YAML tasks")
    manager = _task_manager(include_path, False) if include_path is not None and include_defaults is not True else None
    if manager is None or (include_defaults is None and not all(manager.match_tasks([t]) for t in tasks)):
        manager = _task_manager(include_path, True)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UsageError(f"lm-eval task(s) {', '.join(map(repr, unknown))} not found"
                         f"{' under ' + include_path if include_path else ''}; see `lm-eval ls tasks`")
    return manager


def check_lm_eval_tasks(names: Sequence[str], include_path: str | None, option: str) -> None:
    """Refuse a missing `include_path` and unknown lm-eval task names before any model loads (`gradual eval` and
    `LmEvalEvaluation` in `gradual fit`), naming `option`. The task index is built as `evaluate_lm_eval` builds it
    and cached, so the evaluation reuses it: a typo costs the index (up to half a minute), not a model load as well.
    """
    try:
        _manager_for(names, include_path, None)
    except UsageError as e:
        raise UsageError(f"{option}: {e}") from None


def evaluate_lm_eval(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str],
                     limit: int | float | None = None, num_fewshot: int | None = None,
                     include_path: str | None = None, batch_size: int = 16, seed: int = 0,
                     records: bool = False, include_defaults: bool | None = None) -> dict[str, TaskResult]:
    """Run lm-eval `tasks` on the live model; one TaskResult per task (and per group lm-eval reports).

    `include_defaults=None` indexes lm-eval's stock tasks only when `include_path` does not hold every requested
    task; False never does (offline use). `failures` holds {"correct", "wrong"} counts where the main metric is a
    per-item 0/1 accuracy; per-item records (lm-eval's logged samples) are kept when `records` is on.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise UsageError("no lm-eval tasks given; name at least one (a stock task or one under include_path)")
    if include_path is None and include_defaults is False:
        raise UsageError("include_defaults=False needs include_path (a directory of local lm-eval YAML tasks)")
    manager = _manager_for(tasks, include_path, include_defaults)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=True, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      bootstrap_iters=0)
    finally:
        model.train(was_training)
    results: dict[str, TaskResult] = {}
    for name, task_results in out["results"].items():
        main = _main_metric(task_results, out.get("configs", {}).get(name))
        if main is None:
            continue
        key, score = main
        samples = sorted(out.get("samples", {}).get(name, []), key=lambda s: s.get("doc_id", 0))
        n = int(out.get("n-samples", {}).get(name, {}).get("effective", len(samples)))
        metric = key.split(",")[0]
        per_item = [s.get(metric) for s in samples]
        failures = {}
        if per_item and all(v in (0, 1, 0.0, 1.0, True, False) for v in per_item):
            correct = int(sum(bool(v) for v in per_item))
            failures = {"correct": correct, "wrong": len(per_item) - correct}
        items = None
        if records:
            items = [dict(doc_id=s.get("doc_id"), target=s.get("target"), response=s.get("filtered_resps"),
                          score=None if s.get(metric) is None else float(s[metric])) for s in samples]
        output_type = out.get("configs", {}).get(name, {}).get("output_type")
        form = "generative" if output_type == "generate_until" else "classification"
        numeric = [float(v) for v in per_item if isinstance(v, (int, float))]
        scores = numeric if per_item and len(numeric) == len(per_item) == n else None
        results[name] = TaskResult(name, form, score, n, failures, f"lm-eval {key}", items, items=scores)
    return results
