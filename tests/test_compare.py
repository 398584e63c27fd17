"""`gradual compare` on a tiny random Llama: equal depth, budget and data; overrides reach the runs; one shared
baseline; the report's group columns and no-recovery flag; bad input refused in one line before any arm runs."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradual import compare
from gradual.cli import main
from gradual.compare import Arm, FitParser, Plan, arm_budget, arm_config, arm_runs, load_plan, run
from gradual.compare.outputs import flag_below_no_recovery, write_outputs
from gradual.errors import UsageError
from gradual.lightning_cli import GradualCLI
from gradual.stages import Schedule
from gradual.tasks import evaluate

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
ARMS = ["no_recovery", "one_shot_dataset", "one_shot_sgr", "gradual_sgr"]
KD_FINAL = {"name": "gradual_kd_final", "mode": "gradual", "final_share": 0.5,
            "overrides": {"model.recovery.loss": "kd", "model.recovery.params": "near_cut"}}
FIXTURE_ARMS = [{"name": "no_recovery", "mode": "one_shot", "steps_per_stage": 0, "responses": "dataset"},
                {"name": "one_shot_dataset", "mode": "one_shot", "responses": "dataset"},
                {"name": "one_shot_sgr", "mode": "one_shot", "overrides": {"data.sgr.responses": "sgr"}},
                {"name": "gradual_sgr", "mode": "gradual", "steps_per_stage": None, "responses": "sgr"}, KD_FINAL]


def compare_config(tmp: Path, compare: dict[str, Any] | None = None) -> Path:
    """The smoke fit config (2 recovery steps per layer, SGR cache in tmp) plus a `compare:` section."""
    config = yaml.safe_load(SMOKE.read_text())
    config["data"]["sgr"]["cache_dir"] = str(tmp / "sgr-cache")
    config["compare"] = compare if compare is not None else {"depths": [1, 2], "out": str(tmp / "out")}
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, int]:
    """One full comparison (the four classic arms and a gradual KD arm with consolidation, depths 1 and 2),
    counting every call of the task evaluator."""
    tmp = tmp_path_factory.mktemp("compare")
    calls = []
    config = compare_config(tmp, {"depths": [1, 2], "out": str(tmp / "out"), "arms": FIXTURE_ARMS})
    with pytest.MonkeyPatch.context() as mp:  # the real evaluator, counted
        mp.setattr("gradual.callbacks.evaluation.evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
        result = run(load_plan(["--config", str(config)]))
    return result, tmp, len(calls)


def point(result: dict[str, Any], arm: str, removed: int) -> dict[str, Any]:
    return next(p for p in result["points"] if p["arm"] == arm and p["removed"] == removed)


def test_arms_reach_the_same_depth_with_equal_steps_and_data(comparison: tuple[dict[str, Any], Path, int]) -> None:
    result, tmp, _ = comparison
    for removed in (1, 2):
        points = [point(result, arm, removed) for arm in ARMS]
        assert [len(p["layers"]) for p in points] == [removed] * 4
        assert [p["steps"] for p in points] == [0] + [2 * removed] * 3
        assert [p["examples"] for p in points] == [0] + [2 * 2 * removed] * 3  # batch 2
        assert len({p["data"] for p in points[1:]}) == 1, "the trained arms saw different prompts"
        # one-shot arms remove the same layers, chosen once on the unpruned model
        assert points[0]["layers"] == points[1]["layers"] == points[2]["layers"] == result["ranking"][str(removed)]
    runs = result["timings"]["runs"]
    assert runs["one_shot_sgr-2"]["optimizer_steps"] == runs["gradual_sgr-2"]["optimizer_steps"] == 4
    assert runs["one_shot_dataset-1"]["optimizer_steps"] == 2 and runs["no_recovery-2"]["optimizer_steps"] == 0
    assert "gradual_sgr-1" not in runs, "the gradual arm's depth-1 point is its stage 1, not a second run"
    gradual = point(result, "gradual_sgr", 1)
    assert gradual["reused"] and gradual["run"] == "gradual_sgr-2" and gradual["stage"] == 1
    stages = json.loads((tmp / "out" / "gradual_sgr-2" / "results.json").read_text())["stages"]
    assert [s["steps"] for s in stages] == [0, 2, 2]
    assert len(list((tmp / "sgr-cache").glob("*.jsonl"))) == 1, "SGR arms share one cached set of teacher answers"


def test_budgets_are_equal_across_arms_counting_final_steps(comparison: tuple[dict[str, Any], Path, int]) -> None:
    result, tmp, _ = comparison
    saved = json.loads((tmp / "out" / "compare.json").read_text())
    assert saved["budget_per_layer"] == 2
    budgets = {a["name"]: a["budget"] for a in saved["arms"]}
    for removed in (1, 2):
        totals = {name: b[str(removed)]["total"] for name, b in budgets.items()}
        assert totals == {"no_recovery": 0, **dict.fromkeys([*ARMS[1:], "gradual_kd_final"], 2 * removed)}
        kd = point(saved, "gradual_kd_final", removed)
        assert kd["steps"] == kd["budget"] == 2 * removed and kd["final_steps"] == removed  # share 0.5
    assert budgets["gradual_kd_final"]["2"] == {"steps_per_stage": 1, "final_steps": 2, "total": 4}
    table = (tmp / "out" / "compare.md").read_text()
    assert "| 2 | gradual_kd_final | gradual | kd on sgr, near_cut | " in table
    assert "| 4 (2 final) |" in table and "planned" not in table


def test_gradual_arm_with_consolidation_runs_per_depth(comparison: tuple[dict[str, Any], Path, int]) -> None:
    result, tmp, _ = comparison
    runs = result["timings"]["runs"]
    assert runs["gradual_kd_final-1"]["optimizer_steps"] == 2 and runs["gradual_kd_final-2"]["optimizer_steps"] == 4
    for removed in (1, 2):
        kd = point(result, "gradual_kd_final", removed)
        assert kd["run"] == f"gradual_kd_final-{removed}" and not kd["reused"] and kd["stage"] == removed + 1
    saved = json.loads((tmp / "out" / "gradual_kd_final-2" / "results.json").read_text())
    assert [(s["steps"], s["consolidation"]) for s in saved["stages"]] == [(0, False), (1, False), (1, False),
                                                                           (2, True)]
    config = saved["config"]  # the run's identity: the arm's overrides reached its `gradual fit` run
    assert config["recovery"]["loss"] == "kd" and config["recovery"]["params"] == "near_cut"
    assert config["schedule"]["final_steps"] == 2 and config["schedule"]["steps_per_stage"] == 1
    assert json.loads((tmp / "out" / "gradual_sgr-2" / "results.json").read_text())["config"]["recovery"]["loss"] \
        == "sft"
    assert [c["removed"] for c in result["curves"]["gradual_kd_final"]] == [0, 1, 2]


def test_budget_split_places_the_remainder_in_the_consolidation(tmp_path: Path) -> None:
    arms = [{"name": "one_shot_final", "mode": "one_shot", "final_share": 0.3},
            {"name": "gradual_final", "mode": "gradual", "final_share": 0.3},
            {"name": "gradual_all_final", "mode": "gradual", "final_share": 1.0},
            {"name": "plain", "mode": "gradual"}]
    plan = load_plan(["--config", str(compare_config(tmp_path, {"depths": [3, 4], "budget_per_layer": 5,
                                                                 "arms": arms}))])
    budgets = {a.name: {d: arm_budget(plan, a, d) for d in plan.depths} for a in plan.arms}
    # 3 × 5 = 15: round(4.5) = 4 final, 11 over 3 stages = 3 each, the remainder 2 joins the final: 9 + 6
    assert (budgets["gradual_final"][3].steps_per_stage, budgets["gradual_final"][3].final_steps) == (3, 6)
    assert (budgets["one_shot_final"][3].steps_per_stage, budgets["one_shot_final"][3].final_steps) == (3, 6)
    assert (budgets["gradual_final"][4].steps_per_stage, budgets["gradual_final"][4].final_steps) == (3, 8)
    assert (budgets["gradual_all_final"][4].steps_per_stage, budgets["gradual_all_final"][4].final_steps) == (0, 20)
    assert {b[d].total for b in budgets.values() for d in (3, 4)} == {15, 20}
    assert all(b[d].total == 5 * d for b in budgets.values() for d in (3, 4))
    runs = {a.name: arm_runs(plan, a) for a in plan.arms}
    assert runs["plain"] == {3: 4, 4: 4} and runs["gradual_final"] == {3: 3, 4: 4}


def shipped_plan(name: str) -> tuple[Plan, dict[str, dict[int, Any]]]:
    """configs/<name>.yaml's plan, each arm's config at each of its run depths checked by the `gradual fit` parser
    (no model needed), and every arm's budgets on SmolLM2's 30 layers."""
    plan = load_plan(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    fit = FitParser(arm_config(plan, Arm("baseline", "one_shot"), max(plan.depths)))
    for arm in plan.arms:
        for depth in set(arm_runs(plan, arm).values()):
            fit.check(arm_config(plan, arm, depth))
    return plan, compare.check_budgets(plan, 30)

def test_shipped_config_parses_with_equal_budgets() -> None:
    """configs/compare.yaml: every arm's config at every run depth passes the `gradual fit` parser (no model needed),
    and every trained arm gets the same budget at each depth, the gradual arm's consolidation included."""
    plan, budgets = shipped_plan("compare")
    assert plan.depths == [4, 8, 12]
    assert {b[d].total for b in budgets.values() for d in plan.depths} == {0, 48, 96, 144}
    assert budgets["gradual_kd_tasks"][12].total == budgets["lora_kd_tasks"][12].total == 144
    assert budgets["gradual_kd_final"][8].total == budgets["lora_kd_tasks"][8].total == 96
    assert (budgets["gradual_kd_final"][8].steps_per_stage, budgets["gradual_kd_final"][8].final_steps) == (6, 48)
    assert (budgets["gradual_kd_final"][4].steps_per_stage, budgets["gradual_kd_final"][4].final_steps) == (6, 24)
    later = next(a for a in plan.arms if a.name == "gradual_kd_later")
    assert budgets["gradual_kd_later"][8].total == 96 and arm_runs(plan, later) == {4: 4, 8: 8, 12: 12}
    assert Schedule(**arm_config(plan, later, 4)["model"]["schedule"]).stages(30) == [(1, 8), (1, 11), (1, 13),
                                                                                     (1, 16)]


