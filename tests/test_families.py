"""Capability families: every task's group (in-data, near held-out, far held-out) follows from the recovery data's
tasks alone, held-out stays the union of near and far, and the near and far aggregates (capped means, worst tasks,
intervals) reach the stop rule, the run report and the compare report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gradual.retention import AGGREGATES, GROUPS, group_of, in_group, intervals, retention

KEYS = ["copy", "mc_copy", "uppercase", "mc_uppercase", "word_sequence_reversal", "successor", "mc_successor",
        "products", "brackets", "humaneval", "hellaswag"]


@pytest.mark.parametrize(("in_data", "expected"), [
    (["copy"], {"copy": "in_data", "mc_copy": "in_data", "uppercase": "near_held_out",
                "mc_uppercase": "near_held_out", "word_sequence_reversal": "near_held_out",
                "successor": "far_held_out", "mc_successor": "far_held_out", "products": "far_held_out",
                "brackets": "far_held_out", "humaneval": "far_held_out", "hellaswag": "far_held_out"}),
    (["brackets", "successor"], {"copy": "far_held_out", "uppercase": "far_held_out", "successor": "in_data",
                                 "mc_successor": "in_data", "brackets": "in_data", "humaneval": "near_held_out",
                                 "products": "far_held_out", "hellaswag": "far_held_out"}),
    (["chain_sum"], {"products": "near_held_out", "copy": "far_held_out", "successor": "far_held_out"}),
    ([], dict.fromkeys(KEYS, "far_held_out")),
])
def test_group_labels_follow_the_recovery_data(in_data: list[str], expected: dict[str, str]) -> None:
    """A task in the data is in-data, a family sibling of one near held-out, any other task far held-out (an
    lm-eval task such as hellaswag has no family, so it is always far); held-out is exactly near or far, i.e.
    every task not in the data, as before there were families."""
    assert {k: group_of(k, in_data) for k in expected} == expected
    for key in KEYS:
        label = group_of(key, in_data)
        assert in_group(key, label, in_data)
        assert in_group(key, "held_out", in_data) == (label in ("near_held_out", "far_held_out"))
        assert in_group(key, "held_out", in_data) == (key.removeprefix("mc_") not in in_data)
        assert sum(in_group(key, g, in_data) for g in GROUPS) == (2 if label != "in_data" else 1)


def _scores(items: dict[str, list[int]], classification: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    return {k: {"score": sum(v) / len(v), "form": "classification" if k in classification else "generative",
                "n": len(v), "items": v} for k, v in items.items()}


BASE = {"copy": [1] * 8 + [0] * 8, "uppercase": [1] * 8 + [0] * 8, "word_sequence_reversal": [1] * 8 + [0] * 8,
        "successor": [1] * 8 + [0] * 8, "products": [1] * 8 + [0] * 8, "mc_successor": [1] * 8 + [0] * 8}
STAGE = {"copy": [1] * 8 + [0] * 8,  # in-data 1.0
         "uppercase": [1] * 12 + [0] * 4,  # near, 1.5: capped at 1 in the mean
         "word_sequence_reversal": [1] * 4 + [0] * 12,  # near, 0.5
         "successor": [1] * 2 + [0] * 14,  # far, 0.25
         "products": [1] * 8 + [0] * 8,  # far, 1.0
         "mc_successor": [1] * 6 + [0] * 10}  # far classification, 0.75


def test_near_and_far_means_are_capped_and_their_worst_uncapped() -> None:
    values = retention(_scores(STAGE, ("mc_successor",)), _scores(BASE, ("mc_successor",)), in_data=["copy"])
    assert values["uppercase"] == 1.5 and values["word_sequence_reversal"] == 0.5
    assert values["near_held_out_generative_mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert values["near_held_out_generative_worst"] == 0.5
    assert values["far_held_out_generative_mean"] == pytest.approx((0.25 + 1.0) / 2)
    assert values["far_held_out_generative_worst"] == 0.25
    # held-out keeps its meaning: every task not in the data, near and far together
    assert values["held_out_generative_mean"] == pytest.approx((1.0 + 0.5 + 0.25 + 1.0) / 4)
    assert values["held_out_generative_worst"] == 0.25 and values["in_data_generative_mean"] == 1.0
    assert values["far_held_out_classification_mean"] == values["held_out_classification_mean"] == 0.75
    assert "near_held_out_classification_mean" not in values, "an empty group is absent"
    assert "in_data_classification_worst" not in values
    assert {f"{g}_{f}_{s}" for g in ("near_held_out", "far_held_out") for f in ("generative", "classification")
            for s in ("mean", "worst")} <= set(AGGREGATES)
    nothing_near = retention(_scores(STAGE, ("mc_successor",)), _scores(BASE, ("mc_successor",)), in_data=["brackets"])
    assert not any(k.startswith("near_held_out") for k in nothing_near)
    assert nothing_near["far_held_out_generative_mean"] == nothing_near["held_out_generative_mean"]


def test_near_and_far_intervals() -> None:
    out = intervals(_scores(STAGE, ("mc_successor",)), _scores(BASE, ("mc_successor",)), in_data=["copy"])
    near, far = out["near_held_out_generative"], out["far_held_out_generative"]
    assert near["tasks"] == 2 and near["worst_task"] == "word_sequence_reversal" and near["mean"] == 0.75
    assert far["tasks"] == 2 and far["worst_task"] == "successor"
    assert out["held_out_generative"]["tasks"] == 4 and out["far_held_out_classification"]["tasks"] == 1
    for group in (near, far):
        assert group["mean_ci"][0] <= group["mean"] <= group["mean_ci"][1] <= 1.0
    assert "near_held_out_classification" not in out


def test_a_near_or_far_monitor_needs_a_task_of_its_group() -> None:
    from gradual.callbacks import RetentionStopping, TaskEvaluation
    from gradual.errors import UsageError

    evaluation = TaskEvaluation(tasks=["successor", "copy", "uppercase"], forms=["generative"])
    for monitor in ("near_held_out_generative_mean", "far_held_out_generative_worst", "held_out_generative_mean"):
        stop = RetentionStopping(monitor=monitor)
        stop.check_callbacks([evaluation, stop], in_data=["copy"])
    stop = RetentionStopping(monitor="near_held_out_generative_mean")
    with pytest.raises(UsageError, match=r"needs a near held-out generative score, but the evaluation callbacks fill "
                                         r"only: successor \(in-data\), copy \(far held-out\), uppercase \(far "
                                         r"held-out\)"):
        stop.check_callbacks([evaluation, stop], in_data=["successor"])


def _cells(table: list[str], row: int, column: str) -> str:
    """The cell of a markdown table's row under the column headed `column`."""
    head = [c.strip() for c in table[0].strip("|").split("|")]
    return [c.strip() for c in table[row].strip("|").split("|")][head.index(column)]


