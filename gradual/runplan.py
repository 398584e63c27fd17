"""What a `gradual fit` run is about to do, said before any model loads: a default run of `gradual fit` trains for
tens of minutes, and a typo in a config can make it hours. `plan_lines` names the model, the stages and their
recovery steps, the recovery data, the evaluation and stop rule, the run directory and a rough time estimate with
what it rests on; `gradual fit` prints them on rank 0 (every line starts with `plan:`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Trainer

from gradual import models


@dataclass(frozen=True)
class StepReference:
    """A measured recovery step that training time is estimated from (`docs/bench.md`: `sft_step_s`, `kd_step_s`):
    SmolLM2-135M-Instruct with one of its 30 layers removed and LoRA r 16 on every projection, one batch of the
    demo's recovery data (8 few-shot documents padded to 159 tokens), float32, best of 3 rounds."""

    model: str = "SmolLM2-135M-Instruct"
    weights: int = 130_974_912  # the weights its forward multiplies by with 29 layers (`models.compute_parameters`)
    positions: int = 8 * 159  # token positions of the batch, padding included: what a step's cost scales with
    seconds: dict[str, float] = field(default_factory=lambda: {"sft": 11.99, "kd": 18.59})
    machine: str = "1 torch thread of a busy 2-vCPU AMD EPYC"


REFERENCE = StepReference()


def plan_lines(module: Any, datamodule: Any, trainer: Trainer, state: dict[str, Any] | None = None) -> list[str]:
    """The run's plan in a few lines, from the built module, data module and trainer (no model loaded); `state`:
    the run directory's saved state when the run resumes."""
    done = _stages_done(state)
    lines = [_model_line(module, trainer), _removal_line(module, datamodule, trainer), _recovery_line(module,
                                                                                                          datamodule),
             _evaluation_line(trainer), _run_dir_line(module, done)]
    return [f"plan: {line}" for line in [*lines, *_estimate_lines(module, datamodule, trainer, done)]]


def _stages_done(state: dict[str, Any] | None) -> int:
    """The stages a resumed run keeps (it continues after its `resume_from` stage); 0 for a fresh run."""
    resume = (state or {}).get("resume_from")
    return int(resume.rsplit("_", 1)[1]) if isinstance(resume, str) and resume.rsplit("_", 1)[-1].isdigit() else 0


def _device(trainer: Trainer) -> str:
    try:
        device = trainer.strategy.root_device.type
    except (AttributeError, RuntimeError):
        device = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    return f"{device} x {trainer.world_size} processes" if trainer.world_size > 1 else device


def _model_line(module: Any, trainer: Trainer) -> str:
    quantized = f", {module.quantize} base" if module.quantize else ""
    return f"model {module.model_name} ({module.depth0} layers, {module.dtype_name}{quantized}) on {_device(trainer)}"


def _positions(datamodule: Any) -> int:
    """Token positions per training example at most: `data.max_length`, capped at the model's positions."""
    limit = getattr(datamodule, "max_length", 0) or 0
    cap = getattr(datamodule, "max_positions", None)
    return min(limit, cap) if cap else limit


def _removal_line(module: Any, datamodule: Any, trainer: Trainer) -> str:
    schedule, plan = module.schedule, module.plan
    total = sum(k for k, _ in plan)
    how = (f"original layers {', '.join(map(str, schedule.layers[:total]))}" if schedule.layers is not None
           else f"chosen by {_selection(module.selection)}")
    groups: list[tuple[int, int, int]] = []  # (count, layers, steps) of consecutive equal stages
    for k, steps in plan:
        if groups and groups[-1][1:] == (k, steps):
            groups[-1] = (groups[-1][0] + 1, k, steps)
        else:
            groups.append((1, k, steps))
    parts = [f"{n} x ({k} layer{'s' if k > 1 else ''}, {steps} steps)" if k else f"consolidation ({steps} steps)"
             for n, k, steps in groups]
    batch = getattr(datamodule, "batch_size", 0) * trainer.accumulate_grad_batches
    per_rank = " per process" if trainer.world_size > 1 else ""
    removals = [steps for k, steps in plan if k]
    growth = (f" (steps_growth {schedule.steps_growth:g}: {sum(removals)} removal steps, as {len(removals)} x "
              f"{schedule.steps_per_stage})" if schedule.steps_growth != 1 else "")
    return (f"remove {total} of {module.depth0} layers, {schedule.mode} mode, {how}: {len(plan)} stage"
            f"{'s' if len(plan) != 1 else ''} = {' + '.join(parts)}{growth}; a step trains {batch} examples"
            f"{per_rank} of <= {_positions(datamodule)} tokens")


