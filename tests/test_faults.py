"""Faults a long run must survive: SIGKILL during SGR generation and inside a stage's save, a loss or weights that
become NaN/inf, an lm-eval task that raises or scores 0 at baseline, and a run directory that is unwritable or on a
full disk. Real tiny models, real `gradual fit` runs (in process or as killed subprocesses), real lm-eval tasks."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fault_probe import (
    BROKEN_TASK,
    ZERO_TASK,
    BreakLmEvalTask,
    PoisonWeights,
    write_fault_lm_eval_tasks,
)
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from test_callbacks import bare_trainer
from test_fit import SMOKE, write_config
from transformers import AutoModelForCausalLM

from gradual import rundir
from gradual.callbacks import LmEvalEvaluation, RetentionStopping
from gradual.cli import main
from gradual.errors import UsageError
from gradual.lightning_cli import GradualCLI
from gradual.models import load_model, load_tokenizer, nonfinite_parameters, save_model, weight_bytes
from gradual.stages import StageHistory, StageRecord
from gradual.tiny import tiny_model

TESTS = Path(__file__).resolve().parent


def fit_with(config: Path, *callbacks: Any) -> GradualCLI:
    """`gradual fit` in process with extra callbacks after the configured ones (before `StageCheckpoint`, which
    Lightning always runs last)."""
    cli = GradualCLI(args=["--config", str(config)], run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.model.check_run_dir(cli.trainer, cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def start_fit(config: Path) -> subprocess.Popen:
    """`python -m gradual fit` as a real process; `tests/` on PYTHONPATH for the fault probes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    return subprocess.Popen([sys.executable, "-m", "gradual", "fit", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready: Any, timeout: float = 600) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-2000:]}"


def finish(config: Path) -> None:
    proc = start_fit(config)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def safetensors_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def assert_all_saved_weights_finite(run_dir: Path) -> None:
    files = safetensors_files(run_dir)
    assert files, "the run saved no model at all"
    for path in files:
        for name, tensor in load_file(path).items():
            assert not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()), f"{path}: {name}"


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --------------------------------------------------------------------------------------------- SGR generation


def cache_records(path: Path) -> tuple[bytes, list[dict[str, Any]]]:
    """The cache file's complete lines (up to its last newline) and its answer records."""
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]
    return complete, [json.loads(line) for line in complete.splitlines()[1:]]


@pytest.mark.slow  # two subprocess runs, one of them generating 120 answers (~1 min); CI runs it
def test_sigkill_during_sgr_generation_resumes_the_answer_cache(tmp_path: Path) -> None:
    """Killed while the teacher answers, a re-run keeps every answer already on disk, generates only the missing
    ones (none twice: the file would then hold an index twice) and drops a torn last line."""
    n = 120
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about the number {i}."}) + "\n" for i in range(n)))
    cache_dir = tmp_path / "sgr"
    config, run_dir = write_config(tmp_path, data__sgr__source="file", data__sgr__path=str(prompts),
                                   data__sgr__cache_dir=str(cache_dir), data__sgr__batch_size=1,
                                   data__sgr__decoding__max_new_tokens=24, model__schedule__max_layers=1)

    def answers() -> int:
        files = list(cache_dir.glob("*.jsonl"))
        return files[0].read_bytes().count(b"\n") - 1 if files else 0

    kill_when(start_fit(config), lambda: answers() >= 10)
    [cache] = cache_dir.glob("*.jsonl")
    before, records = cache_records(cache)
    done = [r["i"] for r in records]
    assert 10 <= len(done) < n and len(set(done)) == len(done)
    missing = sorted(set(range(n)) - set(done))
    with cache.open("ab") as f:  # killed in the middle of a line: the torn record of a prompt not answered yet
        f.write(json.dumps({"i": missing[0], "prompt": f"Tell me about the number {missing[0]}."})[:25].encode())

    finish(config)
    after, records = cache_records(cache)
    assert after == cache.read_bytes(), "the torn line was not dropped"
    assert after.startswith(before), "answers written before the kill were rewritten"
    indices = [r["i"] for r in records]
    assert sorted(indices) == list(range(n)), "a prompt was answered twice or never"
    assert indices[len(done):] == [i for i in indices if i in missing], "the re-run answered a cached prompt again"
    for r in records:
        assert r["prompt"] == f"Tell me about the number {r['i']}." and len(r["responses"]) == 1
    assert json.loads((run_dir / "state.json").read_text())["finished"]