def _record(stage: int, scores: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]],
            in_data: list[str]) -> dict[str, Any]:
    return {"stage": stage, "depth": 6 - stage, "removed_total": list(range(stage)), "loss": None, "scores": scores,
            "retention": retention(scores, base, in_data) if stage else {},
            "intervals": intervals(scores, base, in_data) if stage else {}}


def test_run_report_lists_and_tabulates_near_and_far(tmp_path: Path) -> None:
    from gradual.run_report import write_report

    base, stage = _scores(BASE, ("mc_successor",)), _scores(STAGE, ("mc_successor",))
    history = [_record(0, base, base, ["copy"]), _record(1, stage, base, ["copy"])]
    write_report(tmp_path, history, 1, None, {"model": "tiny"}, in_data=["copy"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["near_held_out_tasks"] == ["uppercase", "word_sequence_reversal"]
    assert results["far_held_out_tasks"] == ["products", "successor"]
    assert results["held_out_tasks"] == ["products", "successor", "uppercase", "word_sequence_reversal"]
    assert results["stages"][1]["retention"]["near_held_out_generative_worst"] == 0.5
    report = (tmp_path / "report.md").read_text()
    assert "  - near held-out (a task of their family fed recovery): uppercase, word_sequence_reversal" in report
    assert "  - far held-out (nothing of their family did): products, successor" in report
    head = next(line for line in report.splitlines() if line.startswith("| stage |"))
    columns = ("| held-out gen. | near held-out gen. | far held-out gen. | in-data gen. | held-out cls. "
               "| far held-out cls.")
    assert columns in head and "near held-out cls." not in head, "the group columns with a value, in order"
    table = [line for line in report.splitlines() if line.startswith("|") and "|---" not in line][:3]
    assert _cells(table, 2, "near held-out gen.").startswith("0.75 [")
    assert "; worst word_sequence_reversal 0.50 [" in _cells(table, 2, "near held-out gen.")
    assert _cells(table, 2, "far held-out gen.").startswith("0.62 [")
    assert "; worst successor 0.25 [" in _cells(table, 2, "far held-out gen.")


def test_compare_reports_near_and_far_with_paired_differences() -> None:
    from gradual.compare.outputs import paired_differences, scores_table, summary_table

    base = _scores(BASE, ("mc_successor",))
    better = {**STAGE, "word_sequence_reversal": [1] * 8 + [0] * 8}  # near retention 1.0 instead of 0.5

    def arm(name: str, items: dict[str, list[int]]) -> dict[str, Any]:
        scores = _scores(items, ("mc_successor",))
        return {"arm": name, "removed": 1, "in_data": ["copy"], "scores": scores,
                "retention": retention(scores, base, ["copy"]), "intervals": intervals(scores, base, ["copy"]),
                "mode": "one_shot", "layers": [3], "steps": 2, "budget": 2, "examples": 4, "data": "d", "reused": False}

    a, b = arm("a", better), arm("b", STAGE)
    rows = paired_differences({"baseline": base, "depths": [1], "points": [a, b]})
    by_group = {r["group"]: r for r in rows}
    assert set(by_group) == {"held_out_generative", "near_held_out_generative", "far_held_out_generative",
                             "in_data_generative", "held_out_classification", "far_held_out_classification"}
    assert by_group["near_held_out_generative"]["value"] == pytest.approx((1.0 - 0.5) / 2)
    assert by_group["near_held_out_generative"]["tasks"] == 2
    assert by_group["far_held_out_generative"]["value"] == 0.0
    assert by_group["held_out_generative"]["value"] == pytest.approx((1.0 - 0.5) / 4)
    table = scores_table(base, [a, b], ["copy"])
    assert "uppercase (near held-out)" in table and "products (far held-out)" in table and "copy (in-data)" in table
    summary = summary_table([a, b]).splitlines()
    assert "| near held-out gen. | far held-out gen. |" in summary[0] and "near held-out cls." not in summary[0]
    del summary[1]
    assert _cells(summary, 1, "near held-out gen.").startswith("1.00 [")
    assert _cells(summary, 2, "near held-out gen.").startswith("0.75 [")
    assert _cells(summary, 2, "far held-out cls.").startswith("0.75 [")
