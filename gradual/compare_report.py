"""The outputs of `gradual compare`: `compare.json`, `compare.md` (tables) and `compare.png` (retention curves).

A *point* is one arm at one target depth: `{"arm", "removed", "layers", "stage", "run", "reused", "steps",
"examples", "data", "scores", "retention"}`. A *curve* is every stage an arm's runs recorded, as
`{"removed", "retention"}` entries, so a gradual arm draws a point per stage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AGGREGATES = (("generative_mean", "generative"), ("classification_mean", "classification"))


def _cell(point: dict[str, Any], key: str) -> str:
    s = point["scores"].get(key)
    ret = point["retention"].get(key)
    return "-" if s is None else f"{s['score']:.2f}" + (f" ({ret:.2f})" if ret is not None else "")


def _ret(point: dict[str, Any], key: str) -> str:
    value = point["retention"].get(key)
    return "-" if value is None else f"{value:.2f}"


def summary_table(points: Sequence[dict[str, Any]]) -> str:
    """Per arm and depth: the layers removed, the training budget, whether the data matched, the mean retentions.

    "same prompts" compares the multiset of training prompts with the first trained arm at that depth.
    """
    head = ["removed", "arm", "mode", "responses", "layers removed (original)", "steps", "examples",
            "same prompts", "generative retention", "classification retention"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reference: dict[int, str] = {}
    for p in points:
        if p["examples"]:
            reference.setdefault(p["removed"], p["data"])
        same = "-" if not p["examples"] else ("yes" if p["data"] == reference[p["removed"]] else "**no**")
        arm = p["arm"] + (f" (stage {p['stage']} of {p['run']})" if p["reused"] else "")
        rows.append("| " + " | ".join([str(p["removed"]), arm, p["mode"], p["responses"] if p["steps"] else "-",
                                       ",".join(map(str, p["layers"])), str(p["steps"]), str(p["examples"]), same,
                                       _ret(p, "generative_mean"), _ret(p, "classification_mean")]) + " |")
    return "\n".join(rows)


def scores_table(baseline: dict[str, dict[str, Any]], points: Sequence[dict[str, Any]]) -> str:
    """Arm × task: score with retention in brackets; the first row is the unpruned baseline."""
    keys = list(baseline)
    rows = ["| removed | arm | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2),
            "| 0 | baseline | " + " | ".join(f"{baseline[k]['score']:.2f}" for k in keys) + " |"]
    for p in points:
        rows.append(f"| {p['removed']} | {p['arm']} | " + " | ".join(_cell(p, k) for k in keys) + " |")
    return "\n".join(rows)


def failure_categories(scores: dict[str, dict[str, Any]]) -> list[str]:
    """Failure categories of the generative answers, in first-seen order ("correct" first)."""
    seen: dict[str, None] = {}
    for s in scores.values():
        if s.get("form") == "generative":
            seen.update(dict.fromkeys(s.get("failures", {})))
    return sorted(seen, key=lambda c: c != "correct")


def failure_table(baseline: dict[str, dict[str, Any]], points: Sequence[dict[str, Any]]) -> str:
    """How the generative answers failed, summed over the generative tasks: the paper's diagnosis, counted."""
    categories = failure_categories(baseline)
    rows = ["| removed | arm | " + " | ".join(categories) + " |", "|" + "---|" * (len(categories) + 2)]
    for removed, arm, scores in [(0, "baseline", baseline)] + [(p["removed"], p["arm"], p["scores"]) for p in points]:
        total = dict.fromkeys(categories, 0)
        for s in scores.values():
            if s.get("form") == "generative":
                for c, n in s.get("failures", {}).items():
                    total[c] = total.get(c, 0) + n
        rows.append(f"| {removed} | {arm} | " + " | ".join(str(total[c]) for c in categories) + " |")
    return "\n".join(rows)


def plot_compare(curves: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """Retention vs layers removed, one line per arm; a panel for each aggregate the tasks have."""
    panels = [(key, form) for key, form in AGGREGATES
              if any(key in c["retention"] for curve in curves.values() for c in curve)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.5), squeeze=False)
    for ax, (key, form) in zip(axes[0], panels, strict=False):
        for arm, curve in curves.items():
            pts = sorted((c["removed"], 1.0 if c["removed"] == 0 else c["retention"].get(key)) for c in curve)
            pts = [(x, y) for x, y in pts if y is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=arm)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_xlabel("layers removed")
        ax.set_ylabel(f"{form} retention (mean score / baseline)")
        ax.set_title(f"{title}: {form}" if title else form)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timing_table(timings: dict[str, Any]) -> str:
    """Wall time of the shared preparation and of every run (steps: optimizer steps taken by this invocation)."""
    rows = ["| run | minutes | optimizer steps |", "|---|---|---|",
            f"| shared baseline + ranking | {timings['prepare_s'] / 60:.1f} | - |"]
    for name, r in timings["runs"].items():
        steps = "-" if r["optimizer_steps"] is None else str(r["optimizer_steps"])
        rows.append(f"| {name} | {r['seconds'] / 60:.1f} | {steps} |")
    rows.append(f"| total (this invocation) | {timings['total_s'] / 60:.1f} | |")
    return "\n".join(rows)


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    """compare.json (everything), compare.md (the tables) and compare.png (the curves) in `out`."""
    out = Path(out)
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    plot_compare(result["curves"], out / "compare.png", title=result["model"])
    lines = [f"# gradual compare: {result['model']}", "",
             f"Depths {result['depths']}; arms {', '.join(a['name'] for a in result['arms'])}. "
             "Every arm starts from the same baseline evaluation; one-shot arms remove the layers ranked once on "
             "the unpruned model; a gradual arm runs once to the deepest target and its earlier stages give the "
             "shallower points (marked with their stage).", "",
             "## Budget and retention", "", summary_table(result["points"]), "",
             "## Scores (retention in brackets)", "", scores_table(result["baseline"], result["points"]), "",
             "## Generative failures (summed over tasks)", "", failure_table(result["baseline"], result["points"]), "",
             "![retention vs layers removed](compare.png)", "", "## Timings", "", timing_table(result["timings"]), ""]
    (out / "compare.md").write_text("\n".join(lines))