def test_a_run_killed_before_its_first_stage_is_rerun_by_the_same_command(tmp_path: Path) -> None:
    """Killed while generating SGR answers, a run has written only its logs: the same command starts it again (and
    reuses the answer cache), while a folder with anything else in it still belongs to someone else."""
    run = tmp_path / "run"
    (run / "logs" / "version_0").mkdir(parents=True)
    (run / "state.json.tmp").write_text("{")
    rundir.check_run_dir(run, {"model": "tiny:llama:6"}, overwrite=False)
    assert (run / "logs" / "version_0").is_dir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="already holds a different run"):
        rundir.check_run_dir(run, {"model": "tiny:llama:6"}, overwrite=False)


# --------------------------------------------------------------------------------------------- stage folders


def pause_config(tmp_path: Path, name: str, marker: Path) -> tuple[Path, Path]:
    callbacks = yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"]
    callbacks.insert(3, {"class_path": "fault_probe.PauseInSave", "init_args": {"stage": 2, "marker": str(marker)}})
    return write_config(tmp_path, name, trainer__callbacks=callbacks, model__schedule__steps_per_stage=4,
                        data__sgr__cache_dir=str(tmp_path / "sgr"))


@pytest.mark.slow  # three subprocess runs (~1 min); CI runs it
def test_sigkill_inside_a_stage_save_resumes_from_the_last_complete_stage(tmp_path: Path) -> None:
    """The process is killed after stage 2's weights are written and before its folder is complete; the re-run
    resumes from stage 1, ignores and removes the half-written folder (and a planted half-written stage 3 and
    `final/`), and ends with the same model as a run never interrupted."""
    whole_marker = tmp_path / "whole.marker"
    whole_marker.write_text("no pause")
    whole_config, whole_dir = pause_config(tmp_path, "whole", whole_marker)
    finish(whole_config)

    marker = tmp_path / "killed.marker"
    config, run_dir = pause_config(tmp_path, "killed", marker)
    kill_when(start_fit(config), marker.exists)
    half = Path(json.loads(marker.read_text())["folder"])
    assert half.name == "stage_2.tmp" and (half / "model.safetensors").is_file()
    assert not (run_dir / "stage_2").exists(), "a stage folder appeared before its save completed"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["resume_from"] == "stage_1" and not state["finished"]
    assert AutoModelForCausalLM.from_pretrained(run_dir / "stage_1").config.num_hidden_layers == 5

    planted = run_dir / "stage_3"  # looks like a saved stage, but no state.json names it
    shutil.copytree(run_dir / "stage_1", planted)
    with (planted / "model.safetensors").open("r+b") as f:
        f.truncate(1000)
    (run_dir / "final").mkdir()
    (run_dir / "final" / "config.json").write_text("{}")

    finish(config)
    leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    assert same_weights(whole_dir / "final" / "model.safetensors", run_dir / "final" / "model.safetensors")
    assert same_weights(whole_dir / "stage_3" / "model.safetensors", run_dir / "stage_3" / "model.safetensors")
    same = json.loads((whole_dir / "results.json").read_text())["stages"]
    resumed = json.loads((run_dir / "results.json").read_text())["stages"]
    assert [s["removed_total"] for s in same] == [s["removed_total"] for s in resumed]
    assert [s["scores"] for s in same] == [s["scores"] for s in resumed]


def fake_export(path: Path) -> None:
    """A stage's model as far as the run directory is concerned: `config.json` and a weights file."""
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"w" * 64)


def run_with_two_stages(tmp_path: Path) -> tuple[Path, dict[str, Any], list[StageRecord]]:
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": "m"}
    records = [StageRecord(stage=0, depth=4), StageRecord(stage=1, depth=3, meets_threshold=True)]
    rundir.write_stage(run, records[0], export=None)
    rundir.write_stage(run, records[1], export=fake_export)
    rundir.write_state(run, config, records, stop_reason=None)
    return run, config, records