def _selection(selection: Any) -> str:
    """The metric, with what `task_ablation` scores and whether the unpruned model's ranking is kept."""
    what = selection.metric
    if what == "task_ablation":
        what += (f" ({selection.task_score} on {selection.n} selection-split problems of "
                 f"{_names(selection.tasks or [])}, {selection.fmt})")
    return what + ("" if selection.rescore else ", ranked once on the unpruned model")


def _names(items: Sequence[str], most: int = 6) -> str:
    shown = ", ".join(items[:most])
    return f"{shown}, ... ({len(items)} in all)" if len(items) > most else shown


def _source(row: dict[str, Any], sgr: Any) -> str:
    """One recovery source: its share of every stage and what it holds."""
    tasks = f" of {_names(row['tasks'])}" if row.get("tasks") else ""
    if row["kind"] == "sgr":
        if sgr is not None and sgr.responses == "dataset":
            held = f"{row['prompts']} prompts{tasks} with the dataset's responses"
        else:
            teacher = "each stage's starting model" if sgr is not None and sgr.teacher == "previous" \
                else "the original model"
            held = f"{row['prompts']} prompts{tasks}, answered by {teacher} before training, cached"
    elif row["kind"] == "sdft":
        held = f"{row['prompts']} problems{tasks}, reference answers rewritten by the teacher before training"
    elif row["kind"] == "tasks" and row.get("answers") == "self":
        teacher = "each stage's starting model" if sgr is not None and sgr.teacher == "previous" \
            else "the original model"
        held = (f"{row['documents']} few-shot prompts{tasks} with self-generated answers of {teacher} (greedy, "
                "before training, cached)")
    elif row["kind"] == "tasks":
        held = f"{row['documents']} few-shot documents{tasks}"
    elif row["kind"] == "self_text":
        teacher = "each stage's starting model" if sgr is not None and sgr.teacher == "previous" \
            else "the original model"
        held = (f"{row['texts']} continuations of built-in openings written by {teacher} (sampled at temperature "
                f"{row['temperature']:g}, top-p {row['top_p']:g}, up to {row['max_new_tokens']} tokens, before "
                "training, cached)")
    else:
        held = f"{row['texts']} texts of {row.get('path') or 'the built-in texts'}"
    return f"{row['name']} {row['share']:.0%} ({held})"


def _recovery_line(module: Any, datamodule: Any) -> str:
    recovery = module.recovery
    if all(steps == 0 for _, steps in module.plan):
        return "recovery: none (steps_per_stage: 0)"
    weights = f"LoRA adapters (r {module.lora.r})" if recovery.params == "lora" else f"{recovery.params} weights"
    rows = datamodule.describe() if hasattr(datamodule, "describe") else []
    sgr = getattr(datamodule, "sgr", None)
    data = "; ".join(_source(row, sgr) for row in rows) or type(datamodule).__name__
    teacher = ", from each stage's starting model (a copy)" if recovery.teacher == "previous" else ""
    on_policy = (f"; on-policy (GKD) on {recovery.on_policy:.0%} of batches: the student continues their prompts "
                 f"(up to {recovery.on_policy_tokens} tokens), forward KL to the teacher on its tokens"
                 if recovery.on_policy > 0 else "")
    return f"recovery: {recovery.loss} loss{teacher} on {weights}{on_policy}; data: {data}"


