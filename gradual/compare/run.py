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
from typing import Any

import yaml

from gradual.compare.arms import BASELINE_FILE, arm_config, arm_runs, arm_seeds, check_budgets, recipe
from gradual.compare.plan import Arm, Budget, Plan, check_out, load_plan, save_plan
from gradual.compare.pooling import pool_point, pooled_figures
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
    """Load the unpruned model once: rank its layers for the one-shot arms and evaluate the shared baseline. A
    comparison resumed with depths its baseline has no ranking for ranks those on the same unpruned model and keeps
    the baseline's scores."""
    path = plan.out / BASELINE_FILE
    saved = json.loads(path.read_text()) if path.is_file() else None
    missing = [d for d in plan.depths if saved is None or str(d) not in saved["ranking"]]
    if saved is not None and not missing:
        return saved
    from gradual import surgery
    from gradual.callbacks import LmEvalEvaluation, TaskEvaluation

    t0 = time.perf_counter()
    cli = make_cli(arm_config(plan, Arm("baseline", "one_shot"), max(plan.depths)))
    module = cli.model
    module.configure_model()
    module.to(cli.trainer.strategy.root_device)
    t = time.perf_counter()
    kept = surgery.original_indices(module.model)  # schedule.layers are original indices (the model may be pruned)
    ranking = {str(d): [kept[i] for i in module.choose_layers(d)[0]] for d in missing}
    scoring_s = time.perf_counter() - t
    if saved is not None:
        merged = {**saved["ranking"], **ranking}
        saved["ranking"] = {d: merged[d] for d in sorted(merged, key=int)}
        path.write_text(json.dumps(saved, indent=2))
        return saved
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


def fit_run(plan: Plan, arm: Arm, depth: int, layers: list[int] | None, seed: int) -> dict[str, Any]:
    """One arm's `gradual fit` run to `depth` under training `seed`, resumed or read back if it already ran; its
    history, this invocation's timing, and the stages' own recorded seconds (which a run read back keeps: what the
    run cost when it ran)."""
    config = arm_config(plan, arm, depth, layers, seed)
    name = arm.run_name(depth, plan.seed_tag(seed))
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
    reached = len(results["stages"][-1]["removed_total"])
    stop = results.get("stop_reason")
    if stop and stop != "schedule complete":  # an abandoned stage (non-finite loss) or a failed evaluation
        raise UsageError(f"run {name} ended early: {stop}; see {run_dir / 'report.md'}")
    if reached != depth:
        raise UsageError(f"run {name} stopped at {reached} layers removed instead of {depth}; remove callbacks that "
                         "stop training early from the config")
    return {**read_run(results, config), "seconds": time.perf_counter() - t, "optimizer_steps": steps}


def read_run(results: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What a comparison keeps of a run's `results.json` (its stages so far): history, in-data tasks, recipe, and
    the steps and stage seconds it recorded."""
    history = results["stages"]
    trained = sum(r["steps"] for r in history)
    return {"history": history, "in_data": results.get("in_data_tasks", []), "recipe": recipe(config, trained),
            "responses": ((config.get("data") or {}).get("sgr") or {}).get("responses", SGRConfig.responses)
            if trained else None,
            "seconds": 0.0, "optimizer_steps": None, "trained_steps": trained,
            "stage_seconds": sum(stage_seconds(r) for r in history),
            "train_seconds": sum(float((r.get("timings") or {}).get("train_s", 0.0)) for r in history)}


def stage_seconds(record: dict[str, Any]) -> float:
    """The wall time a stage recorded: layer scoring, repair, surgery, training, merge, evaluation, checkpoint."""
    return sum(float(v) for v in (record.get("timings") or {}).values() if isinstance(v, int | float))


def seed_run_names(plan: Plan, arm: Arm, seed: int, runs_of: dict[int, int]) -> dict[int, str]:
    """Target depth → the name of the run that reaches it under `seed`."""
    return {d: arm.run_name(r, plan.seed_tag(seed)) for d, r in runs_of.items()}


def seed_runs(plan: Plan, arm: Arm, seed: int, runs_of: dict[int, int]) -> list[str]:
    """The names of the runs the arm needs under `seed`, shallowest first."""
    return [arm.run_name(r, plan.seed_tag(seed)) for r in sorted(set(runs_of.values()))]


def seed_point(plan: Plan, arm: Arm, seed: int, depth: int, run: str, runs: dict[str, dict[str, Any]],
               budget: Budget) -> dict[str, Any]:
    """The arm's record at `depth` under one seed (the last stage with that many layers removed, so a consolidation
    stage counts), with its steps (consolidation included) and the prompts it trained on."""
    from gradual.compare.callbacks import data_digest, read_ledger

    history = runs[run]["history"]
    record = [r for r in history if len(r["removed_total"]) == depth][-1]
    ledger = read_ledger(plan.out / run)
    seen = [d for s in range(1, record["stage"] + 1) for d in ledger.get(s, [])]
    trained = history[1: record["stage"] + 1]
    return {"arm": arm.name, "mode": arm.mode, "recipe": runs[run]["recipe"], "responses": runs[run]["responses"],
            "removed": depth, "layers": record["removed_total"], "stage": record["stage"], "run": run,
            "reused": record is not history[-1], "steps": sum(r["steps"] for r in trained),
            "final_steps": sum(r["steps"] for r in trained if r.get("consolidation")),
            "budget": budget.total, "examples": len(seen), "data": data_digest(seen), "in_data": runs[run]["in_data"],
            "scores": record["scores"], "retention": record["retention"], "intervals": record.get("intervals") or {},
            "seed": seed}


def arm_points(plan: Plan, arm: Arm, seeds: list[int], runs_of: dict[int, int], runs: dict[str, dict[str, Any]],
               budgets: dict[int, Budget], baseline: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The arm's point at every target depth, its seeds pooled (`gradual.compare.pooling.pool_point`)."""
    points = []
    for depth in runs_of:
        per_seed = [seed_point(plan, arm, seed, depth, seed_run_names(plan, arm, seed, runs_of)[depth], runs,
                               budgets[depth]) for seed in seeds]
        points.append(pool_point(per_seed, baseline))
    return points


