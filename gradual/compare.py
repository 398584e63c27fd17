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
removal stages (`schedule.steps_per_stage`); a remainder that does not split evenly goes to the consolidation stage,
so the totals match exactly (without a consolidation stage such a plan is refused; with one layer per stage every
budget splits evenly). An arm that sets `model.schedule.steps_per_stage` or `final_steps` itself keeps its
own steps, and the plan is refused unless they add up to the same total (0 is allowed: an arm without recovery).

What the arms share, so a comparison costs little more than its arms' training:
- the baseline: the unpruned model is evaluated once (`<out>/baseline.json`) and seeds every arm's stage 0;
- the ranking: the layers one-shot arms remove are chosen once on the unpruned model (`schedule.layers`);
- the SGR answers: the teacher's answers are cached on disk and reused by every SGR arm;
- depth: a gradual arm without consolidation runs once to the deepest target and its earlier stages are its
  shallower points; any other arm (one-shot, or gradual with a consolidation stage, which must come last) runs
  once per depth.

Re-running the same command resumes: finished runs are read back, an interrupted one resumes from its last stage.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradual.errors import OneLineParser, UsageError
from gradual.sgr import RESPONSES, SGRConfig

MODES = ("gradual", "one_shot")
PLAN_FILE = "plan.json"
BASELINE_FILE = "baseline.json"
EVALUATIONS = ("TaskEvaluation", "LmEvalEvaluation")
ARM_KEYS = ("name", "mode", "overrides", "final_share", "steps_per_stage", "responses")
SHORTHANDS = {"steps_per_stage": "model.schedule.steps_per_stage", "responses": "data.sgr.responses"}
STEP_KEYS = ("model.schedule.steps_per_stage", "model.schedule.final_steps")
SECTION_KEYS = ("depths", "arms", "out", "budget_per_layer")
MANAGED = {
    "model.model": "every arm starts from the base model (one baseline, one ranking)",
    "model.dtype": "the shared baseline is evaluated in the base config's dtype",
    "model.quantize": "the shared baseline is evaluated with the base config's quantization",
    "model.trust_remote_code": "every arm loads the base model the same way",
    "model.schedule.mode": "use the arm's `mode`",
    "model.schedule.max_layers": "`compare.depths` sets the depth",
    "model.schedule.target_ratio": "`compare.depths` sets the depth",
    "model.schedule.min_depth": "`compare.depths` sets the depth",
    "model.schedule.layers": "one-shot arms remove the layers ranked once on the unpruned model",
    "model.run_dir": "runs go to <out>/<arm>-<depth>",
    "model.overwrite": "`gradual compare --overwrite` decides",
    "trainer.callbacks": "every arm is evaluated the same way",
    "compare": "arms cannot nest comparisons",
}
"""Keys an arm may not override (nor a section holding one), with the reason: the arms would stop being comparable."""


