"""The outputs of `gradual compare`: `compare.json`, `compare.md` (tables) and `compare.png` (retention curves).

A *point* is one arm at one target depth: `{"arm", "mode", "recipe", "responses", "removed", "layers", "stage",
"run", "reused", "steps", "final_steps", "budget", "examples", "data", "in_data", "scores", "retention",
"intervals", "seeds", "below_no_recovery"}`. A *curve* is the stages an arm's runs recorded, as `{"removed",
"retention", "intervals"}` entries, so a gradual arm without consolidation draws a point per stage. Under several
training seeds (`seeds`) scores, retention and intervals pool the seeds (`gradual.compare.pooling`), the other
fields are the first seed's, and `per_seed` keeps each seed's own. `curve_costs` says per arm what its whole curve
cost (steps and seconds of every run it needs), beside the per-model budget.

Retention is read per group: a task is in-data when its problems fed the arm's recovery data, else held-out: near
held-out when a task of its family did, far held-out when nothing of its family did (`gradual.retention`). Only
held-out retention shows a capability coming back rather than being taught, so the tables lead with it (then near and
far apart) and flag any held-out score that recovery left below the arm without recovery.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from gradual.compare.pooling import seed_items
from gradual.intervals import pooled_paired_difference
from gradual.retention import in_group, label_text, task_of, with_interval
from gradual.run_report import GROUP_COLUMNS

BELOW = "▼"
"""Marks a held-out score below the no-recovery arm's at the same depth."""
PANELS = (("held_out_generative_mean", "held-out generative"), ("in_data_generative_mean", "in-data generative"),
          ("near_held_out_generative_mean", "near held-out generative"),
          ("far_held_out_generative_mean", "far held-out generative"),
          ("held_out_classification_mean", "held-out classification"),
          ("in_data_classification_mean", "in-data classification"),
          ("near_held_out_classification_mean", "near held-out classification"),
          ("far_held_out_classification_mean", "far held-out classification"))


def flag_below_no_recovery(result: dict[str, Any]) -> None:
    """Set every point's `below_no_recovery`: the held-out score keys below the no-recovery arm's score at the same
    depth (`result["no_recovery"]`: depth → arm name, or None), or None where there is no such arm to compare with."""
    by_key = {(p["arm"], p["removed"]): p for p in result["points"]}
    for p in result["points"]:
        reference = by_key.get(((result.get("no_recovery") or {}).get(str(p["removed"])), p["removed"]))
        if reference is None or reference is p:
            p["below_no_recovery"] = None
            continue
        p["below_no_recovery"] = [k for k, s in p["scores"].items()
                                  if in_group(k, "held_out", p["in_data"]) and k in reference["scores"]
                                  and s["score"] < reference["scores"][k]["score"]]


def _cell(point: dict[str, Any], key: str) -> str:
    s = point["scores"].get(key)
    ret = point["retention"].get(key)
    if s is None:
        return "-"
    below = f" {BELOW}" if key in (point.get("below_no_recovery") or []) else ""
    return f"{s['score']:.2f}" + (f" ({ret:.2f})" if ret is not None else "") + below


def _ret(point: dict[str, Any], key: str) -> str:
    """A group's capped mean retention with its 95% interval where the point has one."""
    value = point["retention"].get(key)
    ci = ((point.get("intervals") or {}).get(key.removesuffix("_mean")) or {}).get("mean_ci")
    return "-" if value is None else with_interval(value, ci)


def _steps(point: dict[str, Any]) -> str:
    """Steps trained to reach the point, the consolidation's in brackets; a count off the plan is shown as such."""
    text = str(point["steps"]) + (f" ({point['final_steps']} final)" if point.get("final_steps") else "")
    if point["steps"] in (0, point.get("budget", point["steps"])):
        return text
    return f"**{text}, planned {point['budget']}**"


def _below(point: dict[str, Any]) -> str:
    flagged = point.get("below_no_recovery")
    return "-" if flagged is None else (f"**{', '.join(flagged)}**" if flagged else "none")