def arm_curve(plan: Plan, arm: Arm, seeds: list[int], runs_of: dict[int, int],
              runs: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The points an arm's curve draws (the baseline once): every stage of a gradual run without consolidation,
    else the end of every run (stages before a consolidation, or a one-shot run's, are not comparable points); at
    each, the seeds pooled (`pooling.pooled_figures`: one seed's are its stage record's own)."""
    curves: list[dict[int, dict[str, Any]]] = []
    in_data: list[str] = []
    for seed in seeds:
        curve: dict[int, dict[str, Any]] = {}
        for run in seed_runs(plan, arm, seed, runs_of):
            history = runs[run]["history"]
            in_data = runs[run]["in_data"]
            every = arm.mode == "gradual" and not any(r.get("consolidation") for r in history)
            for r in history if every else [history[0], history[-1]]:
                curve[len(r["removed_total"])] = r
        curves.append(curve)
    shared = sorted(set.intersection(*(set(c) for c in curves)))
    out = []
    for removed in shared:
        figures = pooled_figures([c[removed] for c in curves], baseline, in_data)
        out.append({"removed": removed, "retention": figures["retention"], "intervals": figures["intervals"]})
    return out


def curve_costs(plan: Plan, seeds_of: dict[str, list[int]], runs_of: dict[str, dict[int, int]],
                runs: dict[str, dict[str, Any]], budgets: dict[str, dict[int, Budget]]) -> dict[str, dict[str, Any]]:
    """Per arm, what drawing its whole curve costs: the recovery steps and the stages' recorded wall time (layer
    scoring, training, evaluation, ...; not model loading nor the shared SGR answers) of every run it needs for every
    target depth — one run per depth for a one-shot arm, one run to the deepest target for a gradual arm without
    consolidation — per seed (seconds averaged over the seeds), beside the per-model budget (steps per removed
    layer), and the ratio to the one-shot arm of the same recipe (the same overrides; the same `final_share` where
    there is one) that trains."""
    costs: dict[str, dict[str, Any]] = {}
    deepest = max(plan.depths)
    for arm in plan.arms:
        per_seed = [seed_runs(plan, arm, seed, runs_of[arm.name]) for seed in seeds_of[arm.name]]
        costs[arm.name] = {
            "mode": arm.mode, "runs": per_seed[0], "seeds": len(per_seed),
            "steps": sum(runs[n]["trained_steps"] for n in per_seed[0]),
            "seconds": sum(runs[n]["stage_seconds"] for names in per_seed for n in names) / len(per_seed),
            "train_seconds": sum(runs[n]["train_seconds"] for names in per_seed for n in names) / len(per_seed),
            "steps_per_removed_layer": budgets[arm.name][deepest].total / deepest, "one_shot": None}
    for arm in plan.arms:
        if arm.mode == "one_shot":
            continue
        same = [a for a in plan.arms if a.mode == "one_shot" and a.overrides == arm.overrides
                and costs[a.name]["steps"]]
        match = next((a for a in same if a.final_share == arm.final_share), same[0] if same else None)
        if match is not None:
            ref, cost = costs[match.name], costs[arm.name]
            costs[arm.name]["one_shot"] = {"arm": match.name, "steps_ratio": cost["steps"] / ref["steps"],
                                           "seconds_ratio": cost["seconds"] / ref["seconds"] if ref["seconds"]
                                           else None}
    return costs


def reached_so_far(plan: Plan, seeds_of: dict[str, list[int]], runs_of: dict[str, dict[int, int]],
                   baseline: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[int, int]]]:
    """`--report-only`: the runs on disk (finished or not: a gradual run's stages so far), and per arm the target
    depths that every seed's run has reached, each with the run that reaches it."""
    runs: dict[str, dict[str, Any]] = {}
    for arm in plan.arms:
        for seed in seeds_of[arm.name]:
            for depth in sorted(set(runs_of[arm.name].values())):
                name = arm.run_name(depth, plan.seed_tag(seed))
                path = plan.out / name / "results.json"
                if path.is_file():
                    layers = baseline["ranking"][str(depth)] if arm.mode == "one_shot" else None
                    runs[name] = read_run(json.loads(path.read_text()), arm_config(plan, arm, depth, layers, seed))
                    runs[name]["seconds"] = runs[name]["stage_seconds"]  # what it has cost so far, as it recorded

    def reached(name: str, depth: int) -> bool:
        return name in runs and any(len(r["removed_total"]) == depth for r in runs[name]["history"])

    present = {arm.name: {d: r for d, r in runs_of[arm.name].items()
                          if all(reached(arm.run_name(r, plan.seed_tag(s)), d) for s in seeds_of[arm.name])}
               for arm in plan.arms}
    return runs, present


def run(plan: Plan) -> dict[str, Any]:
    """Run every arm and write compare.json / compare.md / compare.png into `plan.out`; with `report_only`, run
    nothing and write them from the runs on disk (the depths reached so far)."""
    from gradual.compare.outputs import flag_below_no_recovery, paired_differences, write_outputs

    t0 = time.perf_counter()
    from gradual.lightning_cli import held_logs

    if plan.report_only:
        check_out(plan)
        if not (plan.out / BASELINE_FILE).is_file():
            raise UsageError(f"--report-only: {str(plan.out)!r} holds no comparison yet (no {BASELINE_FILE}); run it "
                             "without --report-only first")
        baseline = json.loads((plan.out / BASELINE_FILE).read_text())
        budgets = check_budgets(plan, baseline["depth"])
    else:
        with held_logs(replay=False):  # the arms' CLIs, built only to check them, print nothing
            clear = check_out(plan)
            budgets = validate_arms(plan)
        if clear:
            shutil.rmtree(plan.out)
        save_plan(plan)
        baseline = prepare(plan)
    runs: dict[str, dict[str, Any]] = {}
    runs_of = {arm.name: arm_runs(plan, arm) for arm in plan.arms}
    seeds_of = {arm.name: arm_seeds(plan, arm, budgets[arm.name]) for arm in plan.arms}
    if plan.report_only:
        runs, runs_of = reached_so_far(plan, seeds_of, runs_of, baseline)
    for seed in [] if plan.report_only else plan.seeds:  # seed by seed: the first seed's comparison is complete
        for arm in [a for a in plan.arms if seed in seeds_of[a.name]]:  # before the next seed starts
            for depth in sorted(set(runs_of[arm.name].values())):
                layers = baseline["ranking"][str(depth)] if arm.mode == "one_shot" else None
                name = arm.run_name(depth, plan.seed_tag(seed))
                print(f"gradual compare: run {name}", flush=True)
                runs[name] = fit_run(plan, arm, depth, layers, seed)
    points = sorted((p for arm in plan.arms
                     for p in arm_points(plan, arm, seeds_of[arm.name], runs_of[arm.name], runs, budgets[arm.name],
                                         baseline["scores"])), key=lambda p: p["removed"])
    no_recovery = {str(d): next((a.name for a in plan.arms if budgets[a.name][d].total == 0), None)
                   for d in plan.depths}
    first = {a.name: seeds_of[a.name][0] for a in plan.arms}
    result = {"model": (plan.base.get("model") or {}).get("model", "smollm2-135m-instruct"),
              "depths": plan.depths, "budget_per_layer": plan.budget_per_layer, "seeds": plan.seeds,
              "partial": plan.report_only,
              "arms": [{**asdict(a), "runs": {str(d): n for d, n in seed_run_names(plan, a, first[a.name],
                                                                                  runs_of[a.name]).items()},
                        "seeds": seeds_of[a.name],
                        "budget": {str(d): asdict(b) for d, b in budgets[a.name].items()}} for a in plan.arms],
              "in_data_tasks": baseline.get("in_data_tasks", []), "baseline": baseline["scores"],
              "ranking": baseline["ranking"], "no_recovery": no_recovery, "points": points,
              "curves": {a.name: arm_curve(plan, a, seeds_of[a.name], runs_of[a.name], runs, baseline["scores"])
                         for a in plan.arms},
              "curve_costs": curve_costs(plan, seeds_of, runs_of, runs, budgets),
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
