"""A comparison's plan: the arms, the target depths, the budget per removed layer and the output folder, read from
`gradual compare`'s options (a `gradual fit` config with a `compare:` section) and checked without loading a model.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from gradual import command
from gradual.command import SectionHint, Verbatim
from gradual.errors import UsageError
from gradual.sgr import RESPONSES

MODES = ("gradual", "one_shot")
PLAN_FILE = "plan.json"
ARM_KEYS = ("name", "mode", "overrides", "final_share", "steps_per_stage", "responses")
SHORTHANDS = {"steps_per_stage": "model.schedule.steps_per_stage", "responses": "data.sgr.responses"}
STEP_KEYS = ("model.schedule.steps_per_stage", "model.schedule.final_steps")
SECTION_KEYS = ("depths", "arms", "out", "budget_per_layer", "seeds")
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
    "model.seed": "`compare.seeds` sets the training seeds",
    "seed_everything": "`compare.seeds` sets the training seeds",
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

    def run_name(self, depth: int, seed: int | None = None) -> str:
        """`<name>-<depth>`, or `<name>-<depth>-s<seed>` for a seed other than the base config's."""
        return f"{self.name}-{depth}" + ("" if seed is None else f"-s{seed}")


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
    """A parsed and checked comparison: the base fit config, the target depths, the arms, the output folder, the
    training budget per removed layer and the training seeds every arm runs under (empty: the base config's seed)."""

    base: dict[str, Any]
    depths: list[int]
    arms: list[Arm]
    out: Path
    budget_per_layer: int
    overwrite: bool = False
    seeds: list[int] = field(default_factory=list)
    report_only: bool = False

    def __post_init__(self) -> None:
        if not self.seeds:
            self.seeds = [self.base_seed]

    @property
    def base_seed(self) -> int:
        """The base config's `model.seed` (GradualModule's default 0): its runs keep today's `<arm>-<depth>`."""
        from gradual.module import GradualModule

        seed = (self.base.get("model") or {}).get("seed")
        return seed if isinstance(seed, int) else inspect.signature(GradualModule).parameters["seed"].default

    def seed_tag(self, seed: int) -> int | None:
        """The seed as it marks a run directory: None for the base config's seed (the run is today's), else it."""
        return None if seed == self.base_seed else seed

    def identity(self) -> dict[str, Any]:
        """What must match to resume in the same folder. Neither the seeds nor the depths are part of it: every run
        (arm, depth, seed) has its own directory, so adding seeds or depths, or running a few depths first, reuses
        every run already there."""
        return {"config": self.base, "budget_per_layer": self.budget_per_layer}


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