def summary_table(points: Sequence[dict[str, Any]]) -> str:
    """Per arm and depth: how it healed, the layers removed, the training budget, whether the data matched, the
    mean retention per group (those any point has) with its 95% interval, and the held-out scores that ended below
    the no-recovery arm.

    "same prompts" compares the multiset of training prompts with the first trained arm at that depth.
    """
    columns = [(k, name) for k, name in GROUP_COLUMNS if any(k in p["retention"] for p in points)]
    head = ["removed", "arm", "mode", "recovery", "layers removed (original)", "steps", "examples", "same prompts",
            *(name for _, name in columns), "held-out below no recovery"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reference: dict[int, str] = {}
    for p in points:
        if p["examples"]:
            reference.setdefault(p["removed"], p["data"])
        same = "-" if not p["examples"] else ("yes" if p["data"] == reference[p["removed"]] else "**no**")
        arm = p["arm"] + (f" (stage {p['stage']} of {p['run']})" if p["reused"] else "")
        rows.append("| " + " | ".join([str(p["removed"]), arm, p["mode"], p.get("recipe", "-"),
                                       ",".join(map(str, p["layers"])), _steps(p), str(p["examples"]), same,
                                       *(_ret(p, k) for k, _ in columns), _below(p)]) + " |")
    return "\n".join(rows)


def scores_table(baseline: dict[str, dict[str, Any]], points: Sequence[dict[str, Any]],
                 in_data: Sequence[str]) -> str:
    """Arm × task: score with retention in brackets, every task marked in-data, near held-out or far held-out (by
    the base config's recovery data; an arm whose in-data tasks differ lists its own); the first row is the unpruned
    baseline."""
    keys = list(baseline)
    label = {k: f"{k} ({label_text(k, in_data)})" for k in keys}
    rows = ["| removed | arm | " + " | ".join(label[k] for k in keys) + " |", "|" + "---|" * (len(keys) + 2),
            "| 0 | baseline | " + " | ".join(f"{baseline[k]['score']:.2f}" for k in keys) + " |"]
    for p in points:
        own = sorted(p.get("in_data", in_data))
        arm = p["arm"] + ("" if own == sorted(in_data) else f" (in-data: {', '.join(own) or 'none'})")
        rows.append(f"| {p['removed']} | {arm} | " + " | ".join(_cell(p, k) for k in keys) + " |")
    return "\n".join(rows)


def below_lines(result: dict[str, Any]) -> list[str]:
    """One line per point with a held-out score below the no-recovery arm's, or why nothing is flagged."""
    if not any(result.get("no_recovery", {}).values()):
        return ["No arm trains 0 steps, so nothing is compared with no recovery."]
    flagged = [p for p in result["points"] if p.get("below_no_recovery")]
    if not flagged:
        return ["No held-out score ends below the no-recovery arm's at its depth."]
    lines = []
    for p in flagged:
        reference = result["no_recovery"][str(p["removed"])]
        ref = next(q for q in result["points"] if q["arm"] == reference and q["removed"] == p["removed"])
        worse = ", ".join(f"{k} {p['scores'][k]['score']:.2f} < {ref['scores'][k]['score']:.2f}"
                          for k in p["below_no_recovery"])
        lines.append(f"- {BELOW} {p['arm']} at {p['removed']} removed: {worse} ({reference})")
    return lines


def arms_table(arms: Sequence[dict[str, Any]]) -> str:
    """Each arm as configured: mode, consolidation share, overrides of the base config, and its budget per depth
    (total = steps per removal stage × stages + consolidation steps)."""
    rows = ["| arm | mode | final share | overrides | steps per depth |", "|---|---|---|---|---|"]
    for a in arms:
        overrides = "; ".join(f"`{k}: {json.dumps(v)}`" for k, v in a.get("overrides", {}).items()) or "-"
        budget = "; ".join(f"{d}: {b['total']} ({b['steps_per_stage']}/stage + {b['final_steps']} final)"
                           for d, b in a.get("budget", {}).items())
        share = "-" if a.get("final_share") is None else f"{a['final_share']:g}"
        rows.append(f"| {a['name']} | {a['mode']} | {share} | {overrides} | {budget or '-'} |")
    return "\n".join(rows)


def failure_categories(scores: dict[str, dict[str, Any]]) -> list[str]:
    """Failure categories of the generative answers, in first-seen order ("correct" first)."""
    seen: dict[str, None] = {}
    for s in scores.values():
        if s.get("form") == "generative":
            seen.update(dict.fromkeys(s.get("failures", {})))
    return sorted(seen, key=lambda c: c != "correct")


def failure_table(baseline: dict[str, dict[str, Any]], points: Sequence[dict[str, Any]]) -> str:
    """How the generative answers failed, summed over the generative tasks: the paper's diagnosis, counted (per
    seed: an arm's counts are means over its seeds)."""
    categories = failure_categories(baseline)
    rows = ["| removed | arm | " + " | ".join(categories) + " |", "|" + "---|" * (len(categories) + 2)]
    for removed, arm, scores in [(0, "baseline", baseline)] + [(p["removed"], p["arm"], p["scores"]) for p in points]:
        total = dict.fromkeys(categories, 0)
        for s in scores.values():
            if s.get("form") == "generative":
                for c, n in s.get("failures", {}).items():
                    total[c] = total.get(c, 0) + n
        rows.append(f"| {removed} | {arm} | " + " | ".join(f"{total[c]:g}" for c in categories) + " |")
    return "\n".join(rows)


def plot_compare(curves: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """Retention vs layers removed, one line per arm with its 95% interval band; a panel for each group aggregate
    the tasks have (held-out and in-data, generative and classification; each a mean of per-task retentions capped
    at 1). A bare `Figure` renders through Agg, choosing no global backend."""
    panels = [(key, name) for key, name in PANELS
              if any(key in c["retention"] for curve in curves.values() for c in curve)]
    cols = min(2, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(6 * cols, 4.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (key, name) in zip(axes.flat, panels, strict=False):
        for arm, curve in curves.items():
            pts = sorted((c["removed"], 1.0 if c["removed"] == 0 else c["retention"].get(key),
                          (c.get("intervals") or {}).get(key.removesuffix("_mean"), {}).get("mean_ci"))
                         for c in curve)
            pts = [(x, y, ci) for x, y, ci in pts if y is not None]
            line = ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=arm)[0]
            band = [(x, ci[0], ci[1]) for x, _, ci in pts if ci and None not in ci]
            if band:  # the 95% interval of the capped mean, where the stages kept per-problem scores
                ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                                color=line.get_color(), alpha=0.15, linewidth=0)
                ax.vlines([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                          color=line.get_color(), alpha=0.5, linewidth=1)  # a lone point's interval too
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_xlabel("layers removed")
        ax.set_ylabel(f"{name} retention (mean)")
        ax.set_title(f"{title}: {name}" if title else name)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


DIFFERENCE_GROUPS = (("held_out", "generative"), ("near_held_out", "generative"), ("far_held_out", "generative"),
                     ("in_data", "generative"), ("held_out", "classification"),
                     ("near_held_out", "classification"), ("far_held_out", "classification"))


def paired_differences(result: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """At every depth, every pair of arms (config order, a before b): a − b in each group's capped mean retention,
    by bootstrap over the same problems (each arm's and the baseline's per-problem scores resampled together) and
    over each arm's training seeds (paired by index), with its 95% interval and verdict (`ahead`, `behind`, `tie`:
    the interval contains 0). A task counts in a group when it is in that group for both arms (their recovery data
    may differ); pairs without per-problem scores are left out."""
    rows = []
    baseline = result["baseline"]
    for depth in result["depths"]:
        here = [p for p in result["points"] if p["removed"] == depth]
        for i, a in enumerate(here):
            for b in here[i + 1:]:
                for group, form in DIFFERENCE_GROUPS:
                    keys = [k for k, v in baseline.items() if v.get("form") == form and v.get("items")
                            and all(in_group(k, group, p["in_data"]) and seed_items(p, k) for p in (a, b))]
                    diff = pooled_paired_difference({k: seed_items(a, k) for k in keys},
                                                    {k: seed_items(b, k) for k in keys},
                                                    {k: baseline[k]["items"] for k in keys}, seed=seed)
                    if diff is not None:
                        rows.append({"removed": depth, "a": a["arm"], "b": b["arm"], "group": f"{group}_{form}",
                                     "tasks": len(keys), **diff.to_dict()})
    return rows


def differences_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per depth, pair of arms and group: the paired difference, its interval, the verdict for a."""
    lines = ["| removed | a | b | group | tasks | a − b [95% interval] | a is |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = r["verdict"] if r["verdict"] == "tie" else f"**{r['verdict']}**"
        lines.append(f"| {r['removed']} | {r['a']} | {r['b']} | {r['group'].replace('_', ' ')} | {r['tasks']} | "
                     f"{with_interval(r['value'], r['ci'])} | {verdict} |")
    return "\n".join(lines) if rows else "No pair of arms with per-problem scores at the same depth."


def curve_cost_table(costs: dict[str, dict[str, Any]]) -> str:
    """Per arm: the runs one curve needs, their recovery steps and recorded minutes (per seed), the per-model budget,
    and the ratio to the one-shot arm of the same recipe."""
    rows = ["| arm | mode | runs per curve | recovery steps per curve | minutes per curve (training) | steps per "
            "removed layer (per model) | vs one-shot of the same recipe (steps; time) |", "|" + "---|" * 7]
    for name, c in costs.items():
        ref = c.get("one_shot")
        ratio = "-" if ref is None else (f"{ref['steps_ratio']:.2f}×; " + ("-" if ref["seconds_ratio"] is None
                                                                           else f"{ref['seconds_ratio']:.2f}×")
                                         + f" ({ref['arm']})")
        rows.append(f"| {name} | {c['mode']} | {len(c['runs'])} | {c['steps']} | {c['seconds'] / 60:.1f} "
                    f"({c['train_seconds'] / 60:.1f}) | {c['steps_per_removed_layer']:g} | {ratio} |")
    return "\n".join(rows)


def seeds_line(result: dict[str, Any]) -> str:
    """How many training seeds, and what the intervals include."""
    seeds = result.get("seeds") or [0]
    if len(seeds) == 1:
        return (f"One training seed ({seeds[0]}): intervals cover the sampling of problems only, not the spread "
                "between training seeds (add seeds with `--seeds`).")
    fewer = [a["name"] for a in result["arms"] if len(a.get("seeds", seeds)) < len(seeds)]
    return (f"{len(seeds)} training seeds ({', '.join(map(str, seeds))}; model.seed and seed_everything: data order, "
            "adapter init, dropout): every trained arm runs under each, scores and retentions are means over them, "
            "and every interval resamples seeds and problems (two-way bootstrap), so it includes the seed-to-seed "
            "spread."
            + (f" Trained nothing, so run under one seed only: {', '.join(fewer)}." if fewer else ""))


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
    in_data = result.get("in_data_tasks", [])
    held_out = sorted({task_of(k) for k in result["baseline"]} - set(in_data))
    near, far = ([t for t in held_out if in_group(t, group, in_data)] for group in ("near_held_out", "far_held_out"))
    lines = [f"# gradual compare: {result['model']}", "",
             f"Depths {result['depths']}; {result.get('budget_per_layer', '?')} recovery steps per removed layer for "
             "every trained arm, consolidation included. Every arm starts from the same baseline evaluation; one-shot "
             "arms remove the layers ranked once on the unpruned model; a gradual arm without consolidation runs "
             "once to the deepest target and its earlier stages give the shallower points (marked with their "
             "stage); any other arm runs once per depth.", "", seeds_line(result), "",
             *(["**Partial** (`--report-only`): written from the runs on disk so far; a depth missing from an arm's "
                "rows is still running or not started, and its curve cost counts the runs done so far.", ""]
               if result.get("partial") else []),
             f"- in-data tasks (their problems fed recovery): {', '.join(in_data) or 'none'}",
             f"- held-out tasks (nothing of them fed recovery): {', '.join(held_out) or 'none'}",
             f"  - near held-out (a task of their family fed recovery): {', '.join(near) or 'none'}",
             f"  - far held-out (nothing of their family did): {', '.join(far) or 'none'}", "",
             "## Arms", "", arms_table(result["arms"]), "",
             "## Budget and retention", "",
             "Group columns are mean retentions (score / baseline score, capped at 1 per task) with their 95% "
             "intervals. Steps count the consolidation stage. "
             "\"same prompts\" compares the training examples with the first trained arm at that depth: arms "
             "with the same recovery data read the same stream of examples, each stage its own consecutive slice; "
             "arms with other data sources differ by design.", "",
             summary_table(result["points"]), "",
             "## Paired differences", "",
             "Capped mean retention of arm a minus arm b on the same problems, 95% interval by paired bootstrap over "
             "the problems (and the seeds, paired by index, where there are several); an interval that contains 0 is "
             "a tie: the difference is inside the noise.", "",
             differences_table(result.get("differences", [])), "",
             "## Held-out tasks below no recovery", "", *below_lines(result), "",
             f"## Scores (retention in brackets; {BELOW} = held-out score below the no-recovery arm's)", "",
             scores_table(result["baseline"], result["points"], in_data), "",
             "## Generative failures (summed over tasks)", "", failure_table(result["baseline"], result["points"]), "",
             "![retention vs layers removed](compare.png)", "",
             "## What a curve costs", "",
             "Per arm, every run its curve needs for every target depth (a one-shot arm: one run per depth; a gradual "
             "arm without consolidation: one run to the deepest), per seed: recovery steps, and the minutes its stages "
             "recorded (scoring, training, evaluation, checkpoints; training alone in brackets; not model loading nor "
             "the shared SGR answers). Per model every trained arm gets the same steps per removed layer.", "",
             curve_cost_table(result.get("curve_costs", {})), "",
             "## Timings", "", timing_table(result["timings"]), ""]
    (out / "compare.md").write_text("\n".join(lines))