@dataclass(frozen=True)
class Arm:
    """One way to reach the target depths.

    Args:
        name: used in tables and run directory names (`<out>/<name>-<depth>`).
        mode: `gradual` (one layer group per stage, re-scored every stage) or `one_shot` (all at once).
        overrides: dotted keys of the base `gradual fit` config and their values for this arm, e.g.
            `{"model.recovery.loss": "kd"}`. `model.schedule.steps_per_stage: 0` makes an arm without recovery.
        final_share: share of the budget spent in a consolidation stage after the last removal (0..1); None (or 0)
            = no consolidation stage.
    """

    name: str
    mode: str = "gradual"
    overrides: dict[str, Any] = field(default_factory=dict)
    final_share: float | None = None

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise UsageError(f"arm name {self.name!r} is invalid; use letters, digits, '_', '-' or '.'")
        if self.mode not in MODES:
            raise UsageError(f"arm {self.name!r}: mode={self.mode!r} is unknown; allowed: {', '.join(MODES)}")
        if self.final_share is not None and (isinstance(self.final_share, bool)
                                             or not isinstance(self.final_share, int | float)
                                             or not 0 <= self.final_share <= 1):
            raise UsageError(f"arm {self.name!r}: final_share={self.final_share!r} is invalid; give a number in "
                             "0..1 (the budget's share in the consolidation stage) or null")
        for key in self.overrides:
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", key):
                raise UsageError(f"arm {self.name!r}: override key {key!r} is invalid; give a dotted path into the "
                                 "`gradual fit` config, e.g. model.recovery.loss")
            managed = [m for m in MANAGED if key == m or m.startswith(key + ".") or key.startswith(m + ".")]
            if managed:
                raise UsageError(f"arm {self.name!r}: override {key} is not allowed: {MANAGED[managed[0]]}")
        explicit = [k for k in STEP_KEYS if k in self.overrides]
        if explicit and self.final_share is not None:
            raise UsageError(f"arm {self.name!r} sets both final_share and {', '.join(explicit)}; final_share splits "
                             "the budget itself: drop one")
        responses = self.overrides.get("data.sgr.responses")
        if responses is not None and responses not in RESPONSES:
            raise UsageError(f"arm {self.name!r}: responses={responses!r} is unknown; allowed: {', '.join(RESPONSES)}")
        for key in STEP_KEYS:
            steps = self.overrides.get(key)
            if key in self.overrides and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
                raise UsageError(f"arm {self.name!r}: {key.rsplit('.', 1)[1]}={steps!r} is invalid; it must be an "
                                 "integer >= 0 (or leave it out: the budget sets the steps)")

    @property
    def explicit_steps(self) -> bool:
        """Whether the arm sets its own steps (then they must add up to the budget, or to 0) instead of splitting
        the budget."""
        return any(k in self.overrides for k in STEP_KEYS)

    def run_name(self, depth: int) -> str:
        return f"{self.name}-{depth}"


DEFAULT_ARMS = (
    Arm("no_recovery", "one_shot", {"model.schedule.steps_per_stage": 0, "data.sgr.responses": "dataset"}),
    Arm("one_shot_dataset", "one_shot", {"data.sgr.responses": "dataset"}),
    Arm("one_shot_sgr", "one_shot", {"data.sgr.responses": "sgr"}),
    Arm("gradual_sgr", "gradual", {"data.sgr.responses": "sgr"}),
)


@dataclass(frozen=True)
class Budget:
    """An arm's steps at one depth: per removal stage, in the consolidation stage, and in all (what is kept equal)."""

    steps_per_stage: int
    final_steps: int
    total: int


@dataclass
class Plan:
    """A parsed and checked comparison: the base fit config, the target depths, the arms, the output folder, and
    the training budget per removed layer."""

    base: dict[str, Any]
    depths: list[int]
    arms: list[Arm]
    out: Path
    budget_per_layer: int
    overwrite: bool = False

    def identity(self) -> dict[str, Any]:
        return {"config": self.base, "depths": self.depths, "budget_per_layer": self.budget_per_layer}


# ----------------------------------------------------------------------------------------------- parsing
def parse_depths(value: Any) -> list[int]:
    """`4,8` or `[4, 8]` → [4, 8]; each a positive integer, listed once."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        depths = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise UsageError(f"depths={value!r} is invalid; give layer counts to remove, e.g. 4,8") from None
    if not depths or any(d < 1 for d in depths) or len(set(depths)) != len(depths):
        raise UsageError(f"depths={value!r} is invalid; give distinct layer counts >= 1, e.g. 4,8")
    return sorted(depths)


def parse_arm(spec: Any) -> Arm:
    """One `compare.arms` entry: `{name, mode, overrides, final_share}`; `steps_per_stage` and `responses` are
    shorthands for the overrides `model.schedule.steps_per_stage` and `data.sgr.responses` (null = not set)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise UsageError(f"compare.arms entry {spec!r} is invalid; each needs a `name` (and mode, overrides, "
                         "final_share)")
    name = spec["name"]
    unknown = sorted(set(spec) - set(ARM_KEYS))
    if unknown:
        raise UsageError(f"arm {name!r} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ARM_KEYS)}")
    overrides = spec.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UsageError(f"arm {name!r}: overrides must be a mapping of dotted keys to values, e.g. "
                         "{model.recovery.loss: kd}")
    overrides = dict(overrides)
    for short, key in SHORTHANDS.items():
        if spec.get(short) is None:
            continue
        if key in overrides:
            raise UsageError(f"arm {name!r} sets {short} and {key}; give one")
        overrides[key] = spec[short]
    arm = Arm(name=name, mode=spec.get("mode", "gradual"), overrides=overrides, final_share=spec.get("final_share"))
    arm.validate()
    return arm