def test_transfer_config_parses_with_equal_budgets_and_the_same_held_out_tasks_in_every_arm() -> None:
    """configs/transfer.yaml (issue 20's measurement): every arm parses at 4 and 8 with the sweep's budget, and no
    arm's data holds a problem of the five tasks every arm is read on as held-out; the broad arms make the arithmetic
    pair near held-out, the self_text arm every task far."""
    from gradual.retention import in_group

    plan, budgets = shipped_plan("transfer")
    assert plan.depths == [4, 8] and {b[d].total for b in budgets.values() for d in plan.depths} == {0, 48, 96}

    def in_data(arm: Arm) -> list[str]:
        sources = arm_config(plan, arm, 4)["data"].get("sources") or [{"kind": "sgr", "tasks": ["successor", "copy",
                                                                                                  "category"]}]
        return sorted({t for s in sources for t in s.get("tasks") or []})

    data = {arm.name: in_data(arm) for arm in plan.arms}
    held_out = {"uppercase", "word_sequence_reversal", "products", "chain_sum", "needle_haystack"}
    assert all(not held_out & set(tasks) for tasks in data.values())
    assert data["lora_kd_self_text"] == [] and in_group("uppercase", "far_held_out", [])
    assert in_group("products", "near_held_out", data["lora_kd_broad"])
    assert in_group("products", "far_held_out", data["lora_kd_tasks"])

