"""Intervals by paired bootstrap: coverage at the nominal rate on synthetic scores, capped group means that no task
above its baseline can raise, worst tasks, and paired verdicts between recipes."""

from __future__ import annotations

import numpy as np
import pytest

from gradual.intervals import TIE, group_figures, paired_difference, percentile, task_figures


def _paired_problems(rng: np.random.Generator, n: int, p_base: float, p_stage: float) -> tuple[list[int], list[int]]:
    """n problems of varying difficulty: the baseline solves each with probability d·p_base, the stage with
    d·p_stage (correlated, as a pruned model fails mostly where the original was weak)."""
    difficulty = rng.uniform(0.5, 1.0, n)
    u = rng.uniform(size=n)
    return (u < difficulty * p_stage).astype(int).tolist(), (u < difficulty * p_base).astype(int).tolist()


@pytest.mark.slow  # 200 bootstraps of 1000 replicates; CI runs it (make test-slow)
def test_score_and_retention_intervals_cover_the_true_values_at_the_nominal_rate() -> None:
    rng = np.random.default_rng(0)
    p_base, p_stage, n, runs = 0.8, 0.5, 96, 200
    true_score, true_retention = 0.75 * p_stage, p_stage / p_base  # E[difficulty] = 0.75
    covered_score = covered_retention = 0
    for run in range(runs):
        stage, base = _paired_problems(rng, n, p_base, p_stage)
        t = task_figures(stage, base, key="synthetic", seed=run)
        covered_score += t.score_ci[0] <= true_score <= t.score_ci[1]
        covered_retention += t.retention_ci[0] <= true_retention <= t.retention_ci[1]
    assert 0.90 <= covered_score / runs <= 0.99, covered_score
    assert 0.90 <= covered_retention / runs <= 0.99, covered_retention


def test_pairing_narrows_the_retention_interval() -> None:
    """The same problems solved by both: retention is exactly 1 in every replicate, however few problems."""
    items = [1, 0, 1, 1, 0, 1, 0, 1]
    t = task_figures(items, items, key="same")
    assert t.retention == 1.0 and t.retention_ci == (1.0, 1.0)
    assert t.score_ci[0] < 0.625 < t.score_ci[1]


def test_a_task_above_its_baseline_does_not_raise_the_group() -> None:
    base = [1] * 16 + [0] * 16
    collapsed = task_figures([1] * 2 + [0] * 30, base, key="products")  # 2/16 of its baseline
    above = task_figures([1] * 24 + [0] * 8, base, key="uppercase")  # 24/16 = 1.5 of its baseline
    group = group_figures({"products": collapsed, "uppercase": above})
    assert above.retention == 1.5 and collapsed.retention == 0.125
    assert group.mean == pytest.approx((0.125 + 1.0) / 2)  # not (0.125 + 1.5) / 2 = 0.81
    assert group.worst_task == "products" and group.worst == 0.125 and group.worst_ci == collapsed.retention_ci
    assert group.mean_ci[0] < group.mean < group.mean_ci[1] <= 1.0
    alone = group_figures({"products": collapsed})
    assert alone.mean == 0.125 and group_figures({"uppercase": above}).mean == 1.0


def test_undefined_retention_stays_out_of_the_group() -> None:
    zero = task_figures([1, 0, 0, 0], [0, 0, 0, 0], key="zero")
    kept = task_figures([1, 1, 0, 0], [1, 1, 0, 0], key="kept")
    assert zero.retention is None and zero.retention_ci == (None, None)
    assert group_figures({"zero": zero, "kept": kept}).tasks == 1
    assert group_figures({"zero": zero}) is None


def test_figures_are_reproducible_and_refuse_unpaired_series() -> None:
    stage, base = [1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 1, 1]
    assert task_figures(stage, base, key="k").to_dict() == task_figures(stage, base, key="k").to_dict()
    with pytest.raises(ValueError, match="one length"):
        task_figures([1, 0], [1, 0, 1], key="k")