def test_a_half_written_stage_is_never_resumed_from_and_is_removed(tmp_path: Path) -> None:
    """What a killed run can leave: a `*.tmp` folder of a save in progress, a stage folder no `state.json` names
    (killed between its rename and the state write), a folder whose weights were being dropped. The resume point
    is the stage `state.json` names; the rest is cleaned before the run writes."""
    run, config, records = run_with_two_stages(tmp_path)
    (run / "stage_2.tmp").mkdir()
    (run / "stage_2.tmp" / "model.safetensors").write_bytes(b"half")
    fake_export(run / "stage_2")
    (run / "final.tmp").mkdir()
    (run / "state.json.tmp").write_text("{\"half")
    folder, history = rundir.resume_point(run)
    assert folder == run / "stage_1" and [r.stage for r in history] == [0, 1]
    removed = rundir.clean_incomplete(run, last_stage=1)
    assert sorted(p.name for p in removed) == ["final.tmp", "stage_2", "stage_2.tmp", "state.json.tmp"]
    assert sorted(p.name for p in run.iterdir()) == ["stage_0", "stage_1", "state.json"]
    assert (run / "stage_1" / "model.safetensors").read_bytes() == b"w" * 64

    rundir.drop_model(run, 1)  # a drop interrupted half-way never reads as a saved stage: config.json goes first
    assert not rundir.stage_saved(run / "stage_1") and (run / "stage_1" / "metrics.json").is_file()
    with pytest.raises(UsageError, match="holds no complete model"):
        rundir.resume_point(run)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_stage_save_that_fails_half_way_keeps_the_previous_complete_one(tmp_path: Path,
                                                                          error: BaseException) -> None:
    """A save that dies half-way (a full disk, an interrupt) removes its partial copy; the complete stage saved
    before and `state.json` are untouched, and a full disk is named with what is intact."""
    run, config, records = run_with_two_stages(tmp_path)
    state = (run / "state.json").read_bytes()

    def dies_half_way(path: Path) -> None:
        fake_export(path)
        raise error

    with pytest.raises(type(error)) as raised:
        rundir.write_stage(run, StageRecord(stage=2, depth=2), export=dies_half_way)
    if isinstance(error, OSError):
        assert raised.value.errno == errno.ENOSPC and "state.json are intact" in str(raised.value)
    assert sorted(p.name for p in run.iterdir()) == ["stage_0", "stage_1", "state.json"]
    assert (run / "state.json").read_bytes() == state and rundir.resume_point(run)[0] == run / "stage_1"
    with pytest.raises(type(error)):  # `final/` the same way: the previous one stays whole
        rundir.write_final(run, records[1], "done", export=dies_half_way)
    assert not (run / "final").exists() and not list(run.glob("*.tmp"))


# --------------------------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize(("value", "when", "why"), [
    (float("nan"), "start", r"loss is (nan|inf) at step 1"),
    (float("inf"), "start", r"loss is (nan|inf) at step 1"),
    (float("inf"), "end", r"non-finite weights after the stage's training \(model\.layers\.1\."),
], ids=["nan_loss", "inf_loss", "inf_weights"])
def test_a_nonfinite_loss_or_weights_abandon_the_stage_and_roll_back(tmp_path: Path, value: float, when: str,
                                                                     why: str) -> None:
    """Stage 2's weights are poisoned (a frozen weight before its first step: every loss is NaN; or a LoRA weight
    after its last step: every loss was finite, the merged weights are not). The stage is abandoned without an
    optimizer step on a NaN loss, the run stops, rolled back to stage 1 with a complete report, and no saved file
    holds a non-finite weight, although `keep: all` saves every other stage."""
    config, run_dir = write_config(tmp_path, trainer__callbacks__3__init_args__keep="all",
                                   data__sgr__cache_dir=str(tmp_path / "sgr"))
    probe = PoisonWeights(stage=2, value=value, when=when)
    fit_with(config, probe)
    results = json.loads((run_dir / "results.json").read_text())
    stages = results["stages"]
    assert len(stages) == 3 and results["final_stage"] == 1
    assert re.match(f"stage 2 abandoned: {why}", results["stop_reason"]), results["stop_reason"]
    assert results["stop_reason"].endswith("; rolled back to stage 1")
    assert stages[2]["meets_threshold"] is False and re.match(why, stages[2]["errors"]["training"])
    assert stages[2]["scores"] == {} and stages[1]["scores"], "the abandoned stage was evaluated"
    if when == "start":  # one batch, and no optimizer step on its NaN loss: the fresh LoRA B is still exactly 0
        assert stages[2]["loss"] is None and probe.lora_b[2] == [0.0]
    else:
        assert stages[2]["loss"] is not None and len(probe.lora_b[2]) == 2
    assert not (run_dir / "stage_2" / "config.json").exists() and (run_dir / "stage_2" / "metrics.json").is_file()
    assert same_weights(run_dir / "final" / "model.safetensors", run_dir / "stage_1" / "model.safetensors")
    assert_all_saved_weights_finite(run_dir)
    report = (run_dir / "report.md").read_text()
    assert "stage 2 abandoned" in report and "| 2 | training |" in report
    assert json.loads((run_dir / "final" / "gradual.json").read_text())["stage"] == 1