def test_gemma_config_runs_the_smollm2_recipe_at_2_and_4_of_18_layers() -> None:
    """configs/gemma3-270m-compare.yaml (issue 20, section 4): the sweep's budget per removed layer at 2 and 4 of
    Gemma3-270M's 18 layers, recovery on copy and category, uppercase near held-out, needle_haystack and brackets
    far; the gradual arm is one run to 4."""
    from gradual.retention import in_group

    plan, _ = shipped_plan("gemma3-270m-compare")
    budgets = compare.check_budgets(plan, 18)
    assert plan.depths == [2, 4] and {b[d].total for b in budgets.values() for d in plan.depths} == {0, 24, 48}
    gradual = next(a for a in plan.arms if a.mode == "gradual")
    assert arm_runs(plan, gradual) == {2: 4, 4: 4}
    in_data = arm_config(plan, gradual, 4)["data"]["sources"][0]["tasks"]
    assert in_data == ["copy", "category"] and in_group("uppercase", "near_held_out", in_data)
    assert in_group("needle_haystack", "far_held_out", in_data) and in_group("brackets", "far_held_out", in_data)


def test_an_arm_with_steps_growth_splits_the_same_budget_unequally(tmp_path: Path) -> None:
    """`model.schedule.steps_growth` in an arm: `gradual compare` gives it k × budget_per_layer steps at each depth
    (counted by the fit's `Schedule.total_steps`), later stages more, one run per depth; with a consolidation too."""
    arms = [{"name": "plain", "mode": "gradual"},
            {"name": "later", "mode": "gradual", "overrides": {"model.schedule.steps_growth": 1.5}},
            {"name": "later_final", "mode": "gradual", "final_share": 0.5,
             "overrides": {"model.schedule.steps_growth": 1.5}}]
    plan = load_plan(["--config", str(compare_config(tmp_path, {"depths": [2, 4], "budget_per_layer": 5,
                                                                 "out": str(tmp_path / "out"), "arms": arms}))])
    budgets = compare.check_budgets(plan, 6)
    assert {name: {d: b.total for d, b in by_depth.items()} for name, by_depth in budgets.items()} == {
        name: {2: 10, 4: 20} for name in ("plain", "later", "later_final")}
    stages = {a.name: Schedule(**arm_config(plan, a, 4)["model"]["schedule"]).stages(6) for a in plan.arms}
    # 20 as 1 : 1.5 : 2.25 : 3.375 = 2.46 + 3.69 + 5.54 + 8.31; rounded down 18, the 2 left to the largest remainders
    assert stages["plain"] == [(1, 5)] * 4 and stages["later"] == [(1, 2), (1, 4), (1, 6), (1, 8)]
    # half of 20 in the consolidation, 2 per removal stage (8 in all, shared 1 + 2 + 2 + 3), the remainder 2 joins it
    assert stages["later_final"] == [(1, 1), (1, 2), (1, 2), (1, 3), (0, 12)]
    assert {a.name: arm_runs(plan, a) for a in plan.arms} == {"plain": {2: 4, 4: 4}, "later": {2: 2, 4: 4},
                                                              "later_final": {2: 2, 4: 4}}
    fit = FitParser(arm_config(plan, Arm("baseline", "one_shot"), 4))
    for arm in plan.arms:
        fit.check(arm_config(plan, arm, 4))