def test_paired_verdicts_tell_a_real_difference_from_noise() -> None:
    rng = np.random.default_rng(1)
    base = {f"t{i}": [1] * 60 + [0] * 4 for i in range(3)}
    good = {k: (rng.uniform(size=64) < 0.85).astype(int).tolist() for k in base}
    bad = {k: (rng.uniform(size=64) < 0.35).astype(int).tolist() for k in base}
    ahead = paired_difference(good, bad, base)
    assert ahead.verdict == "ahead" and ahead.ci[0] > 0 and ahead.value > 0.4
    assert paired_difference(bad, good, base).verdict == "behind"
    flipped = {k: v[1:] + v[:1] for k, v in good.items()}  # the same skill, other problems right: noise
    tie = paired_difference(good, flipped, base)
    assert tie.verdict == TIE and tie.ci[0] < 0 < tie.ci[1]
    same = paired_difference(good, good, base)
    assert same.value == 0 and same.ci == (0.0, 0.0) and same.verdict == TIE


def _scores(score_items: dict[str, list[int]], forms: dict[str, str] | None = None) -> dict[str, dict]:
    return {k: {"score": sum(v) / len(v), "form": (forms or {}).get(k, "generative"), "n": len(v), "items": v}
            for k, v in score_items.items()}


def test_group_retention_is_the_capped_mean_beside_the_worst_task() -> None:
    """The demo's case: uppercase went past the original (1.50), products collapsed (0.13): uncapped they average
    to 0.81 and hide the collapse; capped they read 0.56, and the worst task says which one fell."""
    from gradual.retention import AGGREGATES, retention

    base = _scores({"uppercase": [1] * 16 + [0] * 16, "products": [1] * 16 + [0] * 16, "copy": [1] * 32})
    stage = _scores({"uppercase": [1] * 24 + [0] * 8, "products": [1] * 2 + [0] * 30, "copy": [1] * 32})
    values = retention(stage, base, in_data=["copy"])
    assert values["uppercase"] == 1.5 and values["products"] == 0.125  # per task: uncapped
    assert values["held_out_generative_mean"] == pytest.approx((1.0 + 0.125) / 2)
    assert values["held_out_generative_worst"] == 0.125 and values["in_data_generative_worst"] == 1.0
    assert values["generative_mean"] == pytest.approx((1.0 + 0.125 + 1.0) / 3) and values["min"] == 0.125
    assert {"held_out_generative_worst", "generative_worst"} <= set(AGGREGATES)


def test_intervals_per_key_and_per_group_from_the_kept_items() -> None:
    from gradual.retention import intervals, with_interval

    base = _scores({"uppercase": [1] * 16 + [0] * 16, "products": [1] * 16 + [0] * 16, "mc_copy": [1] * 32},
                   {"mc_copy": "classification"})
    stage = _scores({"uppercase": [1] * 24 + [0] * 8, "products": [1] * 2 + [0] * 30, "mc_copy": [1] * 30 + [0] * 2},
                    {"mc_copy": "classification"})
    out = intervals(stage, base, in_data=[])
    assert set(out) == {"uppercase", "products", "mc_copy", "generative", "held_out_generative", "classification",
                        "held_out_classification", "far_held_out_generative", "far_held_out_classification"}
    lo, hi = out["products"]["retention_ci"]
    assert lo < 0.125 < hi and out["products"]["score"] == 0.0625
    group = out["held_out_generative"]
    assert group["worst_task"] == "products" and group["tasks"] == 2 and group["mean_ci"][1] <= 1.0
    assert group["mean_ci"][0] < group["mean"] < group["mean_ci"][1]
    del stage["uppercase"]["items"]  # an evaluation without per-problem scores has no interval
    assert "uppercase" not in intervals(stage, base)
    assert with_interval(0.714, [0.58, 0.833]) == "0.71 [0.58, 0.83]" and with_interval(0.5, None) == "0.50"
    assert with_interval(1.2, [0.9, None]) == "1.20 [0.90, ∞]"


def test_an_interval_whose_resamples_can_lose_the_whole_baseline_is_unbounded_above() -> None:
    """One problem of eight right at the baseline: resamples without it divide by 0, so the upper end is unbounded
    (None, printed ∞), never the largest float."""
    from gradual.retention import with_interval

    t = task_figures([1] + [0] * 7, [1] + [0] * 7, key="rare")
    assert t.retention == 1.0 and t.retention_ci == (1.0, None)
    assert with_interval(t.retention, t.retention_ci, digits=3) == "1.000 [1.000, ∞]"