def _evaluation_line(trainer: Trainer) -> str:
    from gradual.callbacks import LmEvalEvaluation, RetentionStopping, TaskEvaluation

    evaluated, rule = [], None
    for cb in trainer.callbacks:
        if isinstance(cb, TaskEvaluation):
            evaluated.append(f"{_names(cb.tasks)} ({cb.n} problems each, {' + '.join(cb.forms)})")
        elif isinstance(cb, LmEvalEvaluation):
            limit = f", {cb.limit} items each" if cb.limit else ""
            evaluated.append(f"lm-eval {_names(cb.tasks)}{limit}")
        elif isinstance(cb, RetentionStopping):
            rule = cb
    what = "; ".join(evaluated) or "nothing (no evaluation callback in trainer.callbacks)"
    stop = (f"stop and roll back when {rule.key} retention < {rule.threshold}" if rule is not None
            else "no stop rule (no RetentionStopping): every planned stage runs")
    return f"evaluation: {what}; {stop}"


def _run_dir_line(module: Any, done: int) -> str:
    if done:
        left = len(module.plan) - done
        return f"run dir {module.run_dir} (resumes after stage {done}: {left} of {len(module.plan)} stages left)"
    return f"run dir {module.run_dir}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def step_seconds(loss: str, weights: int, positions: int, reference: StepReference = REFERENCE) -> float:
    """A recovery step's rough time: the reference step of the same loss (`kd+sft` costs what `kd` does), scaled
    by the weights its forward multiplies by and the token positions of a step."""
    base = reference.seconds["sft" if loss == "sft" else "kd"]
    return base * weights / reference.weights * positions / reference.positions


def _estimate_lines(module: Any, datamodule: Any, trainer: Trainer, done: int) -> list[str]:
    """The training time of the stages left, from `REFERENCE`; said to be rough, and what it leaves out."""
    remaining = module.plan[done:]
    steps = sum(s for _, s in remaining)
    if not steps:
        return ["estimate: no training steps; the time goes to scoring, evaluation and saving"]
    device = _device(trainer)
    if not device.startswith("cpu"):
        return [f"estimate: none for {device} (the measured reference step is a CPU one); the progress lines give "
                "each stage's time left once it trains"]
    counts = models.compute_parameters(module.model_name, module.trust_remote_code)
    if counts is None:
        return ["estimate: none (the model's config could not be read to size it)"]
    total, in_layers = counts
    per_layer = in_layers / max(1, module.depth0)
    positions = datamodule.batch_size * trainer.accumulate_grad_batches * _positions(datamodule)
    removed = sum(k for k, _ in module.plan[:done])
    seconds = 0.0
    for k, n in remaining:
        removed += k
        loss = "kd" if k == 0 else module.recovery.loss  # a consolidation stage distils
        seconds += n * step_seconds(loss, int(total - per_layer * removed), positions)
    ref = REFERENCE
    measured = ", ".join(f"{loss} {s:.1f} s" for loss, s in ref.seconds.items())
    threads = torch.get_num_threads()
    return [f"estimate: training at most {_duration(seconds)} ({steps} steps x <= {seconds / steps:.3g} s, every "
            f"example filling max_length {_positions(datamodule)}; shorter ones train faster, and the progress lines "
            "show the real pace); scoring, evaluation and recovery-data generation come on top",
            f"estimate: rough, scaled by weights x token positions from a step of {ref.model} measured at "
            f"{measured} ({ref.positions} positions, LoRA, float32, {ref.machine}; docs/bench.md); this machine: "
            f"{os.cpu_count()} CPUs, {threads} torch thread{'s' if threads != 1 else ''}"
            + ("; on-policy generation comes on top" if module.recovery.on_policy > 0 else "")]