def test_seeds_set_model_seed_and_seed_everything_in_their_own_run_dirs(tmp_path: Path) -> None:
    """`compare.seeds` (or --seeds) lists training seeds; the base config's seed keeps today's config and run
    directory, another sets model.seed and seed_everything and runs in `<arm>-<depth>-s<seed>`."""
    config = compare_config(tmp_path, {"depths": [1, 2], "out": str(tmp_path / "out"), "seeds": [2, 0]})
    plan = load_plan(["--config", str(config)])
    assert plan.seeds == [2, 0] and plan.base_seed == 0
    assert load_plan(["--config", str(config), "--seeds", "0,1"]).seeds == [0, 1]
    assert load_plan(["--config", str(compare_config(tmp_path))]).seeds == [0]
    arm = plan.arms[1]
    assert arm_config(plan, arm, 2, seed=0) == arm_config(plan, arm, 2)
    other = arm_config(plan, arm, 2, seed=2)
    assert other["model"]["run_dir"] == str(tmp_path / "out" / f"{arm.name}-2-s2")
    assert (other["model"]["seed"], other["seed_everything"]) == (2, 2)
    FitParser(arm_config(plan, Arm("baseline", "one_shot"), 2)).check(other)
    untrained, trained = (compare.arm_seeds(plan, a, compare.check_budgets(plan, 6)[a.name]) for a in plan.arms[:2])
    assert (untrained, trained) == ([0], [2, 0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["compare", "transfer", "gemma3-270m-compare"])
def test_shipped_config_builds_every_arm_on_its_model(name: str) -> None:
    """Every arm of configs/compare.yaml and configs/transfer.yaml built once on the offline SmolLM2, and of
    configs/gemma3-270m-compare.yaml on the offline Gemma3-270M (their configs only; no weights load)."""
    compare.validate_arms(load_plan(["--config", str(ROOT / "configs" / f"{name}.yaml")]))


def test_baseline_is_evaluated_once_and_matches_a_plain_fit(comparison: tuple[dict[str, Any], Path, int],
                                                            tmp_path: Path) -> None:
    result, tmp, calls = comparison
    evaluated_stages = sum(len(json.loads((tmp / "out" / name / "results.json").read_text())["stages"]) - 1
                           for name in result["timings"]["runs"])
    # 3 one-shot arms at depths 1 and 2, 2 gradual stages, the KD arm's 1 + 1 and 2 + 1 stages
    assert calls == 1 + evaluated_stages == 1 + 8 + 5
    for name in result["timings"]["runs"]:
        stage_0 = json.loads((tmp / "out" / name / "stage_0" / "metrics.json").read_text())
        assert stage_0["scores"] == result["baseline"] and "tasks_s" not in stage_0["timings"]
    config = yaml.safe_load(SMOKE.read_text())
    config["model"]["run_dir"] = str(tmp_path / "plain")
    cli = GradualCLI(args=["--config", yaml.safe_dump(config)], run=False)
    cli.model.check_run_dir(cli.trainer, cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.history[0].scores == result["baseline"]


def test_table_json_and_plot_are_written(comparison: tuple[dict[str, Any], Path, int]) -> None:
    result, tmp, _ = comparison
    out = tmp / "out"
    saved = json.loads((out / "compare.json").read_text())
    assert saved["points"] == result["points"] and len(saved["points"]) == 10
    assert [c["removed"] for c in saved["curves"]["gradual_sgr"]] == [0, 1, 2]
    assert [c["removed"] for c in saved["curves"]["one_shot_sgr"]] == [0, 1, 2]
    assert [point(saved, arm, 2)["responses"] for arm in [*ARMS, "gradual_kd_final"]] == [None, "dataset", "sgr",
                                                                                          "sgr", "sgr"]
    assert saved["in_data_tasks"] == ["copy", "successor"] and saved["no_recovery"] == {"1": "no_recovery",
                                                                                       "2": "no_recovery"}
    table = (out / "compare.md").read_text()
    assert "| 2 | one_shot_dataset | one_shot | sft on dataset, lora |" in table
    assert "gradual_sgr (stage 1 of gradual_sgr-2)" in table
    assert "| 0 | baseline |" in table and "wrong_value" in table and "mc_successor (in-data)" in table
    assert "category (far held-out)" in table and "held-out below no recovery" in table
    # the group columns some point has: the tiny model's generative baselines are 0 (no generative retention), and
    # no task of copy's or successor's family is evaluated (no near held-out group)
    head = next(line for line in table.splitlines() if line.startswith("| removed | arm | mode |"))
    assert "| held-out cls. | far held-out cls. |" in head and "gen." not in head and "near" not in head
    assert "  - far held-out (nothing of their family did): category" in table
    assert "| gradual_sgr-2 |" in table.split("## Timings")[1]
    assert "## Paired differences" in table and "| 2 | no_recovery | gradual_sgr | held out classification |" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "configs" / "gradual_sgr-2.yaml").is_file()
    assert all(p["below_no_recovery"] is None if p["arm"] == "no_recovery" else isinstance(p["below_no_recovery"],
                                                                                            list)
               for p in saved["points"])


def test_report_flags_held_out_scores_below_no_recovery(comparison: tuple[dict[str, Any], Path, int],
                                                        tmp_path: Path) -> None:
    """A constructed case: the KD arm's held-out `category` ends below the no-recovery arm's at 2 layers."""
    result = copy.deepcopy(comparison[0])
    nothing, kd = point(result, "no_recovery", 2), point(result, "gradual_kd_final", 2)
    for p, score in ((nothing, 0.5), (kd, 0.25)):
        p["scores"]["category"]["score"] = score
    for key in ("successor", "mc_successor", "mc_category"):  # in-data keys never flag; held-out ones above don't
        kd["scores"][key]["score"] = nothing["scores"][key]["score"] - (0.1 if key == "successor" else -0.1)
    flag_below_no_recovery(result)
    assert kd["below_no_recovery"] == ["category"] and nothing["below_no_recovery"] is None
    write_outputs(tmp_path, result)
    table = (tmp_path / "compare.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 2 | gradual_kd_final | gradual |"))
    assert row.endswith("| **category** |")
    assert "- ▼ gradual_kd_final at 2 removed: category 0.25 < 0.50 (no_recovery)" in table
    scores = table.split("## Scores")[1]
    cells = next(line for line in scores.splitlines() if line.startswith("| 2 | gradual_kd_final |")).split(" | ")
    assert [c for c in cells if "▼" in c] == [cells[2 + list(result["baseline"]).index("category")]]
    assert json.loads((tmp_path / "compare.json").read_text())["points"] == result["points"]
    del result["no_recovery"]
    flag_below_no_recovery(result)
    write_outputs(tmp_path, result)
    assert "No arm trains 0 steps" in (tmp_path / "compare.md").read_text()


