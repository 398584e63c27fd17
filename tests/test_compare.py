"""`gradual compare` on a tiny random Llama: equal depth, steps and data; one shared baseline; outputs; bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradual.cli import main
from gradual.compare import load_plan, run
from gradual.lightning_cli import GradualCLI
from gradual.tasks import evaluate

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
ARMS = ["no_recovery", "one_shot_dataset", "one_shot_sgr", "gradual_sgr"]


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
    """One full comparison (4 arms, depths 1 and 2), counting every call of the task evaluator."""
    tmp = tmp_path_factory.mktemp("compare")
    calls = []
    with pytest.MonkeyPatch.context() as mp:  # the real evaluator, counted
        mp.setattr("gradual.callbacks.evaluation.evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
        result = run(load_plan(["--config", str(compare_config(tmp))]))
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


def test_baseline_is_evaluated_once_and_matches_a_plain_fit(comparison: tuple[dict[str, Any], Path, int],
                                                            tmp_path: Path) -> None:
    result, tmp, calls = comparison
    evaluated_stages = sum(len(json.loads((tmp / "out" / name / "results.json").read_text())["stages"]) - 1
                           for name in result["timings"]["runs"])
    assert calls == 1 + evaluated_stages == 1 + 8  # 3 one-shot arms at depths 1 and 2, 2 gradual stages
    for name in result["timings"]["runs"]:
        stage_0 = json.loads((tmp / "out" / name / "stage_0" / "metrics.json").read_text())
        assert stage_0["scores"] == result["baseline"] and "tasks_s" not in stage_0["timings"]
    config = yaml.safe_load(SMOKE.read_text())
    config["model"]["run_dir"] = str(tmp_path / "plain")
    cli = GradualCLI(args=["--config", yaml.safe_dump(config)], run=False)
    cli.model.check_run_dir()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.history[0].scores == result["baseline"]


def test_table_json_and_plot_are_written(comparison: tuple[dict[str, Any], Path, int]) -> None:
    result, tmp, _ = comparison
    out = tmp / "out"
    saved = json.loads((out / "compare.json").read_text())
    assert saved["points"] == result["points"] and len(saved["points"]) == 8
    assert [c["removed"] for c in saved["curves"]["gradual_sgr"]] == [0, 1, 2]
    assert [c["removed"] for c in saved["curves"]["one_shot_sgr"]] == [0, 1, 2]
    table = (out / "compare.md").read_text()
    assert "| 2 | one_shot_dataset | one_shot | dataset |" in table
    assert "gradual_sgr (stage 1 of gradual_sgr-2)" in table
    assert "| 0 | baseline |" in table and "wrong_value" in table and "mc_successor" in table
    assert "| gradual_sgr-2 |" in table.split("## Timings")[1]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "configs" / "gradual_sgr-2.yaml").is_file()


def test_rerun_reads_finished_runs_back(comparison: tuple[dict[str, Any], Path, int]) -> None:
    result, tmp, _ = comparison
    again = run(load_plan(["--config", str(tmp / "compare.yaml"), "--arms", "no_recovery,gradual_sgr"]))
    assert all(r["optimizer_steps"] is None for r in again["timings"]["runs"].values())
    assert point(again, "gradual_sgr", 2)["scores"] == point(result, "gradual_sgr", 2)["scores"]


BAD = {
    "depths": (["--depths", "2,x"], None, "depths='2,x'"),
    "depth_too_deep": (["--depths", "6"], None, "depths=6 is invalid for a model of 6 layers"),
    "arm_name": (["--arms", "one_shot_sgr,magic"], None, "magic"),
    "mode": ([], {"arms": [{"name": "a", "mode": "sideways"}]}, "mode='sideways'"),
    "responses": ([], {"arms": [{"name": "a", "responses": "oracle"}]}, "responses='oracle'"),
    "arm_key": ([], {"arms": [{"name": "a", "step": 3}]}, "unknown key(s) step"),
    "section_key": ([], {"depth": [1]}, "unknown key(s) depth"),
    "missing_config": (["--config", "/nonexistent.yaml"], None, "/nonexistent.yaml"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_before_any_model(case: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    extra, section, needle = BAD[case]
    config = compare_config(tmp_path, section)
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
    assert main(["compare", "--config", str(tmp / "compare.yaml"), "--depths", "1"]) == 2
    assert "holds a comparison of another config or depths" in capsys.readouterr().err
    assert (tmp / "out" / "compare.json").is_file()
