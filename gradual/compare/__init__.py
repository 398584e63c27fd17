"""`gradual compare`: at the same depth and the same training budget, which way of removing and healing layers
keeps the most? One-shot vs gradual, SGR vs dataset answers, SFT vs distillation, LoRA vs full or near-cut weights,
with or without a final consolidation stage or a training-free cut repair.

Each arm is an ordinary `gradual fit` run of one base config (same model, tasks, seed, data), changed in its
`mode` and in any dotted keys of its `overrides` (`model.recovery.loss: kd`, `model.recovery.params: near_cut`,
`data.sgr.responses: dataset`, ...), with the retention stop replaced by a callback that records retention without
stopping, so every arm reaches every target depth. Every arm's config is checked by the `gradual fit` parser before
any arm runs; keys that would make the arms incomparable (the model, the depth, the evaluation) are refused.

Equal budget: one budget per removed layer (`compare.budget_per_layer`, by default the base's steps per stage over
its layers per stage). At depth k every trained arm trains exactly k × budget steps in all: `final_share` of them
(rounded) in the consolidation stage after the last removal (`schedule.final_steps`), the rest split evenly over the
removal stages (`schedule.steps_per_stage`; `schedule.steps_growth` shares the same total unequally, and such an arm
runs once per depth); a remainder that does not split evenly goes to the consolidation stage, so the totals match
exactly (without a consolidation stage such a plan is refused; with one layer per stage every budget splits
evenly). An arm that sets `model.schedule.steps_per_stage` or `final_steps` itself keeps its own steps, and the
plan is refused unless they add up to the same total (0 is allowed: an arm without recovery).

What the arms share, so a comparison costs little more than its arms' training:
- the baseline: the unpruned model is evaluated once (`<out>/baseline.json`) and seeds every arm's stage 0;
- the ranking: the layers one-shot arms remove are chosen once on the unpruned model (`schedule.layers`);
- the SGR answers: the teacher's answers are cached on disk and reused by every SGR arm;
- depth: a gradual arm without consolidation runs once to the deepest target and its earlier stages are its
  shallower points; any other arm (one-shot, or gradual with a consolidation stage, which must come last) runs
  once per depth.

Seeds: `compare.seeds` (or `--seeds 0,1,2`) repeats every trained arm under each training seed (`model.seed` and
`seed_everything`: data order, adapter init, dropout); the base config's seed keeps `<out>/<arm>-<depth>`, another
goes to `<out>/<arm>-<depth>-s<seed>`, so adding seeds to a finished comparison reuses its runs. Scores and
retentions pool the seeds, and every interval (per task, per group, paired differences) resamples seeds and problems
(`gradual.intervals`). The baseline and the ranking stay shared; a one-shot arm that trains nothing runs once.

Cost: besides the per-model budget, `curve_costs` gives each arm's steps and recorded wall time to draw its whole
curve (every run it needs for every target depth), and its ratio to the one-shot arm of the same recipe.

Re-running the same command resumes: finished runs are read back, an interrupted one resumes from its last stage.
"""

from gradual.compare.arms import (
    apply_overrides,
    arm_budget,
    arm_callbacks,
    arm_config,
    arm_runs,
    arm_seeds,
    check_budgets,
)
from gradual.compare.plan import DEFAULT_ARMS, Arm, Budget, Plan, load_plan, make_plan
from gradual.compare.run import FitParser, main, run, validate_arms

__all__ = ["DEFAULT_ARMS", "Arm", "Budget", "FitParser", "Plan", "apply_overrides", "arm_budget", "arm_callbacks",
           "arm_config", "arm_runs", "arm_seeds", "check_budgets", "load_plan", "main", "make_plan", "run",
           "validate_arms"]
