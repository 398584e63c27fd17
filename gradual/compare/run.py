"""Running a comparison: check every arm's config with the `gradual fit` parser before any arm runs, evaluate the
shared baseline and ranking once, run (or read back) every arm's fit runs, and collect their points and curves.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from gradual.compare.arms import BASELINE_FILE, arm_config, arm_runs, check_budgets, recipe
from gradual.compare.plan import Arm, Budget, Plan, check_out, load_plan, save_plan
from gradual.errors import UsageError, fit_error_line, usage_error_in
from gradual.sgr import SGRConfig


def make_cli(config: dict[str, Any]) -> Any:
    """A `gradual fit` LightningCLI of this config, not run; bad options raise a one-line UsageError."""
    from gradual.lightning_cli import GradualCLI

    try:
        return GradualCLI(args=["--config", yaml.safe_dump(config, sort_keys=False)], run=False,
                          parser_kwargs={"exit_on_error": False})
    except argparse.ArgumentError as e:
        raise UsageError(f"--config is not a valid `gradual fit` config: {fit_error_line(str(e))}") from None
    except ValueError as e:  # jsonargparse wraps errors raised while instantiating classes
        raise (usage_error_in(e) or e) from None


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

        self.parser = self.check(config, lambda c: ParseOnly(args=copy.deepcopy(c), run=False,
                                                              parser_kwargs={"exit_on_error": False}).parser)

    def check(self, config: dict[str, Any], parse: Any = None) -> Any:
        """Parse `config`; a rejection raises argparse.ArgumentError."""
        return (parse or self.parser.parse_object)(copy.deepcopy(config))


def validate_arms(plan: Plan) -> dict[str, dict[int, Budget]]:
    """Check everything before any arm runs, loading no weights: the depths against the model, every arm's config
    at every depth with the `gradual fit` parser (one line naming the arm and its overrides), the budgets, and
    every arm built once at its deepest run (values its classes refuse, e.g. recovery.loss: kdd)."""
    from gradual.models import model_depth

    try:  # first: the parser refuses a model name of the wrong type before model_depth reads it
        fit = FitParser(arm_config(plan, Arm("baseline", "one_shot"), max(plan.depths)))
    except argparse.ArgumentError as e:
        raise UsageError(f"--config is not a valid `gradual fit` config: {fit_error_line(str(e))}") from None
    model = plan.base.get("model") or {}
    depth0 = model_depth(model.get("model", "smollm2-135m-instruct"), bool(model.get("trust_remote_code", False)))
    if max(plan.depths) >= depth0:
        raise UsageError(f"depths={','.join(map(str, plan.depths))} is invalid for a model of {depth0} layers; "
                         f"allowed: 1..{depth0 - 1}")
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
    module.check_run_dir(cli.trainer, cli.datamodule)
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
    stop = results.get("stop_reason")
    if stop and stop != "schedule complete":  # an abandoned stage (non-finite loss) or a failed evaluation
        raise UsageError(f"run {name} ended early: {stop}; see {run_dir / 'report.md'}")
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
    from gradual.compare.callbacks import data_digest, read_ledger

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
            curve[len(r["removed_total"])] = {"removed": len(r["removed_total"]), "retention": r["retention"],
                                              "intervals": r.get("intervals") or {}}
    return [curve[k] for k in sorted(curve)]


def run(plan: Plan) -> dict[str, Any]:
    """Run every arm and write compare.json / compare.md / compare.png into `plan.out`."""
    from gradual.compare.outputs import flag_below_no_recovery, paired_differences, write_outputs

    t0 = time.perf_counter()
    from gradual.lightning_cli import held_logs

    with held_logs(replay=False):  # the arms' CLIs, built only to check them, print nothing
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
    result["differences"] = paired_differences(result)
    write_outputs(plan.out, result)
    return result


def main(argv: Sequence[str]) -> int:
    """`gradual compare`: plan, check, run every arm, write the report."""
    plan = load_plan(argv)
    if plan is None:  # --help or --print_config
        return 0
    run(plan)
    print(f"gradual compare: wrote {plan.out / 'compare.md'}, compare.json and compare.png")
    return 0
