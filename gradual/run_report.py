"""Run reports: `results.json`, `report.md` (a table per stage) and `retention.png`, each written atomically (a
crash or a full disk leaves the previous version, never a torn file)."""

from __future__ import annotations

import io
import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gradual.retention import group_of, task_of, with_interval
from gradual.rundir import atomic_write_bytes

FAILURES = ("wrong_value", "no_answer", "unbalanced_brackets", "repetition")


GROUP_COLUMNS = (("held_out_generative_mean", "held-out gen."), ("near_held_out_generative_mean", "near held-out gen."),
                 ("far_held_out_generative_mean", "far held-out gen."), ("in_data_generative_mean", "in-data gen."),
                 ("held_out_classification_mean", "held-out cls."),
                 ("near_held_out_classification_mean", "near held-out cls."),
                 ("far_held_out_classification_mean", "far held-out cls."),
                 ("in_data_classification_mean", "in-data cls."))
"""The group means a report shows, where any record has them: held-out (near and far together) first."""


def _group_cell(record: dict[str, Any], key: str) -> str:
    """A group's capped mean retention with its 95% interval, and its worst task: `0.71 [0.58, 0.83]; worst
    products 0.13`."""
    value = record.get("retention", {}).get(key)
    if value is None:
        return "-"
    group = (record.get("intervals") or {}).get(key.removesuffix("_mean"), {})
    worst = record["retention"].get(key.replace("_mean", "_worst"))
    cell = with_interval(value, group.get("mean_ci"))
    if group.get("worst_task") and group.get("tasks", 0) > 1:
        cell += f"; worst {group['worst_task']} {with_interval(worst, group.get('worst_ci'))}"
    return cell


