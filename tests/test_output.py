"""What a user sees from `gradual fit`: the plan before any model loads, progress lines when the output is a file or a
pipe (a cluster job), and none of the libraries' noise the user did not cause."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks.progress import ProgressBar
from test_fit import SMOKE, fit_in_process, write_config

from gradual.cli import main
from gradual.lightning_cli import GradualCLI

STEP_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] stage (\d+)/(\d+) step (\d+)/(\d+) loss (\d+\.\d{4}) tokens/s (\d+) "
                       r"elapsed (\d+:\d\d:\d\d) left (\d+:\d\d:\d\d)$")
DONE_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] stage (\d+)/(\d+) done in \d+:\d\d:\d\d: depth (\d+), "
                       r".*loss (\d+\.\d{4}), classification_mean retention \d\.\d{3}(?: \[[^]]+\])? "
                       r"\(threshold 0\.5: (kept|rolled back)\)$")
PROGRESS_LOG = {"class_path": "gradual.callbacks.ProgressLog"}
INTERVAL_ENV = "GRADUAL_PROGRESS_INTERVAL"  # the documented name: seconds between the default progress lines


def callbacks_with(*extra: dict) -> list[dict]:
    """The smoke config's callbacks with `extra` appended."""
    return [*yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"], *extra]


@pytest.fixture(scope="module")
def piped_fit(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """`gradual fit` on the smoke config as a cluster job runs it: standard output and error into one pipe, the
    progress display left at its default (on), a line at every step (`$GRADUAL_PROGRESS_INTERVAL=0`)."""
    config, run_dir = write_config(tmp_path_factory.mktemp("piped"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", INTERVAL_ENV: "0"}
    proc = subprocess.run([sys.executable, "-m", "gradual", "fit", "--config", str(config),
                           "--trainer.enable_progress_bar", "true"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout.splitlines(), run_dir


def test_a_piped_fit_prints_a_progress_line_at_every_step_and_one_per_stage(
        piped_fit: tuple[list[str], Path]) -> None:
    lines, run_dir = piped_fit
    steps = [m.groups() for m in map(STEP_LINE.match, lines) if m]
    assert [(int(s), int(n), int(k), int(t)) for s, n, k, t, *_ in steps] == [
        (stage, 3, step, 2) for stage in (1, 2, 3) for step in (1, 2)], lines
    assert all(int(tokens) > 0 for *_, tokens, _, _ in steps)
    assert [left for *_, left in steps[1::2]] == ["0:00:00"] * 3, "nothing is left at a stage's last step"
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    for stage in (1, 2, 3):  # interval 0: each line's loss is its step's; their mean is the stage's recorded loss
        losses = [float(loss) for s, _, _, _, loss, *_ in steps if int(s) == stage]
        assert sum(losses) / 2 == pytest.approx(stages[stage]["loss"], abs=2e-4)
    done = [m.groups() for m in map(DONE_LINE.match, lines) if m]
    assert [(int(s), int(depth)) for s, _, depth, _, _ in done] == [(1, 5), (2, 4), (3, 3)], lines
    assert [float(loss) for *_, loss, _ in done] == pytest.approx([s["loss"] for s in stages[1:]], abs=1e-4)
    order = [i for i, line in enumerate(lines) if STEP_LINE.match(line) or DONE_LINE.match(line)]
    kinds = ["done" if DONE_LINE.match(lines[i]) else "step" for i in order]
    assert kinds == ["step", "step", "done"] * 3
    assert not any("Epoch" in line for line in lines), "Lightning's progress bar still drew into the pipe"


def test_the_plan_comes_before_any_model_loads_or_trains(piped_fit: tuple[list[str], Path]) -> None:
    lines, run_dir = piped_fit
    plan = [i for i, line in enumerate(lines) if line.startswith("plan: ")]
    assert plan and plan == list(range(plan[0], plan[-1] + 1)), "the plan is one block of lines"
    text = "\n".join(lines[i] for i in plan)
    for needle in ("plan: model tiny:llama:6 (6 layers, float32) on cpu",
                   "remove 3 of 6 layers, gradual mode, chosen by block_influence: 3 stages = 3 x (1 layer, 2 steps)",
                   "a step trains 2 examples of <= 256 tokens",
                   "recovery: sft loss on LoRA adapters (r 4); data: sgr 100% (8 prompts of copy, successor",
                   "evaluation: successor, category (8 problems each, generative + classification); stop and roll "
                   "back when classification_mean retention < 0.5",
                   f"plan: run dir {run_dir}\n", "plan: estimate: training at most ", "1 torch thread"):
        assert needle in text + "\n", (needle, text)
    first_heavy = next(i for i, line in enumerate(lines) if "sgr prompts" in line or STEP_LINE.match(line))
    assert plan[-1] < first_heavy, "the SGR teacher answered before the plan was printed"


def test_a_fit_prints_neither_lightnings_advert_nor_the_peft_future_warning(
        piped_fit: tuple[list[str], Path]) -> None:
    lines, _ = piped_fit
    assert not [line for line in lines if "litlogger" in line or "litmodels" in line]
    assert not [line for line in lines if "is_gradient_checkpointing" in line]
    assert any(line.startswith("GPU available:") for line in lines), "Lightning's other notices still show"


class Terminal(io.StringIO):
    """An output stream that says it is a terminal, as `sys.stdout` does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def build(tmp_path: Path, *extra: str, callbacks: list[dict] | None = None, name: str = "run") -> GradualCLI:
    """The CLI of the smoke config (its progress display on, unless `extra` says otherwise), built, not run."""
    changes = {"trainer__callbacks": callbacks} if callbacks is not None else {}
    config, _ = write_config(tmp_path, name, trainer__enable_progress_bar=True, **changes)
    return GradualCLI(args=["--config", str(config), *extra], run=False)


def test_progress_lines_replace_the_bar_only_when_stdout_is_not_a_terminal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradual.callbacks import ProgressLog

    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    piped = build(tmp_path).trainer.progress_bar_callback
    assert isinstance(piped, ProgressLog) and piped.interval == 30
    assert build(tmp_path, "--trainer.enable_progress_bar", "false").trainer.progress_bar_callback is None
    monkeypatch.setenv(INTERVAL_ENV, "5")
    assert build(tmp_path).trainer.progress_bar_callback.interval == 5
    monkeypatch.setattr(sys, "stdout", Terminal())
    terminal = build(tmp_path).trainer.progress_bar_callback
    assert isinstance(terminal, ProgressBar) and not isinstance(terminal, ProgressLog)
    listed = build(tmp_path, callbacks=callbacks_with({**PROGRESS_LOG, "init_args": {"interval": 7}}))
    bars = [c for c in listed.trainer.callbacks if isinstance(c, ProgressBar)]
    assert len(bars) == 1 and isinstance(bars[0], ProgressLog) and bars[0].interval == 7


def test_listing_progress_log_keeps_the_run_identity(tmp_path: Path) -> None:
    """A display setting: a run started without it resumes with it (and the other way round)."""
    a = build(tmp_path, name="a")
    plain = a.model.run_config(a.trainer, a.datamodule)
    listed = build(tmp_path, name="b", callbacks=callbacks_with({**PROGRESS_LOG, "init_args": {"interval": 60}}))
    assert listed.model.run_config(listed.trainer, listed.datamodule) == plain


def test_a_line_comes_at_a_stages_first_and_last_step_and_otherwise_after_the_interval(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hourly = {**PROGRESS_LOG, "init_args": {"interval": 3600}}
    config, _ = write_config(tmp_path, model__schedule__max_layers=1, model__schedule__steps_per_stage=4,
                             trainer__enable_progress_bar=True, trainer__callbacks=callbacks_with(hourly))
    fit_in_process(config)
    steps = [m.group(3, 4) for m in map(STEP_LINE.match, capsys.readouterr().out.splitlines()) if m]
    assert steps == [("1", "4"), ("4", "4")]


@pytest.mark.parametrize(("interval", "env", "needle"), [
    (-1, None, "ProgressLog interval=-1.0 is invalid"),
    (None, "soon", "$GRADUAL_PROGRESS_INTERVAL='soon' is invalid"),
])
def test_a_bad_interval_is_one_line_exit_2(interval: float | None, env: str | None, needle: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if env is not None:
        monkeypatch.setenv(INTERVAL_ENV, env)
    entry = {**PROGRESS_LOG, "init_args": {"interval": interval}} if interval is not None else PROGRESS_LOG
    config, run_dir = write_config(tmp_path, trainer__enable_progress_bar=True,
                                   trainer__callbacks=callbacks_with(entry))
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradual: error:") and needle in err[0], err
    assert not run_dir.exists()


@pytest.mark.slow  # reads the offline SmolLM2's config (no weights load)
def test_the_demo_plan_estimates_its_measured_recovery_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo is the reference step's own setting (SmolLM2, LoRA, KD, 8 x 160 tokens), one layer per stage: at most
    6 stages x 12 steps, each at the reference's 18.59 s scaled by the weights left (the estimate takes the full
    depth's), ~21 min if the stop rule never fired."""
    from gradual.runplan import plan_lines

    cli = GradualCLI(args=["--config", str(SMOKE.parent / "demo.yaml"), "--model.run_dir", str(tmp_path / "demo")],
                     run=False)
    estimate = next(line for line in plan_lines(cli.model, cli.datamodule, cli.trainer) if "estimate: training" in line)
    assert "training at most ~21 min (72 steps x <= 17.4 s, every example filling max_length 160;" in estimate


@pytest.mark.slow  # reads the offline Gemma3's config (no weights load; a ~2 min conversion on a fresh cache)
def test_the_gemma3_config_plans_its_18_layers(tmp_path: Path) -> None:
    """configs/gemma3-270m.yaml builds as it is: the alias's 18 layers, the demo's six one-layer stages, and tasks
    that all exist (a wrong name would be refused here, before any model loads)."""
    from gradual.runplan import plan_lines

    cli = GradualCLI(args=["--config", str(SMOKE.parent / "gemma3-270m.yaml"), "--model.run_dir", str(tmp_path / "g")],
                     run=False)
    lines = plan_lines(cli.model, cli.datamodule, cli.trainer)
    assert "plan: model gemma3-270m (18 layers, float32) on cpu" in lines
    assert any("training at most" in line and "(72 steps x" in line for line in lines), lines


def test_evaluation_and_scoring_bars_write_nothing_to_a_file(capfd: pytest.CaptureFixture[str]) -> None:
    """With progress on and standard error a file (a job's log), the evaluation's, generation's and layer scoring's
    own bars stay silent: a log is not filled with carriage-return redraws. (A terminal still gets them.)"""
    from gradual.importance import calibration_batches, score_layers
    from gradual.tasks import evaluate
    from gradual.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    evaluate(model, tok, ["successor"], n=4, progress=True)
    score_layers(model, calibration_batches(tok, ["one text", "another text"]), "block_influence", progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err and "successor" not in err and "hidden states" not in err