def parse_arms(specs: Any) -> list[Arm]:
    """Arms from the config's `compare.arms` list of mappings (None = the four default arms)."""
    if specs is None:
        return list(DEFAULT_ARMS)
    if not isinstance(specs, list) or not specs:
        raise UsageError("compare.arms must be a non-empty list of {name, mode, overrides, final_share}")
    arms = [parse_arm(spec) for spec in specs]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise UsageError(f"compare.arms names {names} repeat; give every arm its own name")
    return arms


def select_arms(arms: list[Arm], names: str | None) -> list[Arm]:
    """`--arms a,b`: the named subset, in the order given."""
    if not names:
        return arms
    by_name = {a.name: a for a in arms}
    wanted = [n for n in names.split(",") if n]
    unknown = [n for n in wanted if n not in by_name]
    if unknown or not wanted:
        raise UsageError(f"--arms {names!r} names unknown arm(s) {', '.join(unknown) or '(none)'}; "
                         f"allowed: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def default_budget(base: dict[str, Any]) -> int:
    """The base config's recovery steps per removed layer: its steps per stage over its layers per stage."""
    from gradual.module import Schedule

    schedule = (base.get("model") or {}).get("schedule") or {}
    steps = schedule.get("steps_per_stage", Schedule.steps_per_stage)
    per_stage = schedule.get("layers_per_stage", Schedule.layers_per_stage)
    if not isinstance(steps, int) or not isinstance(per_stage, int) or per_stage < 1 or steps % per_stage:
        raise UsageError(f"schedule.steps_per_stage={steps!r} over layers_per_stage={per_stage!r} is not a whole "
                         "number of steps per removed layer; set compare.budget_per_layer")
    return steps // per_stage


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="gradual compare", description="Arms of `gradual fit` (one-shot vs gradual, SGR vs dataset, SFT vs KD, "
        "LoRA vs full weights, ...) at equal depth and training budget.")
    p.add_argument("--config", required=True, help="a `gradual fit` config, optionally with a top-level `compare:` "
                   "section (depths, arms, out, budget_per_layer)")
    p.add_argument("--depths", default=None, help="comma-separated layers to remove, e.g. 4,8 (default: config's)")
    p.add_argument("--arms", default=None, help="comma-separated arm names to run (default: all the config lists)")
    p.add_argument("--out", default=None, help="output folder (default: config's compare.out or runs/compare)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder holding another comparison")
    return p


def load_plan(argv: Sequence[str]) -> Plan:
    """Parse and check everything that can be checked without the `gradual fit` parser or a model."""
    args = parser().parse_args(list(argv))
    path = Path(args.config)
    if not path.is_file():
        raise UsageError(f"--config {args.config!r} does not exist; give a `gradual fit` YAML config")
    try:
        base = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"--config {args.config!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(base, dict):
        raise UsageError(f"--config {args.config!r} is not a mapping of `gradual fit` options")
    section = base.pop("compare", None) or {}
    if not isinstance(section, dict):
        raise UsageError(f"compare section must be a mapping with {', '.join(SECTION_KEYS)}")
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise UsageError(f"compare section has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SECTION_KEYS)}")
    budget = section.get("budget_per_layer")
    if budget is None:
        budget = default_budget(base)
    elif isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise UsageError(f"compare.budget_per_layer={budget!r} is invalid; give recovery steps per removed layer >= 1")
    depths = parse_depths(args.depths if args.depths is not None else section.get("depths", [4, 8]))
    arms = select_arms(parse_arms(section.get("arms")), args.arms)
    plan = Plan(base=base, depths=depths, arms=arms, out=Path(args.out or section.get("out") or "runs/compare"),
                budget_per_layer=budget, overwrite=args.overwrite)
    check_stage_boundaries(plan)
    return plan


