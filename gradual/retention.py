"""Retention: each score over its baseline, and the aggregates the stop rule can monitor.

Every evaluated task is *in-data* (its problems, any split, fed the recovery data), *near held-out* (nothing of it
did, but a task of its family did: `gradual.tasks.families`) or *far held-out* (nothing of its family did);
*held-out* is near and far together. Only held-out retention shows that a capability came back rather than was
taught, and near against far tells a taught skill carrying over to its relatives from capability coming back
untaught, so the aggregates come per group as well as over all tasks; the default monitor is the held-out
generative mean.

A group's mean is the mean of per-task retentions *capped at 1*: a task that went past the original model cannot
hide one that collapsed (uncapped, 1.50 and 0.13 average to 0.82; capped, to 0.57). Beside every mean stands the
group's worst task (`_worst`), uncapped. Where the evaluations kept per-problem scores (`items`), `intervals` gives
every score, retention and group mean its 95% paired-bootstrap interval (`gradual.intervals`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from gradual.intervals import group_figures, pooled_task_figures
from gradual.tasks.families import family_of

GROUPS = ("held_out", "in_data", "near_held_out", "far_held_out")
"""The aggregate groups; `held_out` is the union of `near_held_out` and `far_held_out`."""
LABELS = ("in_data", "near_held_out", "far_held_out")
"""The group a single task belongs to (`group_of`)."""
GROUP_TEXT = {"held_out": "held-out", "in_data": "in-data", "near_held_out": "near held-out",
              "far_held_out": "far held-out"}
"""How messages and reports name each group."""
FORMS = ("generative", "classification")
AGGREGATES = (*(f"{g}_{f}_{stat}" for stat in ("mean", "worst") for g in GROUPS for f in FORMS),
              *(f"{f}_{stat}" for stat in ("mean", "worst") for f in FORMS), "min")
DEFAULT_MONITOR = "held_out_generative_mean"
METRIC = "retention/"
"""The prefix of the retention metrics in `trainer.callback_metrics`: `retention/<score key or aggregate>`."""


def task_of(key: str) -> str:
    """The task a score key belongs to: `mc_copy` → `copy` (its classification form); other keys as they are."""
    return key[3:] if key.startswith("mc_") else key


def group_of(key: str, in_data: Collection[str]) -> str:
    """The key's label (`LABELS`), from the recovery data's tasks alone: `in_data` if its task fed the recovery data,
    `near_held_out` if not but another task of its family did, else `far_held_out`."""
    task = task_of(key)
    if task in in_data:
        return "in_data"
    family = family_of(task)
    return "near_held_out" if family is not None and any(family_of(t) == family for t in in_data) else "far_held_out"


def in_group(key: str, group: str, in_data: Collection[str]) -> bool:
    """Whether a key counts in an aggregate group (`GROUPS`): its own label, or `held_out` for either held-out one."""
    label = group_of(key, in_data)
    return label == group or (group == "held_out" and label != "in_data")


def label_text(key: str, in_data: Collection[str]) -> str:
    """The key's label as reports print it: `in-data`, `near held-out` or `far held-out`."""
    return GROUP_TEXT[group_of(key, in_data)]


def is_in_data_monitor(monitor: str, in_data: Collection[str]) -> bool:
    """Whether a monitor is computed only from in-data tasks (what recovery trained on)."""
    if monitor.startswith("in_data_"):
        return True
    return monitor not in AGGREGATES and in_group(monitor, "in_data", in_data)


def retention(scores: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]],
              in_data: Collection[str] = ()) -> dict[str, float | None]:
    """Per-key retention (score / baseline score, uncapped) and the aggregates over keys with a non-zero baseline.

    A key whose baseline score is 0 (or that has no baseline: its evaluation failed there) has no defined
    retention: it is None, and left out of every aggregate, never divided by zero. Aggregates: `<form>_mean` over
    all keys of a form and `<group>_<form>_mean` over the keys of one group (`GROUPS`, from the tasks named in
    `in_data` by `in_group`), each the mean of retentions capped at 1; `<form>_worst` and `<group>_<form>_worst`,
    the lowest retention there; `min` over all keys. An aggregate with no key is absent.
    """
    per_key = {k: v["score"] / baseline[k]["score"] for k, v in scores.items()
               if k in baseline and baseline[k]["score"] > 0}
    out: dict[str, float | None] = dict(per_key)
    for name, keys in groups(scores, per_key, in_data).items():
        out[f"{name}_mean"] = sum(min(1.0, per_key[k]) for k in keys) / len(keys)
        out[f"{name}_worst"] = min(per_key[k] for k in keys)
    if per_key:
        out["min"] = min(per_key.values())
    out.update({k: None for k in scores if k not in per_key})
    return out


