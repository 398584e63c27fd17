"""Retention: each score over its baseline, and the aggregates the stop rule can monitor.

Every evaluated task is *in-data* (its problems, any split, fed the recovery data) or *held-out* (nothing of it
did). Only held-out retention shows that a capability came back rather than was taught, so the aggregates come per
group as well as over all tasks, and the default monitor is the held-out generative mean.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

GROUPS = ("held_out", "in_data")
FORMS = ("generative", "classification")
AGGREGATES = (*(f"{g}_{f}_mean" for g in GROUPS for f in FORMS), "generative_mean", "classification_mean", "min")
DEFAULT_MONITOR = "held_out_generative_mean"
METRIC = "retention/"
"""The prefix of the retention metrics in `trainer.callback_metrics`: `retention/<score key or aggregate>`."""


def task_of(key: str) -> str:
    """The task a score key belongs to: `mc_copy` → `copy` (its classification form); other keys as they are."""
    return key[3:] if key.startswith("mc_") else key


def group_of(key: str, in_data: Collection[str]) -> str:
    """`in_data` if the key's task fed the recovery data, else `held_out`."""
    return "in_data" if task_of(key) in in_data else "held_out"


def is_in_data_monitor(monitor: str, in_data: Collection[str]) -> bool:
    """Whether a monitor is computed only from in-data tasks (what recovery trained on)."""
    if monitor.startswith("in_data_"):
        return True
    return monitor not in AGGREGATES and group_of(monitor, in_data) == "in_data"


def retention(scores: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]],
              in_data: Collection[str] = ()) -> dict[str, float | None]:
    """Per-key retention (score / baseline score) and the aggregates over keys with a non-zero baseline.

    A key whose baseline score is 0 (or that has no baseline: its evaluation failed there) has no defined
    retention: it is None, and left out of every aggregate, never divided by zero. Aggregates: `<form>_mean` over
    all keys of a form, `<group>_<form>_mean` over the keys of one group (`in_data` tasks are those named in
    `in_data`), `min` over all keys. An aggregate with no key is absent.
    """
    per_key = {k: v["score"] / baseline[k]["score"] for k, v in scores.items()
               if k in baseline and baseline[k]["score"] > 0}
    out: dict[str, float | None] = dict(per_key)
    for form in FORMS:
        keys = [k for k in per_key if scores[k]["form"] == form]
        if keys:
            out[f"{form}_mean"] = sum(per_key[k] for k in keys) / len(keys)
        for group in GROUPS:
            in_group = [k for k in keys if group_of(k, in_data) == group]
            if in_group:
                out[f"{group}_{form}_mean"] = sum(per_key[k] for k in in_group) / len(in_group)
    if per_key:
        out["min"] = min(per_key.values())
    out.update({k: None for k in scores if k not in per_key})
    return out


def undefined(baseline: dict[str, dict[str, Any]]) -> list[str]:
    """Score keys whose baseline is 0: their retention is undefined, reported as null and left out of the means."""
    return [k for k, v in baseline.items() if v["score"] <= 0]