def layers_per_stage(plan: Plan, arm: Arm) -> int:
    """The arm's layers per stage (its override, else the base config's)."""
    schedule = (plan.base.get("model") or {}).get("schedule") or {}
    value = arm.overrides.get("model.schedule.layers_per_stage", schedule.get("layers_per_stage", 1))
    return value if isinstance(value, int) and value >= 1 else 1  # the parser reports a bad value


def check_stage_boundaries(plan: Plan) -> None:
    """A gradual arm can only report a depth its stages end on (`layers_per_stage` must divide every depth)."""
    for arm in plan.arms:
        per_stage = layers_per_stage(plan, arm)
        bad = [d for d in plan.depths if d % per_stage]
        if arm.mode == "gradual" and bad:
            raise UsageError(f"depths {bad} are not multiples of schedule.layers_per_stage={per_stage}, so gradual "
                             f"arm {arm.name!r} never stops there; choose multiples or layers_per_stage: 1")


def check_out(plan: Plan) -> bool:
    """The output folder holds this comparison (resume) or nothing; True when --overwrite must clear it."""
    saved = plan.out / PLAN_FILE
    if not plan.out.exists() or not any(plan.out.iterdir()):
        return False
    if plan.overwrite:
        return True
    if not saved.is_file():
        raise UsageError(f"--out {str(plan.out)!r} holds something else; choose another folder or --overwrite")
    old = json.loads(saved.read_text())
    if old.get("identity") != _plain(plan.identity()):
        raise UsageError(f"--out {str(plan.out)!r} holds a comparison of another config, depths or budget; choose "
                         "another folder or --overwrite")
    clash = [a.name for a in plan.arms if a.name in old.get("arms", {}) and old["arms"][a.name] != _plain(asdict(a))]
    if clash:
        raise UsageError(f"--out {str(plan.out)!r} ran arm(s) {', '.join(clash)} with other settings; rename them "
                         "or --overwrite")
    return False


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so saved and current plans compare equal."""
    return json.loads(json.dumps(value))


def save_plan(plan: Plan) -> None:
    saved = plan.out / PLAN_FILE
    arms = json.loads(saved.read_text())["arms"] if saved.is_file() else {}
    arms.update({a.name: _plain(asdict(a)) for a in plan.arms})
    plan.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"identity": plan.identity(), "arms": arms}, indent=2))


# ----------------------------------------------------------------------------------------------- budgets
def removal_stages(depth: int, per_stage: int) -> int:
    """Removal stages that share the budget at `depth`: the gradual stages (a one-shot stage trains as many)."""
    return math.ceil(depth / per_stage)


def arm_budget(plan: Plan, arm: Arm, depth: int) -> Budget:
    """The arm's steps at `depth`: k × budget split into `final_share` (rounded) for the consolidation stage and
    equal removal stages, the remainder of the split going to the consolidation stage; or the arm's own steps."""
    from gradual.module import Schedule

    n = removal_stages(depth, layers_per_stage(plan, arm))
    if arm.explicit_steps:
        schedule = (apply_overrides(plan.base, arm.overrides).get("model") or {}).get("schedule") or {}
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


def arm_runs(plan: Plan, arm: Arm) -> dict[int, int]:
    """Target depth → the depth of the run that reaches it. A gradual arm without a consolidation stage and with
    the same steps per stage at every depth runs once to the deepest target (its earlier stages are the shallower
    points); a consolidation stage comes last, so such an arm, like a one-shot one, runs once per depth."""
    budgets = [arm_budget(plan, arm, d) for d in plan.depths]
    once = arm.mode == "gradual" and not any(b.final_steps for b in budgets) and len(
        {b.steps_per_stage for b in budgets}) == 1
    return {d: max(plan.depths) if once else d for d in plan.depths}


def check_budgets(plan: Plan, depth0: int) -> dict[str, dict[int, Budget]]:
    """Every arm's budget at every depth, counted by the fit's own `Schedule.total_steps` on its resolved config;
    refuse a plan in which a trained arm's total differs from k × budget_per_layer (0 = no recovery is allowed)."""
    from gradual.module import Schedule

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


# ----------------------------------------------------------------------------------------------- arm configs
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
    return ([{"class_path": "gradual.compare_callbacks.SeedBaseline", "init_args": {"path": str(baseline)}}]
            + evaluations + [{"class_path": "gradual.compare_callbacks.RecordRetention"},
                             {"class_path": "gradual.compare_callbacks.DataLedger"}] + others)