def test_rerun_reads_finished_runs_back(comparison: tuple[dict[str, Any], Path, int]) -> None:
    result, tmp, _ = comparison
    again = run(load_plan(["--config", str(tmp / "compare.yaml"), "--arms", "no_recovery,gradual_kd_final"]))
    assert all(r["optimizer_steps"] is None for r in again["timings"]["runs"].values())
    assert point(again, "gradual_kd_final", 2)["scores"] == point(result, "gradual_kd_final", 2)["scores"]


BAD = {
    "depths": (["--depths", "2,x"], None, "depths='2,x'"),
    "depth_too_deep": (["--depths", "6"], None, "depths=6 is invalid for a model of 6 layers"),
    "arm_name": (["--arms", "one_shot_sgr,magic"], None, "magic"),
    "mode": ([], {"arms": [{"name": "a", "mode": "sideways"}]}, "mode='sideways'"),
    "responses": ([], {"arms": [{"name": "a", "responses": "oracle"}]}, "responses='oracle'"),
    "arm_key": ([], {"arms": [{"name": "a", "step": 3}]}, "unknown key(s) step"),
    "section_key": ([], {"depth": [1]}, "unknown key(s) depth"),
    "missing_config": (["--config", "/nonexistent.yaml"], None, "/nonexistent.yaml"),
    "override_key": ([], {"arms": [{"name": "a", "overrides": {"model.recovery.temprature": 2.0}}]},
                     "arm 'a' (overrides model.recovery.temprature) is not a valid `gradual fit` config"),
    "override_section": ([], {"arms": [{"name": "a", "overrides": {"recovery.loss": "kd"}}]},
                         "arm 'a' (overrides recovery.loss)"),
    "override_type": ([], {"arms": [{"name": "a", "overrides": {"model.recovery.temperature": "hot"}}]},
                      "model.recovery.temperature='hot' is invalid"),
    "override_value": ([], {"arms": [{"name": "a", "overrides": {"model.recovery.loss": "kdd"}}]},
                       "arm 'a': recovery.loss='kdd' is unknown"),
    "override_managed": ([], {"arms": [{"name": "a", "overrides": {"model.schedule.max_layers": 1}}]},
                         "override model.schedule.max_layers is not allowed"),
    "override_section_managed": ([], {"arms": [{"name": "a", "overrides": {"model.schedule": {"mode": "gradual"}}}]},
                                 "override model.schedule is not allowed"),
    "final_share": ([], {"arms": [{"name": "a", "final_share": 1.5}]}, "final_share=1.5 is invalid"),
    "final_steps": ([], {"arms": [{"name": "a", "overrides": {"model.schedule.final_steps": "x"}}]},
                    "final_steps='x' is invalid"),
    "final_and_steps": ([], {"arms": [{"name": "a", "final_share": 0.5, "steps_per_stage": 2}]},
                        "sets both final_share and model.schedule.steps_per_stage"),
    "seeds": (["--seeds", "0,0"], None, "seeds='0,0' is invalid"),
    "override_seed": ([], {"arms": [{"name": "a", "overrides": {"model.seed": 3}}]},
                      "override model.seed is not allowed: `compare.seeds` sets the training seeds"),
    "unequal_budget": ([], {"arms": [{"name": "a"}, {"name": "b", "overrides": {"model.schedule.final_steps": 1}}]},
                       "unequal budgets at 1 layers removed: b=3 steps instead of 1 × 2 = 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_before_any_arm_runs(case: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    extra, section, needle = BAD[case]
    config = compare_config(tmp_path, {"depths": [1, 2], **(section or {})} if section else None)
    argv = ["compare", "--config", str(config), "--out", str(tmp_path / "out"), *extra]
    if extra[:1] == ["--config"]:
        argv = ["compare", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradual: error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_out_folder_of_another_comparison_is_refused(comparison: tuple[dict[str, Any], Path, int],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, tmp, _ = comparison
    config = yaml.safe_load((tmp / "compare.yaml").read_text())
    config["compare"]["budget_per_layer"] = 3
    other = tmp / "other_budget.yaml"
    other.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(other)]) == 2
    assert "holds a comparison of another config or budget" in capsys.readouterr().err
    assert (tmp / "out" / "compare.json").is_file()


def test_a_comparison_resumes_with_fewer_or_more_depths(comparison: tuple[dict[str, Any], Path, int],
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Depths are not part of a comparison's identity: running a few depths first, or adding one, reuses every run
    already there; a depth the baseline has no ranking for is ranked on the unpruned model, its scores kept."""
    _, tmp, _ = comparison
    out = tmp / "out"
    kept = tmp_path / "kept"  # the fixture's reports, restored for the other tests (the runs record their folder)
    shutil.copytree(out, kept, ignore=lambda d, names: [n for n in names if (Path(d) / n).is_dir()])
    baseline = json.loads((out / "baseline.json").read_text())
    saved = dict(baseline, ranking={"1": baseline["ranking"]["1"]})  # as if it had run depth 1 only
    (out / "baseline.json").write_text(json.dumps(saved))
    monkeypatch.setattr("gradual.callbacks.evaluation.evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    argv = ["compare", "--config", str(tmp / "compare.yaml"), "--arms", "no_recovery"]
    try:
        assert main([*argv, "--depths", "1"]) == 0  # fewer depths: resumes, runs nothing
        assert json.loads((out / "baseline.json").read_text())["ranking"] == {"1": baseline["ranking"]["1"]}
        assert main([*argv, "--depths", "1,2"]) == 0  # one more: ranked (the same layers as before), run read back
        assert json.loads((out / "baseline.json").read_text()) == baseline
    finally:
        shutil.copytree(kept, out, dirs_exist_ok=True)


def test_every_pair_of_arms_gets_a_paired_difference_with_its_interval(
        comparison: tuple[dict[str, Any], Path, int]) -> None:
    from gradual.retention import in_group

    result, tmp, _ = comparison
    rows = result["differences"]
    arms = [*ARMS, "gradual_kd_final"]
    pairs = {(r["removed"], r["a"], r["b"]) for r in rows}
    assert pairs == {(d, a, b) for d in (1, 2) for i, a in enumerate(arms) for b in arms[i + 1:]}
    for r in rows:
        lo, hi = r["ci"]
        assert r["verdict"] == ("ahead" if lo > 0 else "behind" if hi < 0 else "tie")
        assert lo <= r["value"] <= hi or r["verdict"] != "tie"
        a, b = point(result, r["a"], r["removed"]), point(result, r["b"], r["removed"])
        group, form = r["group"].rsplit("_", 1)
        keys = [k for k, v in result["baseline"].items() if v["form"] == form and v["score"] > 0
                and in_group(k, group, a["in_data"]) and in_group(k, group, b["in_data"])]
        assert r["tasks"] == len(keys) > 0
        direct = sum(min(1.0, a["scores"][k]["score"] / result["baseline"][k]["score"])
                     - min(1.0, b["scores"][k]["score"] / result["baseline"][k]["score"]) for k in keys) / len(keys)
        assert r["value"] == pytest.approx(direct)


def test_a_gradual_runs_curve_equals_its_stages(comparison: tuple[dict[str, Any], Path, int]) -> None:
    """Stage k of a gradual run is the model with k layers removed: its curve point at k is that stage's record
    (retention and intervals as the run wrote them), and so is the arm's point at each target depth."""
    from gradual.compare.pooling import pooled_figures

    result, tmp, _ = comparison
    stages = json.loads((tmp / "out" / "gradual_sgr-2" / "results.json").read_text())["stages"]
    assert result["curves"]["gradual_sgr"] == [{"removed": len(s["removed_total"]), "retention": s["retention"],
                                                "intervals": s["intervals"]} for s in stages]
    assert all(s["intervals"] for s in stages[1:]), "no intervals recorded: RecordRetention must keep them"
    # a run recorded without intervals (as `gradual compare` runs were before) gets the ones its fit computes
    in_data = point(result, "gradual_sgr", 2)["in_data"]
    assert pooled_figures([{**stages[2], "intervals": {}}], result["baseline"], in_data) == {
        k: stages[2][k] for k in ("scores", "retention", "intervals")}
    for removed in (1, 2):
        p = point(result, "gradual_sgr", removed)
        assert (p["retention"], p["intervals"], p["seeds"]) == (stages[removed]["retention"],
                                                                stages[removed]["intervals"], [0])
        assert "per_seed" not in p


def test_curve_costs_count_every_run_a_curve_needs(comparison: tuple[dict[str, Any], Path, int],
                                                   tmp_path: Path) -> None:
    result, tmp, _ = comparison
    costs = result["curve_costs"]

    def recorded(run: str) -> tuple[int, float]:
        stages = json.loads((tmp / "out" / run / "results.json").read_text())["stages"]
        return sum(s["steps"] for s in stages), sum(sum(s.get("timings", {}).values()) for s in stages)

    assert costs["gradual_sgr"]["runs"] == ["gradual_sgr-2"] and costs["gradual_sgr"]["steps"] == 4
    assert costs["one_shot_sgr"]["runs"] == ["one_shot_sgr-1", "one_shot_sgr-2"] and costs["one_shot_sgr"]["steps"] == 6
    assert costs["gradual_kd_final"]["steps"] == 2 + 4 and costs["no_recovery"]["steps"] == 0
    for name, cost in costs.items():
        steps, seconds = map(sum, zip(*(recorded(run) for run in cost["runs"]), strict=True))
        assert cost["steps"] == steps and cost["seconds"] == pytest.approx(seconds) and seconds > 0
        assert cost["steps_per_removed_layer"] == (0 if name == "no_recovery" else 2) and cost["seeds"] == 1
    ratio = costs["gradual_sgr"]["one_shot"]  # the same overrides, one layer per stage: one run for both depths
    assert ratio["arm"] == "one_shot_sgr" and ratio["steps_ratio"] == pytest.approx(4 / 6)
    assert ratio["seconds_ratio"] == pytest.approx(costs["gradual_sgr"]["seconds"] / costs["one_shot_sgr"]["seconds"])
    assert costs["gradual_kd_final"]["one_shot"] is None and costs["one_shot_sgr"]["one_shot"] is None
    write_outputs(tmp_path, result)  # the comparison's own folder is rewritten by the tests that re-run it
    table = (tmp_path / "compare.md").read_text().split("## What a curve costs")[1]
    row = next(line for line in table.splitlines() if line.startswith("| gradual_sgr |"))
    assert row.startswith("| gradual_sgr | gradual | 1 | 4 | ") and row.endswith("| 2 | 0.67×; "
                                                                              f"{ratio['seconds_ratio']:.2f}× "
                                                                              "(one_shot_sgr) |")
    assert json.loads((tmp_path / "compare.json").read_text())["curve_costs"] == costs


@pytest.fixture(scope="module")
def seeded(comparison: tuple[dict[str, Any], Path, int]) -> tuple[dict[str, Any], Path]:
    """The finished one-seed comparison extended to seeds 0 and 1 in the same folder, for three of its arms."""
    _, tmp, _ = comparison
    argv = ["--config", str(tmp / "compare.yaml"), "--seeds", "0,1", "--arms", "no_recovery,one_shot_sgr,gradual_sgr"]
    return run(load_plan(argv)), tmp


def test_more_seeds_reuse_the_first_seeds_runs_in_their_own_dirs(seeded: tuple[dict[str, Any], Path],
                                                                  comparison: tuple[dict[str, Any], Path, int]) -> None:
    result, tmp = seeded
    runs = result["timings"]["runs"]
    assert {n: r["optimizer_steps"] for n, r in runs.items()} == {
        "no_recovery-1": None, "no_recovery-2": None, "one_shot_sgr-1": None, "one_shot_sgr-2": None,
        "gradual_sgr-2": None, "one_shot_sgr-1-s1": 2, "one_shot_sgr-2-s1": 4, "gradual_sgr-2-s1": 4}
    assert not list((tmp / "out").glob("no_recovery-*-s1")), "an arm that trains nothing needs no second seed"
    for name in ("one_shot_sgr-2", "gradual_sgr-2"):
        first = json.loads((tmp / "out" / name / "results.json").read_text())["config"]
        second = json.loads((tmp / "out" / f"{name}-s1" / "results.json").read_text())["config"]
        assert (first["seed"], first["seed_everything"], second["seed"], second["seed_everything"]) == (0, 0, 1, 1)
        assert {k for k in first if first[k] != second[k]} == {"seed", "seed_everything", "data"}
        assert {k for k in first["data"] if first["data"][k] != second["data"][k]} == {"seed"}
    assert result["seeds"] == [0, 1] and [a["seeds"] for a in result["arms"]] == [[0], [0, 1], [0, 1]]
    before = comparison[0]
    for arm in ("one_shot_sgr", "gradual_sgr"):
        p = point(result, arm, 2)
        assert p["seeds"] == [0, 1] and [s["run"] for s in p["per_seed"]] == [f"{arm}-2", f"{arm}-2-s1"]
        assert p["per_seed"][0]["scores"] == point(before, arm, 2)["scores"]
        for key, score in p["scores"].items():
            assert score["score"] == pytest.approx(sum(s["scores"][key]["score"] for s in p["per_seed"]) / 2)
            assert "items" not in score
    assert point(result, "no_recovery", 2) == {**point(before, "no_recovery", 2), "below_no_recovery": None}
    assert result["curve_costs"]["gradual_sgr"]["seeds"] == 2 and result["curve_costs"]["no_recovery"]["seeds"] == 1
    table = (tmp / "out" / "compare.md").read_text()
    assert "2 training seeds (0, 1;" in table and "includes the seed-to-seed spread" in table
    assert "run under one seed only: no_recovery" in table


def test_pooled_intervals_take_in_the_seed_spread(seeded: tuple[dict[str, Any], Path]) -> None:
    """The seeded points and curves pool both seeds' items; where two seeds of an arm disagree, the pooled interval
    is wider than the first seed's alone, and the paired differences resample the seeds too."""
    from gradual.compare.pooling import pool_point
    from gradual.retention import pooled_intervals

    result, _ = seeded
    baseline = result["baseline"]
    p = point(result, "gradual_sgr", 2)
    seed_scores = [s["scores"] for s in p["per_seed"]]
    assert p["intervals"] == pooled_intervals(seed_scores, baseline, p["in_data"])
    curve = next(c for c in result["curves"]["gradual_sgr"] if c["removed"] == 2)
    assert curve["intervals"] == p["intervals"] and curve["retention"] == p["retention"]
    key = next(k for k in p["intervals"] if k.startswith("mc_") and baseline[k]["score"] > 0)
    split = [{**s, "arm": p["arm"], "mode": p["mode"], "in_data": p["in_data"]} for s in copy.deepcopy(p["per_seed"])]
    n = len(baseline[key]["items"])
    split[0]["scores"][key]["items"] = list(baseline[key]["items"])  # seed 0 keeps every problem, seed 1 none
    split[1]["scores"][key]["items"] = [0.0] * n
    for s, value in zip(split, (baseline[key]["score"], 0.0), strict=True):
        s["scores"][key]["score"] = value
    pooled = pool_point(split, baseline)["intervals"][key]
    lo, hi = pooled["retention_ci"]
    first = pooled_intervals([split[0]["scores"]], baseline, p["in_data"])[key]
    assert pooled["retention"] == pytest.approx(0.5) and first["retention_ci"][0] == 1.0  # the baseline's answers
    assert lo == 0.0 and (hi is None or hi >= 1.0), "the pooled interval must reach both seeds' retention"
    rows = [r for r in result["differences"] if r["removed"] == 2 and {r["a"], r["b"]} == {"one_shot_sgr",
                                                                                            "gradual_sgr"}]
    assert rows and all(r["verdict"] in ("ahead", "behind", "tie") for r in rows)


def test_report_only_writes_the_depths_reached_so_far_and_runs_nothing(
        comparison: tuple[dict[str, Any], Path, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--report-only` on a comparison in progress: one arm's deeper run is not there yet, the gradual run has one
    stage of two. The report holds exactly the depths every run has reached, with the figures the full comparison
    had there; nothing trains or evaluates."""
    result, tmp, _ = comparison
    out = tmp_path / "out"
    shutil.copytree(tmp / "out", out)
    shutil.rmtree(out / "one_shot_sgr-2")
    gradual_run = out / "gradual_sgr-2" / "results.json"
    saved = json.loads(gradual_run.read_text())
    gradual_run.write_text(json.dumps({**saved, "stages": saved["stages"][:2]}))
    monkeypatch.setattr(sys.modules["gradual.compare.run"], "fit_run",
                        lambda *a, **k: pytest.fail("report_only runs nothing"))
    partial = run(load_plan(["--config", str(tmp / "compare.yaml"), "--out", str(out), "--report-only"]))
    reached = {(p["arm"], p["removed"]) for p in partial["points"]}
    everything = {(p["arm"], p["removed"]) for p in result["points"]}
    assert reached == everything - {("one_shot_sgr", 2), ("gradual_sgr", 2)}
    for arm, removed in reached:
        assert point(partial, arm, removed)["retention"] == point(result, arm, removed)["retention"]
    assert [c["removed"] for c in partial["curves"]["gradual_sgr"]] == [0, 1]
    assert partial["partial"] is True and "**Partial**" in (out / "compare.md").read_text()
    with pytest.raises(UsageError, match="holds no comparison yet"):
        run(load_plan(["--config", str(tmp / "compare.yaml"), "--out", str(tmp_path / "empty"), "--report-only"]))