def groups(scores: dict[str, dict[str, Any]], keys: Collection[str], in_data: Collection[str]) -> dict[str, list[str]]:
    """The non-empty aggregate groups over `keys`: `<form>` and `<group>_<form>` → their keys, in score order."""
    out: dict[str, list[str]] = {}
    for form in FORMS:
        of_form = [k for k in scores if k in keys and scores[k]["form"] == form]
        if of_form:
            out[form] = of_form
        for group in GROUPS:
            members = [k for k in of_form if in_group(k, group, in_data)]
            if members:
                out[f"{group}_{form}"] = members
    return out


def intervals(scores: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]],
              in_data: Collection[str] = (), seed: int = 0) -> dict[str, dict[str, Any]]:
    """95% intervals by paired bootstrap over the problems, for the keys whose evaluation kept per-problem scores
    (`items`) at this stage and at the baseline, on the same problems: per key `{score, score_ci, retention,
    retention_ci}`; per group (`<group>_<form>`, `<form>`) `{mean, mean_ci, worst, worst_task, worst_ci, tasks}`.
    Intervals are `[low, high]`, an end None where unbounded (a baseline that scores 0 on a resample)."""
    return pooled_intervals([scores], baseline, in_data, seed)


def pooled_intervals(seed_scores: Sequence[dict[str, dict[str, Any]]], baseline: dict[str, dict[str, Any]],
                     in_data: Collection[str] = (), seed: int = 0) -> dict[str, dict[str, Any]]:
    """`intervals` of one recipe trained under several seeds (their scores in `seed_scores`, one dict per seed):
    scores are the means over seeds and every interval resamples seeds and problems, so it includes the seed-to-seed
    spread (`gradual.intervals.pooled_task_figures`). A key counts where every seed kept items on the baseline's
    problems. One seed gives the single-run intervals."""
    first = seed_scores[0]
    figures = {k: pooled_task_figures([s[k]["items"] for s in seed_scores], baseline[k]["items"], key=k, seed=seed)
               for k in first if k in baseline and baseline[k].get("items")
               and all(len((s.get(k) or {}).get("items") or ()) == len(baseline[k]["items"]) for s in seed_scores)}
    out: dict[str, dict[str, Any]] = {k: f.to_dict() for k, f in figures.items()}
    defined = [k for k, f in figures.items() if f.retention is not None]
    for name, keys in groups(first, defined, in_data).items():
        group = group_figures({k: figures[k] for k in keys})
        if group is not None:
            out[name] = group.to_dict()
    return out


def monitor_interval(intervals: dict[str, dict[str, Any]], monitor: str) -> list[float | None] | None:
    """The 95% interval of a monitored value: a task's retention, a group's capped mean (`<group>_mean`) or its
    worst task (`<group>_worst`); None where there is none (no per-problem scores, or `min`)."""
    if monitor in intervals:
        return intervals[monitor].get("retention_ci")
    for stat in ("mean", "worst"):
        if monitor.endswith(f"_{stat}") and monitor[: -len(stat) - 1] in intervals:
            return intervals[monitor[: -len(stat) - 1]].get(f"{stat}_ci")
    return None


def with_interval(value: float, ci: Sequence[float | None] | None, digits: int = 2) -> str:
    """`0.71 [0.58, 0.83]` (an unbounded end as ∞), or the value alone without an interval."""
    if not ci:
        return f"{value:.{digits}f}"
    lo, hi = ci
    return (f"{value:.{digits}f} [{'-∞' if lo is None else f'{lo:.{digits}f}'}, "
            f"{'∞' if hi is None else f'{hi:.{digits}f}'}]")


def undefined(baseline: dict[str, dict[str, Any]]) -> list[str]:
    """Score keys whose baseline is 0: their retention is undefined, reported as null and left out of the means."""
    return [k for k, v in baseline.items() if v["score"] <= 0]