def arm_config(plan: Plan, arm: Arm, depth: int, layers: list[int] | None = None) -> dict[str, Any]:
    """The base fit config with this arm's overrides, its schedule and budget at `depth`, run directory and
    callbacks."""
    config = apply_overrides(plan.base, arm.overrides)
    model = config["model"] = config.get("model") or {}
    schedule = model["schedule"] = model.get("schedule") or {}
    schedule.update(mode=arm.mode, max_layers=depth, target_ratio=None, min_depth=1, layers=layers)
    if not arm.explicit_steps:
        budget = arm_budget(plan, arm, depth)
        schedule.update(steps_per_stage=budget.steps_per_stage, final_steps=budget.final_steps)
    model["run_dir"] = str(plan.out / arm.run_name(depth))
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


# ----------------------------------------------------------------------------------------------- checking
def _argv_free(build: Any) -> Any:
    """Run `build()` with this process's command line hidden: LightningCLI would otherwise read it."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return build()
    finally:
        sys.argv = argv


def make_cli(config: dict[str, Any]) -> Any:
    """A `gradual fit` LightningCLI of this config, not run; bad options raise a one-line UsageError."""
    from gradual.cli import _usage_error_in
    from gradual.lightning_cli import GradualCLI

    try:
        return _argv_free(lambda: GradualCLI(args=["--config", yaml.safe_dump(config, sort_keys=False)], run=False,
                                             parser_kwargs={"exit_on_error": False}))
    except argparse.ArgumentError as e:
        raise UsageError(f"--config is not a valid `gradual fit` config: {fit_error_line(str(e))}") from None
    except ValueError as e:  # jsonargparse wraps errors raised while instantiating classes
        raise (_usage_error_in(e) or e) from None


class FitParser:
    """The `gradual fit` parser alone: checks a config's keys and types in milliseconds, building nothing (no
    module, data, trainer or callbacks), so every arm's config at every depth is checked before any arm runs."""

    def __init__(self, config: dict[str, Any]) -> None:
        from gradual.lightning_cli import GradualCLI

        class ParseOnly(GradualCLI):
            def before_instantiate_classes(self) -> None:
                pass

            def instantiate_classes(self) -> None:
                pass

            def after_instantiate_classes(self) -> None:
                pass

        self.parser = self.check(config, lambda c: _argv_free(lambda: ParseOnly(
            args=copy.deepcopy(c), run=False, parser_kwargs={"exit_on_error": False})).parser)

    def check(self, config: dict[str, Any], parse: Any = None) -> Any:
        """Parse `config`; a rejection raises argparse.ArgumentError."""
        return (parse or self.parser.parse_object)(copy.deepcopy(config))


def fit_error_line(message: str) -> str:
    """The parser's rejection as one line. An unknown key inside a section typed `X | None` is reported by
    jsonargparse as a failed union ("allowed: null"); name the unknown key instead."""
    from gradual.cli import parser_error_line

    unknown = re.search(r"Option '([^']+)' is not accepted", message)
    keys = re.findall(r'Parser key "([^"]+)":', message)
    if unknown and keys:
        return f"{'.'.join([*keys, unknown.group(1)])} is not a `gradual fit` option"
    return parser_error_line(message)