def test_one_seed_pools_to_exactly_the_single_run_figures() -> None:
    """`compare.seeds: [0]` is today's comparison: pooling one seed changes no figure, not even in the last bit."""
    import torch

    from gradual.intervals import _ratio, paired_replicates, pooled_paired_difference, pooled_task_figures

    rng = np.random.default_rng(2)
    stage, base = _paired_problems(rng, 40, 0.8, 0.5)
    single, pooled = task_figures(stage, base, key="k", seed=3), pooled_task_figures([stage], base, key="k", seed=3)
    assert pooled.to_dict() == single.to_dict() and torch.equal(pooled.replicates, single.replicates)
    other, _ = _paired_problems(rng, 40, 0.8, 0.7)
    diff = pooled_paired_difference({"k": [stage]}, {"k": [other]}, {"k": base}, seed=3)
    reps = paired_replicates([stage, other, base], "k", 3)  # the single-seed formula, written out
    ratio = _ratio(reps[:, 0], reps[:, 2]).clamp(max=1.0) - _ratio(reps[:, 1], reps[:, 2]).clamp(max=1.0)
    assert diff.ci == percentile(ratio) and diff.to_dict() == paired_difference({"k": stage}, {"k": other},
                                                                                 {"k": base}, seed=3).to_dict()


def test_seeds_that_disagree_widen_the_pooled_intervals() -> None:
    """Two seeds of one recipe, one keeping 0.8 of the baseline and one 0.4: the pooled score is their mean and its
    intervals include the seed spread, wider than either seed's own; identical seeds pool to one seed's interval."""
    from gradual.intervals import pooled_paired_difference, pooled_task_figures

    base = [1] * 50
    good, bad = [1] * 40 + [0] * 10, [0] * 30 + [1] * 20
    pooled = pooled_task_figures([good, bad], base, key="k")
    alone = [task_figures(s, base, key="k") for s in (good, bad)]
    assert pooled.score == pytest.approx(0.6) and pooled.retention == pytest.approx(0.6)
    width = pooled.retention_ci[1] - pooled.retention_ci[0]
    assert all(width > 1.5 * (a.retention_ci[1] - a.retention_ci[0]) for a in alone), (pooled, alone)
    assert pooled.retention_ci[0] < 0.45 and pooled.retention_ci[1] > 0.75  # reaches toward each seed's value
    twice = pooled_task_figures([good, good], base, key="k")
    assert twice.retention_ci == pytest.approx(alone[0].retention_ci)
    # the difference between two recipes pools their seeds the same way; seeds pair by index across recipes
    one_each = pooled_paired_difference({"k": [good]}, {"k": [[1] * 25 + [0] * 25]}, {"k": base})
    spread = pooled_paired_difference({"k": [good, bad]}, {"k": [[1] * 25 + [0] * 25] * 2}, {"k": base})
    assert spread.ci[1] - spread.ci[0] > 1.5 * (one_each.ci[1] - one_each.ci[0]) and spread.verdict == TIE
    same = pooled_paired_difference({"k": [good, bad]}, {"k": [good, bad]}, {"k": base})
    assert same.ci == (0.0, 0.0), "seed j of one recipe must pair with seed j of the other"


def test_a_seed_that_sinks_every_task_moves_the_whole_group() -> None:
    """The seed draw is shared by the tasks of a replicate: a group of two tasks whose seeds agree across tasks has
    (nearly) the spread of one task; drawn per task, the spread would average down by about 1/√2."""
    from gradual.intervals import pooled_task_figures

    base = [1] * 200
    seeds = [[1] * (40 + 20 * s) + [0] * (160 - 20 * s) for s in range(8)]  # 0.2 .. 0.9 of the baseline
    tasks = {k: pooled_task_figures(seeds, base, key=k) for k in ("a", "b")}
    group = group_figures(tasks)
    task_width = tasks["a"].retention_ci[1] - tasks["a"].retention_ci[0]
    assert group.mean_ci[1] - group.mean_ci[0] > 0.9 * task_width