def stage_table(history: Sequence[dict[str, Any]], in_data: Collection[str] = ()) -> str:
    """One row per stage: depth, layers removed (original indices), each group's mean retention (capped at 1 per
    task) with its 95% interval and worst task, each score with its retention. In-data task columns are marked `*`."""
    keys = list(history[0]["scores"])
    groups = [(k, name) for k, name in GROUP_COLUMNS if any(k in r.get("retention", {}) for r in history)]
    head = (["stage", "depth", "removed", "loss"] + [name for _, name in groups]
            + [k + ("*" if group_of(k, in_data) == "in_data" else "") for k in keys] + ["monitor ok"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in history:
        cells = [str(r["stage"]), str(r["depth"]), ",".join(map(str, r["removed_total"])) or "-",
                 f"{r['loss']:.3f}" if r.get("loss") is not None else "-"]
        cells += [_group_cell(r, k) for k, _ in groups]
        for k in keys:
            s = r["scores"].get(k)
            ret = r.get("retention", {}).get(k)
            cells.append("-" if s is None else f"{s['score']:.3f}" + (f" ({ret:.2f})" if ret is not None else ""))
        ok = r.get("meets_threshold")
        cells.append("-" if ok is None else ("yes" if ok else "**no**"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def failure_table(history: Sequence[dict[str, Any]]) -> str:
    """Failure categories of the generative answers per stage and task: the paper's diagnosis, counted."""
    rows = ["| stage | task | " + " | ".join(FAILURES) + " |", "|" + "---|" * (len(FAILURES) + 2)]
    for r in history:
        for key, s in r["scores"].items():
            if s.get("form") == "generative" and s.get("failures"):
                rows.append(f"| {r['stage']} | {key} | " + " | ".join(str(s["failures"].get(f, 0)) for f in FAILURES)
                            + " |")
    return "\n".join(rows)


def undefined_retention(history: Sequence[dict[str, Any]]) -> list[str]:
    """Score keys whose retention is undefined: a baseline score of 0, or no baseline score (its evaluation failed
    there). Reported as null and left out of the means."""
    baseline = history[0]["scores"]
    keys = {k for r in history for k in r["scores"]}
    return sorted(k for k in keys if k not in baseline or baseline[k]["score"] <= 0)


def error_table(history: Sequence[dict[str, Any]]) -> str:
    """What could not be measured or trained, per stage: evaluations that raised, stages abandoned."""
    rows = ["| stage | what | error |", "|---|---|---|"]
    for r in history:
        for key, message in (r.get("errors") or {}).items():
            rows.append(f"| {r['stage']} | {key} | {message.replace('|', '/')} |")
    return "\n".join(rows)


def plot_retention(history: Sequence[dict[str, Any]], path: Path | BinaryIO, title: str = "") -> None:
    """Retention of every score vs layers removed; solid = generative, dashed = classification. A key with an
    undefined retention (baseline 0) has no line.

    A bare `Figure` renders through Agg when saved as PNG, so no global matplotlib backend is chosen."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    keys = [k for k, v in history[0]["scores"].items() if v["score"] > 0]
    for key in keys:
        points = [(0, 1.0)] + [(len(r["removed_total"]), r["retention"][key]) for r in history[1:]
                               if (r.get("retention") or {}).get(key) is not None]
        xs, ys = [x for x, _ in points], [y for _, y in points]
        form = history[0]["scores"][key].get("form")
        ax.plot(xs, ys, marker="o", linestyle="-" if form == "generative" else "--", label=key)
    held_out = [(len(r["removed_total"]), r["retention"]["held_out_generative_mean"],
                 (r.get("intervals") or {}).get("held_out_generative", {}).get("mean_ci"))
                for r in history[1:] if (r.get("retention") or {}).get("held_out_generative_mean") is not None]
    if held_out:  # the stop rule's default monitor, capped mean, with its 95% interval band
        xs = [0] + [x for x, _, _ in held_out]
        ax.plot(xs, [1.0] + [y for _, y, _ in held_out], color="black", linewidth=2.5, label="held-out gen. (mean)")
        band = [(x, ci[0], ci[1]) for x, _, ci in held_out if ci and None not in ci]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color="black",
                            alpha=0.12, linewidth=0)
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layers removed")
    ax.set_ylabel("retention (score / baseline)")
    ax.set_title(title or "retention vs layers removed")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")


def write_report(run_dir: Path, history: Sequence[dict[str, Any]], final_stage: int | None,
                 stop_reason: str | None, config: dict[str, Any], in_data: Collection[str] = (),
                 recovery_data: list[dict[str, Any]] | None = None) -> None:
    """Write results.json, report.md and retention.png into the run directory.

    `in_data` names the tasks whose problems fed recovery; every other evaluated task is held-out, near or far by
    its family (`gradual.retention.group_of`). `recovery_data` describes each source of the recovery data
    (`GradualDataModule.describe`).
    """
    run_dir = Path(run_dir)
    tasks = sorted({task_of(k) for r in history for k in r["scores"]})
    held_out = [t for t in tasks if t not in in_data]
    near, far = ([t for t in held_out if group_of(t, in_data) == label] for label in ("near_held_out", "far_held_out"))
    undefined = undefined_retention(history)
    notes = [f"retention of {k} is undefined (baseline score {'0' if k in history[0]['scores'] else 'missing'}): "
             "null in every stage and left out of the means" for k in undefined]
    errors = [f"stage {r['stage']}: {key}: {message}" for r in history
              for key, message in (r.get("errors") or {}).items()]
    results = {"config": config, "final_stage": final_stage, "stop_reason": stop_reason,
               "in_data_tasks": sorted(in_data), "held_out_tasks": held_out, "near_held_out_tasks": near,
               "far_held_out_tasks": far, "recovery_data": recovery_data,
               "undefined_retention": undefined, "errors": errors, "notes": notes, "stages": list(history)}
    atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=2).encode())
    plot = io.BytesIO()
    plot_retention(history, plot, title=str(config.get("model", "")))
    atomic_write_bytes(run_dir / "retention.png", plot.getvalue())
    final = history[final_stage] if final_stage is not None else history[-1]
    lines = [f"# gradual run: {config.get('model')}", "",
             f"- final model: stage {final['stage']} ({final['depth']} layers, removed original layers "
             f"{final['removed_total'] or 'none'})" + (" in `final/`" if final_stage is not None else ""),
             f"- stop: {stop_reason or 'still running'}",
             f"- held-out tasks (nothing of them fed recovery): {', '.join(held_out) or 'none'}",
             f"  - near held-out (a task of their family fed recovery): {', '.join(near) or 'none'}",
             f"  - far held-out (nothing of their family did): {', '.join(far) or 'none'}",
             f"- in-data tasks (their problems fed recovery; marked *): {', '.join(sorted(in_data)) or 'none'}",
             *[f"- recovery data: {d['name']} ({d['kind']}"
               f"{', self-generated answers' if d.get('answers') == 'self' else ''}), {d['share']:.0%} of every stage, "
               f"{d.get('examples', '?')} examples, tasks: {', '.join(d.get('tasks') or []) or 'none'}"
               for d in recovery_data or []], "",
             "Scores per stage, retention against stage 0 in brackets; group columns are mean retentions, each "
             "task's capped at 1 so that no task pays for another, with 95% intervals by paired bootstrap over the "
             "problems and the group's worst task. Only held-out retention shows capability coming back rather than "
             "being taught; near held-out against far tells a taught skill carrying over to its family from "
             "capability coming back untaught:", "",
             stage_table(history, in_data), "",
             *[f"- {note}" for note in notes], *([""] if notes else []),
             *(["Errors (what could not be measured or trained; other scores are kept):", "", error_table(history),
                ""] if errors else []),
             "Failure categories of generative answers:", "", failure_table(history), "",
             "![retention](retention.png)", ""]
    atomic_write_bytes(run_dir / "report.md", "\n".join(lines).encode())