def validate_arms(plan: Plan) -> dict[str, dict[int, Budget]]:
    """Check everything before any arm runs, loading no weights: the depths against the model, every arm's config
    at every depth with the `gradual fit` parser (one line naming the arm and its overrides), the budgets, and
    every arm built once at its deepest run (values its classes refuse, e.g. recovery.loss: kdd)."""
    from gradual.models import model_depth

    model = plan.base.get("model") or {}
    depth0 = model_depth(model.get("model", "smollm2-135m-instruct"), bool(model.get("trust_remote_code", False)))
    if max(plan.depths) >= depth0:
        raise UsageError(f"depths={','.join(map(str, plan.depths))} is invalid for a model of {depth0} layers; "
                         f"allowed: 1..{depth0 - 1}")
    try:
        fit = FitParser(arm_config(plan, Arm("baseline", "one_shot"), max(plan.depths)))
    except argparse.ArgumentError as e:
        raise UsageError(f"--config is not a valid `gradual fit` config: {fit_error_line(str(e))}") from None
    for arm in plan.arms:
        for depth in sorted(set(arm_runs(plan, arm).values())):
            try:
                fit.check(arm_config(plan, arm, depth))
            except argparse.ArgumentError as e:
                keys = f" (overrides {', '.join(arm.overrides)})" if arm.overrides else ""
                raise UsageError(f"arm {arm.name!r}{keys} is not a valid `gradual fit` config: "
                                 f"{fit_error_line(str(e))}") from None
    budgets = check_budgets(plan, depth0)
    for arm in plan.arms:
        try:
            make_cli(arm_config(plan, arm, max(arm_runs(plan, arm).values())))
        except UsageError as e:
            raise UsageError(f"arm {arm.name!r}: {e}") from None
        gc.collect()
    return budgets


# ----------------------------------------------------------------------------------------------- running
def prepare(plan: Plan) -> dict[str, Any]:
    """Load the unpruned model once: rank its layers for the one-shot arms and evaluate the shared baseline."""
    path = plan.out / BASELINE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    from gradual import surgery
    from gradual.callbacks import LmEvalEvaluation, TaskEvaluation

    t0 = time.perf_counter()
    cli = make_cli(arm_config(plan, Arm("baseline", "one_shot"), max(plan.depths)))
    module = cli.model
    module.configure_model()
    module.to(cli.trainer.strategy.root_device)
    t = time.perf_counter()
    kept = surgery.original_indices(module.model)  # schedule.layers are original indices (the model may be pruned)
    ranking = {str(d): [kept[i] for i in module.choose_layers(d)[0]] for d in plan.depths}
    scoring_s = time.perf_counter() - t
    scores: dict[str, Any] = {}
    for cb in cli.trainer.callbacks:
        if isinstance(cb, (TaskEvaluation, LmEvalEvaluation)):
            scores.update(cb.results(module))
    baseline = {"scores": scores, "ranking": ranking, "depth": module.depth0,
                "in_data_tasks": cli.datamodule.recovery_tasks(),
                "timings": {"scoring_s": scoring_s, "total_s": time.perf_counter() - t0}}
    path.write_text(json.dumps(baseline, indent=2))
    del module, cli
    gc.collect()
    return baseline


def fit_run(plan: Plan, arm: Arm, depth: int, layers: list[int] | None) -> dict[str, Any]:
    """One arm's `gradual fit` run to `depth` (resumed or read back if it already ran); its history and timing."""
    config = arm_config(plan, arm, depth, layers)
    name = arm.run_name(depth)
    configs = plan.out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli = make_cli(config)
    module = cli.model
    module.check_run_dir()
    state = module.saved_state()
    t = time.perf_counter()
    steps = None
    if not (state and state.get("finished")):
        cli.trainer.fit(module, datamodule=cli.datamodule)
        steps = cli.trainer.global_step
    run_dir = module.run_dir
    del module, cli
    gc.collect()
    results = json.loads((run_dir / "results.json").read_text())
    history = results["stages"]
    reached = len(history[-1]["removed_total"])
    if reached != depth:
        raise UsageError(f"run {name} stopped at {reached} layers removed instead of {depth}; remove callbacks that "
                         "stop training early from the config")
    trained = sum(r["steps"] for r in history)
    return {"history": history, "in_data": results.get("in_data_tasks", []), "recipe": recipe(config, trained),
            "responses": ((config.get("data") or {}).get("sgr") or {}).get("responses", SGRConfig.responses)
            if trained else None,
            "seconds": time.perf_counter() - t, "optimizer_steps": steps}


