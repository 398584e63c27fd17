"""`gradual compare`: at the same depth and training budget, is gradual pruning better than one-shot, and is
recovery on self-generated responses better than on the dataset's answers?

Each arm is an ordinary `gradual fit` run of the same base config (same model, tasks, seed, data), changed only in
`model.schedule` (mode, depth, recovery steps) and `data.sgr.responses`, with the retention stop replaced by a
callback that records retention without stopping, so every arm reaches every target depth. Equal budget follows
from the schedule: a one-shot stage of k layers trains `k × steps_per_stage` steps, k gradual stages train
`steps_per_stage` each, and the stage sampler serves both the same stream of examples.

What the arms share, so a comparison costs little more than its arms' training:
- the baseline: the unpruned model is evaluated once (`<out>/baseline.json`) and seeds every arm's stage 0;
- the ranking: the layers one-shot arms remove are chosen once on the unpruned model (`schedule.layers`);
- the SGR answers: the teacher's answers are cached on disk and reused by every SGR arm;
- depth: a gradual arm runs once to the deepest target; its earlier stages are its shallower points.

Re-running the same command resumes: finished runs are read back, an interrupted one resumes from its last stage.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from gradual.errors import UsageError
from gradual.sgr import RESPONSES

MODES = ("gradual", "one_shot")
PLAN_FILE = "plan.json"
BASELINE_FILE = "baseline.json"
EVALUATIONS = ("TaskEvaluation", "LmEvalEvaluation")
ARM_KEYS = ("name", "mode", "steps_per_stage", "responses")


@dataclass(frozen=True)
class Arm:
    """One way to reach the target depths.

    Args:
        name: used in tables and run directory names (`<out>/<name>-<depth>`).
        mode: `gradual` (one layer group per stage, re-scored every stage) or `one_shot` (all at once).
        steps_per_stage: recovery steps per removed layer group (0 = no recovery; None = the base config's).
        responses: recovery targets: `sgr`, `sgr_filtered` or `dataset` (ignored when nothing is trained).
    """

    name: str
    mode: str = "gradual"
    steps_per_stage: int | None = None
    responses: str = "sgr"

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise UsageError(f"arm name {self.name!r} is invalid; use letters, digits, '_', '-' or '.'")
        if self.mode not in MODES:
            raise UsageError(f"arm {self.name!r}: mode={self.mode!r} is unknown; allowed: {', '.join(MODES)}")
        if self.steps_per_stage is not None and (not isinstance(self.steps_per_stage, int)
                                                 or self.steps_per_stage < 0):
            raise UsageError(f"arm {self.name!r}: steps_per_stage={self.steps_per_stage!r} is invalid; "
                             "it must be an integer >= 0 (or null for the config's)")
        if self.responses not in RESPONSES:
            raise UsageError(f"arm {self.name!r}: responses={self.responses!r} is unknown; "
                             f"allowed: {', '.join(RESPONSES)}")

    def run_depths(self, depths: Sequence[int]) -> list[int]:
        """Depths this arm runs to: a gradual arm passes through every depth on its way to the deepest one."""
        return [max(depths)] if self.mode == "gradual" else list(depths)

    def run_name(self, depth: int) -> str:
        return f"{self.name}-{depth}"


DEFAULT_ARMS = (
    Arm("no_recovery", "one_shot", steps_per_stage=0, responses="dataset"),
    Arm("one_shot_dataset", "one_shot", responses="dataset"),
    Arm("one_shot_sgr", "one_shot", responses="sgr"),
    Arm("gradual_sgr", "gradual", responses="sgr"),
)


@dataclass
class Plan:
    """A parsed and checked comparison: the base fit config, the target depths, the arms, the output folder."""

    base: dict[str, Any]
    depths: list[int]
    arms: list[Arm]
    out: Path
    overwrite: bool = False

    def identity(self) -> dict[str, Any]:
        return {"config": self.base, "depths": self.depths}


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


def parse_arms(specs: Any) -> list[Arm]:
    """Arms from the config's `compare.arms` list of mappings (None = the four default arms)."""
    if specs is None:
        return list(DEFAULT_ARMS)
    if not isinstance(specs, list) or not specs:
        raise UsageError("compare.arms must be a non-empty list of {name, mode, steps_per_stage, responses}")
    arms = []
    for spec in specs:
        if not isinstance(spec, dict) or "name" not in spec:
            raise UsageError(f"compare.arms entry {spec!r} is invalid; each needs a `name` (and mode, "
                             "steps_per_stage, responses)")
        unknown = sorted(set(spec) - set(ARM_KEYS))
        if unknown:
            raise UsageError(f"arm {spec['name']!r} has unknown key(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(ARM_KEYS)}")
        arm = Arm(**spec)
        arm.validate()
        arms.append(arm)
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradual compare", description="One-shot vs gradual, SGR vs dataset answers, at equal depth and budget.")
    p.add_argument("--config", required=True,
                   help="a `gradual fit` config, optionally with a top-level `compare:` section (depths, arms, out)")
    p.add_argument("--depths", default=None, help="comma-separated layers to remove, e.g. 4,8 (default: config's)")
    p.add_argument("--arms", default=None, help="comma-separated arm names to run (default: all the config lists)")
    p.add_argument("--out", default=None, help="output folder (default: config's compare.out or runs/compare)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder holding another comparison")
    return p


def load_plan(argv: Sequence[str]) -> Plan:
    """Parse and check everything that can be checked without loading a model."""
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
        raise UsageError("compare section must be a mapping with depths, arms, out")
    unknown = sorted(set(section) - {"depths", "arms", "out"})
    if unknown:
        raise UsageError(f"compare section has unknown key(s) {', '.join(unknown)}; allowed: depths, arms, out")
    depths = parse_depths(args.depths if args.depths is not None else section.get("depths", [4, 8]))
    arms = select_arms(parse_arms(section.get("arms")), args.arms)
    plan = Plan(base=base, depths=depths, arms=arms, out=Path(args.out or section.get("out") or "runs/compare"),
                overwrite=args.overwrite)
    check_stage_boundaries(plan)
    return plan


def check_stage_boundaries(plan: Plan) -> None:
    """A gradual arm can only report a depth its stages end on (`layers_per_stage` must divide every depth)."""
    schedule = (plan.base.get("model") or {}).get("schedule") or {}
    per_stage = int(schedule.get("layers_per_stage", 1))
    if any(a.mode == "gradual" for a in plan.arms):
        bad = [d for d in plan.depths if d % per_stage]
        if bad:
            raise UsageError(f"depths {bad} are not multiples of schedule.layers_per_stage={per_stage}, so a gradual "
                             "arm never stops there; choose multiples or layers_per_stage: 1")


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
    if old.get("identity") != json.loads(json.dumps(plan.identity())):
        raise UsageError(f"--out {str(plan.out)!r} holds a comparison of another config or depths; choose another "
                         "folder or --overwrite")
    clash = [a.name for a in plan.arms if a.name in old.get("arms", {}) and old["arms"][a.name] != asdict(a)]
    if clash:
        raise UsageError(f"--out {str(plan.out)!r} ran arm(s) {', '.join(clash)} with other settings; rename them "
                         "or --overwrite")
    return False


def save_plan(plan: Plan) -> None:
    saved = plan.out / PLAN_FILE
    arms = json.loads(saved.read_text())["arms"] if saved.is_file() else {}
    arms.update({a.name: asdict(a) for a in plan.arms})
    plan.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"identity": plan.identity(), "arms": arms}, indent=2))