def parse_seeds(value: Any) -> list[int]:
    """`0,1` or `[0, 1]` → [0, 1]; each an integer >= 0, listed once, in the order given."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        seeds = [int(str(v).strip()) for v in items if not isinstance(v, bool) and str(v).strip()]
    except ValueError:
        seeds = []
    if not seeds or any(isinstance(v, bool) for v in items) or any(s < 0 for s in seeds) or len(set(seeds)) != len(
            seeds):
        raise UsageError(f"seeds={value!r} is invalid; give distinct training seeds >= 0, e.g. 0,1,2")
    return seeds


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
    from gradual.stages import Schedule

    schedule = (base.get("model") or {}).get("schedule") or {}
    steps = schedule.get("steps_per_stage", Schedule.steps_per_stage)
    per_stage = schedule.get("layers_per_stage", Schedule.layers_per_stage)
    if not isinstance(steps, int) or not isinstance(per_stage, int) or per_stage < 1 or steps % per_stage:
        raise UsageError(f"schedule.steps_per_stage={steps!r} over layers_per_stage={per_stage!r} is not a whole "
                         "number of steps per removed layer; set compare.budget_per_layer")
    return steps // per_stage


def make_plan(depths: list[int] | str | None = None, arms: str | None = None, out: str | None = None,
              overwrite: bool = False, seeds: list[int] | str | None = None, report_only: bool = False,
              compare: SectionHint = None,
              seed_everything: Annotated[int | bool | None, Verbatim("int | bool")] = None,
              model: SectionHint = None, data: SectionHint = None, trainer: SectionHint = None,
              optimizer: SectionHint = None, lr_scheduler: SectionHint = None) -> Plan:
    """Arms of `gradual fit` (one-shot vs gradual, SGR vs dataset, SFT vs KD, LoRA vs full weights, ...) at equal
    depth and training budget. --config is a `gradual fit` config with a top-level `compare:` section; everything
    outside that section is the base config of every arm.

    Args:
        depths: Layers to remove, comma-separated (e.g. 4,8); replaces compare.depths.
        arms: Names of the arms to run, comma-separated; default: every arm of compare.arms.
        out: Output folder of the comparison; replaces compare.out (default runs/compare).
        overwrite: Replace an output folder that holds another comparison.
        seeds: Training seeds every arm runs under, comma-separated (e.g. 0,1,2); replaces compare.seeds.
        report_only: Run nothing: write compare.md/json/png from the runs in the output folder so far (a long
            comparison's progress: the depths every seed's run has reached; a gradual run's stages so far).
        compare: The comparison: depths (layers to remove, default [4, 8]), arms (a list of {name, mode: gradual or
            one_shot, overrides: dotted `gradual fit` keys and values, final_share: the budget's share (0..1) in a
            consolidation stage after the last removal, and the shorthands steps_per_stage (0 = no recovery) and
            responses for model.schedule.steps_per_stage and data.sgr.responses}; keys that would make arms
            incomparable, such as the model, depth, run_dir, seed or callbacks, are refused; default the four arms
            no_recovery, one_shot_dataset, one_shot_sgr, gradual_sgr), out (the output folder), budget_per_layer
            (recovery steps per removed layer, default the base config's steps per stage over its layers per
            stage) and seeds
            (training seeds: model.seed and seed_everything, i.e. data order, adapter init and dropout; default the
            base config's model.seed, [0]; runs of another seed go to <out>/<arm>-<depth>-s<seed>, and scores and
            intervals pool the seeds).
        seed_everything: The base `gradual fit` config's global seed.
        model: The base `gradual fit` config's `model:` section (gradual.module.GradualModule).
        data: The base `gradual fit` config's `data:` section (the recovery data).
        trainer: The base `gradual fit` config's `trainer:` section (Lightning Trainer and callbacks).
        optimizer: The base `gradual fit` config's top-level `optimizer:` (LightningCLI's; usually null).
        lr_scheduler: The base `gradual fit` config's top-level `lr_scheduler:` (LightningCLI's; usually null).
    """
    fit = {"seed_everything": seed_everything, "trainer": trainer, "model": model, "data": data,
           "optimizer": optimizer, "lr_scheduler": lr_scheduler}
    base = {k: v for k, v in fit.items() if v is not None}
    section = compare or {}
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
    plan = Plan(base=base, depths=parse_depths(depths if depths is not None else section.get("depths", [4, 8])),
                arms=select_arms(parse_arms(section.get("arms")), arms),
                out=Path(out or section.get("out") or "runs/compare"), budget_per_layer=budget, overwrite=overwrite,
                report_only=report_only)
    if report_only and overwrite:
        raise UsageError("--report-only reads the output folder and --overwrite would clear it; give one")
    chosen = seeds if seeds is not None else section.get("seeds")
    if chosen is not None:
        plan.seeds = parse_seeds(chosen)
    check_stage_boundaries(plan)
    return plan


def load_plan(argv: Sequence[str]) -> Plan | None:
    """`gradual compare`'s options as a checked plan (None after --help or --print_config): everything that can be
    checked without the `gradual fit` parser or a model."""
    parser = command.function_parser(make_plan, "gradual compare")
    namespace = command.parse(parser, argv, require_config=True)
    return None if namespace is None else make_plan(**command.arguments(make_plan, namespace))


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
    saved_identity = {k: v for k, v in (old.get("identity") or {}).items() if k != "depths"}  # older plans had it
    if saved_identity != _plain(plan.identity()):
        raise UsageError(f"--out {str(plan.out)!r} holds a comparison of another config or budget; choose another "
                         "folder or --overwrite")
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