def arm_points(arm: Arm, runs_of: dict[int, int], runs: dict[str, dict[str, Any]], budgets: dict[int, Budget],
               out: Path) -> list[dict[str, Any]]:
    """The arm's record at every target depth (the last stage with that many layers removed, so a consolidation
    stage counts), with its steps (consolidation included) and the prompts it trained on."""
    from gradual.compare_callbacks import data_digest, read_ledger

    points = []
    for depth, run_depth in runs_of.items():
        run = arm.run_name(run_depth)
        history = runs[run]["history"]
        record = [r for r in history if len(r["removed_total"]) == depth][-1]
        ledger = read_ledger(out / run)
        seen = [d for s in range(1, record["stage"] + 1) for d in ledger.get(s, [])]
        trained = history[1: record["stage"] + 1]
        points.append({"arm": arm.name, "mode": arm.mode, "recipe": runs[run]["recipe"],
                       "responses": runs[run]["responses"],
                       "removed": depth, "layers": record["removed_total"], "stage": record["stage"], "run": run,
                       "reused": record is not history[-1],
                       "steps": sum(r["steps"] for r in trained),
                       "final_steps": sum(r["steps"] for r in trained if r.get("consolidation")),
                       "budget": budgets[depth].total, "examples": len(seen), "data": data_digest(seen),
                       "in_data": runs[run]["in_data"], "scores": record["scores"], "retention": record["retention"]})
    return points


def arm_curve(arm: Arm, runs_of: dict[int, int], runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The points an arm's curve draws (the baseline once): every stage of a gradual run without consolidation,
    else the end of every run (stages before a consolidation, or a one-shot run's, are not comparable points)."""
    curve: dict[int, dict[str, Any]] = {}
    for run_depth in sorted(set(runs_of.values())):
        history = runs[arm.run_name(run_depth)]["history"]
        every = arm.mode == "gradual" and not any(r.get("consolidation") for r in history)
        for r in history if every else [history[0], history[-1]]:
            curve[len(r["removed_total"])] = {"removed": len(r["removed_total"]), "retention": r["retention"]}
    return [curve[k] for k in sorted(curve)]


def run(plan: Plan) -> dict[str, Any]:
    """Run every arm and write compare.json / compare.md / compare.png into `plan.out`."""
    from gradual.compare_report import flag_below_no_recovery, write_outputs

    t0 = time.perf_counter()
    clear = check_out(plan)
    budgets = validate_arms(plan)
    if clear:
        shutil.rmtree(plan.out)
    save_plan(plan)
    baseline = prepare(plan)
    runs: dict[str, dict[str, Any]] = {}
    runs_of = {arm.name: arm_runs(plan, arm) for arm in plan.arms}
    for arm in plan.arms:
        for depth in sorted(set(runs_of[arm.name].values())):
            layers = baseline["ranking"][str(depth)] if arm.mode == "one_shot" else None
            print(f"gradual compare: run {arm.run_name(depth)}", flush=True)
            runs[arm.run_name(depth)] = fit_run(plan, arm, depth, layers)
    points = sorted((p for arm in plan.arms
                     for p in arm_points(arm, runs_of[arm.name], runs, budgets[arm.name], plan.out)),
                    key=lambda p: p["removed"])
    no_recovery = {str(d): next((a.name for a in plan.arms if budgets[a.name][d].total == 0), None)
                   for d in plan.depths}
    result = {"model": (plan.base.get("model") or {}).get("model", "smollm2-135m-instruct"),
              "depths": plan.depths, "budget_per_layer": plan.budget_per_layer,
              "arms": [{**asdict(a), "runs": {str(d): a.run_name(r) for d, r in runs_of[a.name].items()},
                        "budget": {str(d): asdict(b) for d, b in budgets[a.name].items()}} for a in plan.arms],
              "in_data_tasks": baseline.get("in_data_tasks", []), "baseline": baseline["scores"],
              "ranking": baseline["ranking"], "no_recovery": no_recovery, "points": points,
              "curves": {a.name: arm_curve(a, runs_of[a.name], runs) for a in plan.arms},
              "timings": {"prepare_s": baseline["timings"]["total_s"],
                          "runs": {name: {"seconds": r["seconds"], "optimizer_steps": r["optimizer_steps"]}
                                   for name, r in runs.items()},
                          "total_s": time.perf_counter() - t0}}
    flag_below_no_recovery(result)
    write_outputs(plan.out, result)
    return result


def main(argv: Sequence[str]) -> int:
    plan = load_plan(argv)
    run(plan)
    print(f"gradual compare: wrote {plan.out / 'compare.md'}, compare.json and compare.png")
    return 0
