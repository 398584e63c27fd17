"""lm-eval in the pruning loop: a local offline YAML task scored at every stage and usable as the retention monitor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rank_probe import LM_EVAL_TASK, lm_eval_callback, write_lm_eval_task
from test_fit import SMOKE, fit_in_process, write_config

from gradual.cli import main

KEY = f"lm_eval/{LM_EVAL_TASK}"


def lm_eval_config(tmp_path: Path, monitor: str, threshold: float) -> tuple[Path, Path]:
    callbacks = yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"]
    callbacks.insert(1, lm_eval_callback(write_lm_eval_task(tmp_path / "lm_eval_tasks")))
    callbacks[2]["init_args"].update(monitor=monitor, threshold=threshold)
    return write_config(tmp_path, model__schedule__max_layers=3, trainer__callbacks=callbacks)


def test_lm_eval_task_is_scored_every_stage_and_drives_retention(tmp_path: Path) -> None:
    threshold = 0.9
    config, run_dir = lm_eval_config(tmp_path, monitor=KEY, threshold=threshold)
    fit_in_process(config)
    results = json.loads((run_dir / "results.json").read_text())
    stages = results["stages"]
    baseline = stages[0]["scores"][KEY]
    assert baseline["form"] == "classification" and baseline["n"] == 8 and baseline["score"] > 0
    assert sum(baseline["failures"].values()) == 8
    for s in stages[1:]:
        score = s["scores"][KEY]
        assert score["n"] == 8 and 0 <= score["score"] <= 1
        assert s["retention"][KEY] == pytest.approx(score["score"] / baseline["score"])
        assert s["meets_threshold"] == (s["retention"][KEY] >= threshold)
        assert {"successor", "mc_category"} <= set(s["scores"])  # the built-in evaluation still runs alongside
    failed = [s["stage"] for s in stages if s["meets_threshold"] is False]
    assert failed, "the tiny model loses lm-eval accuracy within 3 layers; the monitor must stop the run"
    assert failed == [stages[-1]["stage"]] and results["final_stage"] == failed[0] - 1
    assert f"{KEY} retention" in results["stop_reason"]
    assert KEY in (run_dir / "report.md").read_text()
    assert f"score/{KEY}" in (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]


def test_unknown_monitor_lists_the_lm_eval_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, run_dir = lm_eval_config(tmp_path, monitor="lm_eval/nope", threshold=0.5)
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gradual: error:") and "'lm_eval/nope'" in err and KEY in err
    assert not run_dir.exists()