# ----------------------------------------------------------------------------------------------- arm configs
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
    """The base fit config with this arm's schedule, responses, run directory and callbacks."""
    config = copy.deepcopy(plan.base)
    model = config.setdefault("model", {}) or {}
    config["model"] = model
    schedule = model.get("schedule") or {}
    model["schedule"] = schedule
    schedule.update(mode=arm.mode, max_layers=depth, target_ratio=None, min_depth=1, layers=layers)
    if arm.steps_per_stage is not None:
        schedule["steps_per_stage"] = arm.steps_per_stage
    model["run_dir"] = str(plan.out / arm.run_name(depth))
    model["overwrite"] = False
    data = config.get("data") or {}
    config["data"] = data
    data["sgr"] = {**(data.get("sgr") or {}), "responses": arm.responses}
    trainer = config.get("trainer") or {}
    config["trainer"] = trainer
    trainer["callbacks"] = arm_callbacks(trainer.get("callbacks"), plan.out / BASELINE_FILE)
    return config


def make_cli(config: dict[str, Any]) -> Any:
    """A `gradual fit` LightningCLI of this config, not run; bad options raise a one-line UsageError."""
    from gradual.cli import _usage_error_in
    from gradual.lightning_cli import GradualCLI

    argv, sys.argv = sys.argv, sys.argv[:1]  # the options come from `config`, not from this process's command line
    try:
        return GradualCLI(args=["--config", yaml.safe_dump(config, sort_keys=False)], run=False,
                          parser_kwargs={"exit_on_error": False})
    except argparse.ArgumentError as e:
        raise UsageError(f"--config is not a valid `gradual fit` config: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # jsonargparse wraps errors raised while instantiating classes
        raise (_usage_error_in(e) or e) from None
    finally:
        sys.argv = argv


# ----------------------------------------------------------------------------------------------- running
def validate_arms(plan: Plan) -> None:
    """Instantiate every arm's fit run once (no model weights are loaded) so bad options fail before any work."""
    from gradual.models import model_depth

    model = plan.base.get("model") or {}
    depth = model_depth(model.get("model", "smollm2-135m-instruct"), bool(model.get("trust_remote_code", False)))
    if max(plan.depths) >= depth:
        raise UsageError(f"depths={','.join(map(str, plan.depths))} is invalid for a model of {depth} layers; "
                         f"allowed: 1..{depth - 1}")
    for arm in plan.arms:
        make_cli(arm_config(plan, arm, max(plan.depths)))
        gc.collect()


def prepare(plan: Plan) -> dict[str, Any]:
    """Load the unpruned model once: rank its layers for the one-shot arms and evaluate the shared baseline."""
    path = plan.out / BASELINE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    from gradual import surgery
    from gradual.callbacks import LmEvalEvaluation, TaskEvaluation

    t0 = time.perf_counter()
    cli = make_cli(arm_config(plan, Arm("baseline", "one_shot", 0, "dataset"), max(plan.depths)))
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
    history = json.loads((run_dir / "results.json").read_text())["stages"]
    reached = len(history[-1]["removed_total"])
    if reached != depth:
        raise UsageError(f"run {name} stopped at {reached} layers removed instead of {depth}; remove callbacks that "
                         "stop training early from the config")
    return {"history": history, "seconds": time.perf_counter() - t, "optimizer_steps": steps}


def arm_points(arm: Arm, depths: Sequence[int], runs: dict[str, dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """The arm's record at every target depth, with its cumulative steps and the prompts it trained on."""
    from gradual.compare_callbacks import data_digest, read_ledger

    points = []
    for depth in depths:
        run = arm.run_name(depth if arm.mode == "one_shot" else max(depths))
        history = runs[run]["history"]
        record = next(r for r in history if len(r["removed_total"]) == depth)
        ledger = read_ledger(out / run)
        seen = [d for s in range(1, record["stage"] + 1) for d in ledger.get(s, [])]
        points.append({"arm": arm.name, "mode": arm.mode, "responses": arm.responses, "removed": depth,
                       "layers": record["removed_total"], "stage": record["stage"], "run": run,
                       "reused": record is not history[-1],
                       "steps": sum(r["steps"] for r in history[1: record["stage"] + 1]),
                       "examples": len(seen), "data": data_digest(seen), "scores": record["scores"],
                       "retention": record["retention"]})
    return points


def arm_curve(arm: Arm, depths: Sequence[int], runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every stage an arm recorded (the baseline once): a gradual arm gives one point per stage."""
    curve: dict[int, dict[str, Any]] = {}
    for depth in arm.run_depths(depths):
        for r in runs[arm.run_name(depth)]["history"]:
            curve.setdefault(len(r["removed_total"]), {"removed": len(r["removed_total"]),
                                                       "retention": r["retention"]})
    return [curve[k] for k in sorted(curve)]


def run(plan: Plan) -> dict[str, Any]:
    """Run every arm and write compare.json / compare.md / compare.png into `plan.out`."""
    from gradual.compare_report import write_outputs

    t0 = time.perf_counter()
    clear = check_out(plan)
    validate_arms(plan)
    if clear:
        shutil.rmtree(plan.out)
    save_plan(plan)
    baseline = prepare(plan)
    runs: dict[str, dict[str, Any]] = {}
    for arm in plan.arms:
        for depth in arm.run_depths(plan.depths):
            layers = baseline["ranking"][str(depth)] if arm.mode == "one_shot" else None
            print(f"gradual compare: run {arm.run_name(depth)}", flush=True)
            runs[arm.run_name(depth)] = fit_run(plan, arm, depth, layers)
    points = sorted((p for arm in plan.arms for p in arm_points(arm, plan.depths, runs, plan.out)),
                    key=lambda p: p["removed"])
    result = {"model": (plan.base.get("model") or {}).get("model", "smollm2-135m-instruct"),
              "depths": plan.depths, "arms": [asdict(a) for a in plan.arms], "baseline": baseline["scores"],
              "ranking": baseline["ranking"], "points": points,
              "curves": {a.name: arm_curve(a, plan.depths, runs) for a in plan.arms},
              "timings": {"prepare_s": baseline["timings"]["total_s"],
                          "runs": {name: {"seconds": r["seconds"], "optimizer_steps": r["optimizer_steps"]}
                                   for name, r in runs.items()},
                          "total_s": time.perf_counter() - t0}}
    write_outputs(plan.out, result)
    return result


def main(argv: Sequence[str]) -> int:
    plan = load_plan(argv)
    run(plan)
    print(f"gradual compare: wrote {plan.out / 'compare.md'}, compare.json and compare.png")
    return 0