def test_a_model_with_nonfinite_weights_is_never_saved(tmp_path: Path) -> None:
    model = tiny_model("llama", num_layers=2)
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 1] = float("-inf")
    assert nonfinite_parameters(model) == ["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="non-finite weights .*model.layers.1.mlp.up_proj.weight"):
        save_model(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- evaluation errors


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fault_lm_eval_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def tiny_module() -> StageHistory:
    module = StageHistory(history=[StageRecord(stage=0, depth=6)])
    module.model, module.tokenizer = load_model("tiny:llama:6"), load_tokenizer("tiny:llama:6")
    module.log = lambda *a, **k: None
    return module


@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_an_lm_eval_task_that_raises_is_reported_and_the_other_scores_kept(
        lm_eval_tasks: Path, tiny_module: StageHistory, on_error: str) -> None:
    """Two tasks in one callback; one raises after the baseline. Its error is recorded under its key, the other
    task's score is kept; `skip` continues, `stop` rolls the stage back and stops."""
    module = tiny_module
    module.history = [StageRecord(stage=0, depth=6)]
    module.stop_reason, module.proposals = None, {}
    callback = LmEvalEvaluation([BROKEN_TASK, ZERO_TASK], include_path=str(lm_eval_tasks), batch_size=8,
                                on_error=on_error)
    (lm_eval_tasks / "broken").unlink(missing_ok=True)
    callback.on_train_start(bare_trainer(), module)
    assert set(module.history[0].scores) == {f"lm_eval/{BROKEN_TASK}", f"lm_eval/{ZERO_TASK}"}
    (lm_eval_tasks / "broken").touch()
    module.history.append(StageRecord(stage=1, depth=5))
    trainer = bare_trainer()
    try:
        callback.on_train_epoch_end(trainer, module)
    finally:
        (lm_eval_tasks / "broken").unlink()
    module.conclude()  # the verdict, decided once the stage's callbacks have run
    record = module.record
    assert record.errors == {f"lm_eval/{BROKEN_TASK}": "RuntimeError: metric backend went away"}
    assert set(record.scores) == {f"lm_eval/{ZERO_TASK}"}
    if on_error == "skip":
        assert record.meets_threshold is None and not trainer.should_stop and module.stop_reason is None
    else:
        assert record.meets_threshold is False and trainer.should_stop
        assert module.stop_reason == (f"stage 1: lm_eval evaluation of lm_eval/{BROKEN_TASK} failed (RuntimeError: "
                                      "metric backend went away) (on_error: stop); rolled back to stage 0")
    RetentionStopping(threshold=0.5, monitor="min").on_train_epoch_end(trainer, module)
    assert record.retention == {f"lm_eval/{ZERO_TASK}": None}, "a baseline of 0 gives an undefined retention"


def test_an_evaluation_failing_on_the_baseline_stops_before_pruning_unless_skipped(
        lm_eval_tasks: Path, tiny_module: StageHistory) -> None:
    (lm_eval_tasks / "broken").touch()
    try:
        for on_error in ("stop", "skip"):
            tiny_module.history = [StageRecord(stage=0, depth=6)]
            callback = LmEvalEvaluation([BROKEN_TASK], include_path=str(lm_eval_tasks), on_error=on_error)
            if on_error == "stop":
                with pytest.raises(RuntimeError, match=f"lm_eval/{BROKEN_TASK} failed .* on the baseline"):
                    callback.on_train_start(bare_trainer(), tiny_module)
            else:
                callback.on_train_start(bare_trainer(), tiny_module)
            assert tiny_module.history[0].errors == {f"lm_eval/{BROKEN_TASK}": "RuntimeError: metric backend went "
                                                                               "away"}
    finally:
        (lm_eval_tasks / "broken").unlink()
    monitor = RetentionStopping(monitor=f"lm_eval/{BROKEN_TASK}")
    tiny_module.record_scores({"successor": {"score": 0.5, "form": "generative"}})
    with pytest.raises(RuntimeError, match="could not be evaluated on the baseline: RuntimeError: metric backend"):
        monitor.on_train_start(bare_trainer(), tiny_module)


def test_on_error_is_checked() -> None:
    with pytest.raises(UsageError, match="on_error='ignore' is unknown; allowed: stop, skip"):
        LmEvalEvaluation(["x"], on_error="ignore")


def fault_lm_eval_config(tmp_path: Path, on_error: str, lm_eval_tasks: Path) -> tuple[Path, Path]:
    callbacks = yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"]
    callbacks.insert(1, {"class_path": "gradual.callbacks.LmEvalEvaluation",
                         "init_args": {"tasks": [BROKEN_TASK, ZERO_TASK], "include_path": str(lm_eval_tasks),
                                       "batch_size": 8, "on_error": on_error}})
    return write_config(tmp_path, trainer__callbacks=callbacks, data__sgr__cache_dir=str(tmp_path / "sgr"))


@pytest.mark.slow  # in-process runs with lm-eval at every stage (15-30 s each with its import); CI runs it
@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_an_lm_eval_task_breaking_mid_run_continues_or_stops_as_configured(tmp_path: Path, on_error: str) -> None:
    """A full run: the broken task raises from stage 1 on, the zero-baseline task scores 0 throughout. `skip`
    finishes the schedule, `stop` ends at stage 1 rolled back to stage 0; both write a complete report where the
    error and the undefined retentions are stated, with every other score kept."""
    tasks = write_fault_lm_eval_tasks(tmp_path / "lm_eval_tasks")
    config, run_dir = fault_lm_eval_config(tmp_path, on_error, tasks)
    cli = fit_with(config, BreakLmEvalTask(str(tasks)))
    results = json.loads((run_dir / "results.json").read_text())
    stages = results["stages"]
    broken, zero = f"lm_eval/{BROKEN_TASK}", f"lm_eval/{ZERO_TASK}"
    assert stages[0]["scores"][broken]["score"] > 0 and stages[0]["scores"][zero]["score"] == 0
    for s in stages[1:]:
        assert broken in s["errors"] and broken not in s["scores"]
        assert {zero, "mc_successor", "mc_category"} <= set(s["scores"]), "other scores were lost"
        assert s["retention"][zero] is None and s["retention"]["successor"] is None  # baseline 0 on the tiny model
        kept = [s["retention"][k] for k, v in s["scores"].items()
                if v["form"] == "classification" and s["retention"][k] is not None]
        assert kept and s["retention"]["classification_mean"] == pytest.approx(sum(kept) / len(kept))
    assert zero in results["undefined_retention"] and any(broken in e for e in results["errors"])
    report = (run_dir / "report.md").read_text()
    assert f"retention of {zero} is undefined (baseline score 0)" in report and f"| 1 | {broken} |" in report
    if on_error == "skip":
        assert len(stages) == 4 and results["stop_reason"] == "schedule complete" and results["final_stage"] == 3
    else:
        assert len(stages) == 2 and results["final_stage"] == 0 and stages[1]["meets_threshold"] is False
        assert results["stop_reason"].startswith(f"stage 1: lm_eval evaluation of {broken} failed")
        assert AutoModelForCausalLM.from_pretrained(run_dir / "final").config.num_hidden_layers == 6
    assert cli.trainer.should_stop


def test_a_zero_baseline_is_undefined_retention_left_out_of_the_means() -> None:
    baseline = {"a": {"score": 0.0, "form": "generative"}, "b": {"score": 0.5, "form": "generative"},
                "mc_a": {"score": 0.4, "form": "classification"}}
    scores = {"a": {"score": 0.25, "form": "generative"}, "b": {"score": 0.25, "form": "generative"},
              "mc_a": {"score": 0.2, "form": "classification"}, "c": {"score": 0.1, "form": "generative"}}
    from gradual.retention import retention

    values = retention(scores, baseline)
    assert values["a"] is None and values["c"] is None  # baseline 0, and no baseline at all
    assert values["b"] == 0.5 and values["generative_mean"] == 0.5 and values["min"] == 0.5
    assert values["classification_mean"] == 0.5 and values["held_out_generative_mean"] == 0.5


# --------------------------------------------------------------------------------------------- run directory


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradual: error: "), err
    return err[0]


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_unwritable_run_dir_is_one_line_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               where: str) -> None:
    """Root ignores permissions, so the paths are ones nobody can create: under a regular file, or in /proc."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run_dir = blocker / "run" if where == "under_a_file" else Path("/proc/gradual-test-run")
    config, _ = write_config(tmp_path, model__run_dir=str(run_dir), data__sgr__cache_dir=str(tmp_path / "sgr"))
    assert main(["fit", "--config", str(config)]) == 2
    line = one_error_line(capsys)
    assert f"run_dir={str(run_dir)!r}" in line
    assert ("is a file, not a directory" if where == "under_a_file" else "is not writable") in line
    assert not (tmp_path / "sgr").exists() and blocker.read_text() == "not a directory"


def test_too_little_free_space_is_one_line_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    config, run_dir = write_config(tmp_path, data__sgr__cache_dir=str(tmp_path / "sgr"))
    need = weight_bytes("tiny:llama:6", "float32")
    assert need == sum(p.numel() for p in tiny_model("llama", 6).parameters()) * 4
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    assert main(["fit", "--config", str(config)]) == 2
    line = one_error_line(capsys)
    assert f"run_dir={str(run_dir)!r} has 998.7 KB free" in line and "needs about 998.8 KB" in line
    assert not run_dir.exists() and not (tmp_path / "sgr").exists()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    """A real small filesystem (tmpfs): mounting needs root (CAP_SYS_ADMIN), so elsewhere the test is skipped."""
    mounted: list[Path] = []

    def mount(size_kb: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:  # lazily: the in-process run may still hold a file of it open (its CSV logger)
        subprocess.run(["umount", "--lazy", str(point)], check=False)


class FillDisk(Callback):
    """Fill the disk holding `filler` at the end of stage `stage`, after the evaluations and the report and before
    `StageCheckpoint` saves the stage (it runs last)."""

    def __init__(self, filler: Path, stage: int) -> None:
        self.filler, self.stage = filler, stage

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if pl_module.stage != self.stage:
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)


def test_a_disk_too_small_is_refused_and_a_disk_filling_up_mid_run_loses_nothing(
        tmp_path: Path, tiny_disk: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """On a real 512 KB filesystem the pre-check refuses the ~1 MB model in one line. On a 3 MB one the run starts;
    the disk is then filled before stage 2's save: the save fails, stage 1 and `state.json` stay complete and
    usable, and once space is freed the same command resumes and finishes."""
    small = tiny_disk(512)
    config, run_dir = write_config(tmp_path, "small", model__run_dir=str(small / "run"),
                                   data__sgr__cache_dir=str(tmp_path / "sgr"))
    assert main(["fit", "--config", str(config)]) == 2
    assert "needs about 998.8 KB" in one_error_line(capsys) and not (small / "run").exists()

    disk = tiny_disk(3072)
    run = disk / "run"
    config, _ = write_config(tmp_path, "full", model__run_dir=str(run), data__sgr__cache_dir=str(tmp_path / "sgr"))
    filler = disk / "filler"

    with pytest.raises(OSError, match="no space left on the device writing stage 2's model") as raised:
        fit_with(config, FillDisk(filler, stage=2))
    assert "state.json are intact" in str(raised.value)
    state = json.loads((run / "state.json").read_text())
    assert state["resume_from"] == "stage_1" and not state["finished"]
    assert not list(run.glob("*.tmp")) and not (run / "stage_2" / "config.json").exists()
    stage_1 = AutoModelForCausalLM.from_pretrained(run / "stage_1")
    assert stage_1.config.num_hidden_layers == 5 and nonfinite_parameters(stage_1) == []

    filler.unlink()
    assert main(["fit", "--config", str(config)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["final_stage"] == 3 and json.loads((run / "state.json").read_text())["finished"]
