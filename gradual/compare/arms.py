"""Each arm's `gradual fit` config at each depth: the base config with its overrides, its share of the budget
(removal stages and consolidation), its run directory, and the callbacks of a comparison run.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from gradual.compare.plan import Arm, Budget, Plan, layers_per_stage
from gradual.errors import UsageError
from gradual.sgr import SGRConfig

BASELINE_FILE = "baseline.json"
EVALUATIONS = ("TaskEvaluation", "LmEvalEvaluation")


def removal_stages(depth: int, per_stage: int) -> int:
    """Removal stages that share the budget at `depth`: the gradual stages (a one-shot stage trains as many)."""
    return math.ceil(depth / per_stage)


def arm_budget(plan: Plan, arm: Arm, depth: int) -> Budget:
    """The arm's steps at `depth`: k × budget split into `final_share` (rounded) for the consolidation stage and
    equal removal stages, the remainder of the split going to the consolidation stage; or the arm's own steps.
    `steps_per_stage` is the removal stages' mean: with `schedule.steps_growth` the fit shares the same total
    unequally (`Schedule.removal_steps`)."""
    from gradual.stages import Schedule

    n = removal_stages(depth, layers_per_stage(plan, arm))
    if arm.explicit_steps:
        schedule = arm_schedule(plan, arm)
        per = schedule.get("steps_per_stage", Schedule.steps_per_stage)
        final = schedule.get("final_steps", Schedule.final_steps)
        return Budget(per, final, per * n + final)
    total = depth * plan.budget_per_layer
    final = round((arm.final_share or 0) * total)
    per = (total - final) // n
    final = total - per * n
    if final and not arm.final_share:
        raise UsageError(f"arm {arm.name!r}: {total} steps at {depth} layers removed do not split evenly over {n} "
                         "removal stages; give it a final_share (the remainder goes to the consolidation stage) or "
                         "choose another budget_per_layer")
    return Budget(per, final, total)


def arm_schedule(plan: Plan, arm: Arm) -> dict[str, Any]:
    """The arm's `model.schedule` section: the base config's with the arm's overrides (before compare sets the
    depth and the steps)."""
    return (apply_overrides(plan.base, arm.overrides).get("model") or {}).get("schedule") or {}


def arm_runs(plan: Plan, arm: Arm) -> dict[int, int]:
    """Target depth → the depth of the run that reaches it. A gradual arm without a consolidation stage and with
    the same steps per stage at every depth runs once to the deepest target (its earlier stages are the shallower
    points); a consolidation stage comes last, so such an arm, like a one-shot one, runs once per depth. So does
    one with `schedule.steps_growth` ≠ 1: its stages' steps depend on how many stages share the budget, so the
    deepest run's first stages did not train a shallower depth's budget."""
    from gradual.stages import Schedule

    budgets = [arm_budget(plan, arm, d) for d in plan.depths]
    growth = arm_schedule(plan, arm).get("steps_growth", Schedule.steps_growth)
    once = arm.mode == "gradual" and not any(b.final_steps for b in budgets) and len(
        {b.steps_per_stage for b in budgets}) == 1 and growth == 1
    return {d: max(plan.depths) if once else d for d in plan.depths}


def arm_seeds(plan: Plan, arm: Arm, budgets: dict[int, Budget]) -> list[int]:
    """The training seeds an arm runs under: every seed of the plan, except for a one-shot arm that trains nothing.
    That arm removes the shared ranking's layers and is evaluated greedily, so every seed gives the same model and
    scores: it runs once (its spread is 0), under the base config's seed where that is one of the plan's (its runs
    are then today's), else the first."""
    if arm.mode == "one_shot" and all(budgets[d].total == 0 for d in plan.depths):
        return [plan.base_seed if plan.base_seed in plan.seeds else plan.seeds[0]]
    return list(plan.seeds)


def check_budgets(plan: Plan, depth0: int) -> dict[str, dict[int, Budget]]:
    """Every arm's budget at every depth, counted by the fit's own `Schedule.total_steps` on its resolved config;
    refuse a plan in which a trained arm's total differs from k × budget_per_layer (0 = no recovery is allowed)."""
    from gradual.stages import Schedule

    budgets: dict[str, dict[int, Budget]] = {}
    for arm in plan.arms:
        budgets[arm.name] = {}
        for depth in plan.depths:
            schedule = arm_config(plan, arm, depth)["model"]["schedule"]
            total = Schedule(**schedule).total_steps(depth0)
            planned = arm_budget(plan, arm, depth)
            budgets[arm.name][depth] = Budget(planned.steps_per_stage, planned.final_steps, total)
    for depth in plan.depths:
        expected = depth * plan.budget_per_layer
        off = {a: b[depth].total for a, b in budgets.items() if b[depth].total not in (0, expected)}
        if off:
            listed = ", ".join(f"{a}={t}" for a, t in off.items())
            raise UsageError(f"arms train unequal budgets at {depth} layers removed: {listed} steps instead of "
                             f"{depth} × {plan.budget_per_layer} = {expected}; drop their step overrides (the budget "
                             "splits itself) or make them add up")
    return budgets


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with every dotted key set to its value (missing or null sections are created)."""
    config = copy.deepcopy(base)
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = config
        for i, part in enumerate(path):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UsageError(f"override {key}: {'.'.join(path[: i + 1])} is not a mapping in the base config")
        node[leaf] = copy.deepcopy(value)
    return config


def arm_callbacks(callbacks: Any, baseline: Path) -> list[dict[str, Any]]:
    """The base callbacks with the shared baseline first and the retention stop replaced by a recorder."""
    items = [] if callbacks is None else callbacks if isinstance(callbacks, list) else [callbacks]
    if not all(isinstance(c, dict) and "class_path" in c for c in items):
        raise UsageError("trainer.callbacks entries must be {class_path, init_args} mappings for `gradual compare`")
    kind = [c["class_path"].rsplit(".", 1)[-1] for c in items]
    evaluations = [c for c, k in zip(items, kind, strict=True) if k in EVALUATIONS]
    if not evaluations:
        raise UsageError("trainer.callbacks has no TaskEvaluation or LmEvalEvaluation; a comparison needs scores")
    others = [c for c, k in zip(items, kind, strict=True) if k not in EVALUATIONS and k != "RetentionStopping"]
    for needed in ("Report", "StageCheckpoint"):
        if needed not in kind:
            others.append({"class_path": f"gradual.callbacks.{needed}"})
    return ([{"class_path": "gradual.compare.callbacks.SeedBaseline", "init_args": {"path": str(baseline)}}]
            + evaluations + [{"class_path": "gradual.compare.callbacks.RecordRetention"},
                             {"class_path": "gradual.compare.callbacks.DataLedger"}] + others)


def arm_config(plan: Plan, arm: Arm, depth: int, layers: list[int] | None = None,
               seed: int | None = None) -> dict[str, Any]:
    """The base fit config with this arm's overrides, its schedule and budget at `depth`, run directory and
    callbacks, under training `seed` (None or the base config's seed: the base config as it is; another sets
    `model.seed` and `seed_everything` to it and its run goes to `<arm>-<depth>-s<seed>`)."""
    tag = None if seed is None else plan.seed_tag(seed)
    config = apply_overrides(plan.base, arm.overrides)
    if tag is not None:
        config["seed_everything"] = tag
    model = config["model"] = config.get("model") or {}
    schedule = model["schedule"] = model.get("schedule") or {}
    schedule.update(mode=arm.mode, max_layers=depth, target_ratio=None, min_depth=1, layers=layers)
    if not arm.explicit_steps:
        budget = arm_budget(plan, arm, depth)
        schedule.update(steps_per_stage=budget.steps_per_stage, final_steps=budget.final_steps)
    if tag is not None:
        model["seed"] = tag
    model["run_dir"] = str(plan.out / arm.run_name(depth, tag))
    model["overwrite"] = False
    trainer = config["trainer"] = config.get("trainer") or {}
    trainer["callbacks"] = arm_callbacks(trainer.get("callbacks"), plan.out / BASELINE_FILE)
    return config


def recipe(config: dict[str, Any], total: int) -> str:
    """A few words on how an arm heals, from its resolved config: objective, data, weights, repair."""
    from gradual.distill import Recovery

    model, data = config.get("model") or {}, config.get("data") or {}
    recovery = model.get("recovery") or {}
    if total:
        source = "mixture" if data.get("sources") else (data.get("sgr") or {}).get("responses", SGRConfig.responses)
        words = f"{recovery.get('loss', Recovery.loss)} on {source}, {recovery.get('params', Recovery.params)}"
    else:
        words = "none"
    return words + (f", repair {model['repair']}" if model.get("repair") else "")
