"""The callback contract on Lightning's terms: the stop rule composed as a user composes it (any place in the config,
any base class) gets one verdict per stage, decided after every callback; callback state survives a resume through
`state_dict`; every run has its `StageCheckpoint` and no Lightning checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from test_fit import SMOKE, fit_in_process, write_config

from gradual import rundir
from gradual.callbacks import Report, RetentionStopping, StageCheckpoint, TaskEvaluation
from gradual.callbacks.stopping import log_retention
from gradual.cli import main
from gradual.lightning_cli import GradualCLI
from gradual.stages import StageHistory, StageRecord


def bare_trainer() -> L.Trainer:
    """A real single-process Trainer that is not fitting: what a callback called directly uses of one
    (`callback_metrics`, `should_stop`, `strategy`, `current_epoch`)."""
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


# ------------------------------------------------------------------------------- the verdict, without a Trainer


def _two_stages() -> StageHistory:
    return StageHistory(history=[StageRecord(stage=0, depth=4), StageRecord(stage=1, depth=3)])


def test_the_first_rollback_proposed_wins_whatever_was_proposed_around_it() -> None:
    stages = _two_stages()
    stages.propose(True)
    stages.propose(False, "stage 1: copy retention 0.400 < threshold 0.5")
    stages.propose(False, "stage 1: a second opinion")
    stages.propose(True)
    assert stages.record.meets_threshold is None and stages.stop_reason is None, "nothing decided before conclude"
    assert stages.proposed() is False
    assert stages.conclude(plan_done=True) is True
    assert stages.record.meets_threshold is False
    assert stages.stop_reason == "stage 1: copy retention 0.400 < threshold 0.5; rolled back to stage 0"


@pytest.mark.parametrize(("votes", "plan_done", "verdict", "stops", "reason"), [
    ([], False, None, False, None),
    ([True], False, True, False, None),
    ([True], True, True, True, "schedule complete"),
    ([], True, None, True, "schedule complete"),
], ids=["unjudged", "kept", "kept_last", "unjudged_last"])
def test_a_stage_not_rolled_back_is_kept_or_left_undecided(votes: list[bool], plan_done: bool, verdict: bool | None,
                                                           stops: bool, reason: str | None) -> None:
    stages = _two_stages()
    for vote in votes:
        stages.propose(vote)
    assert stages.conclude(plan_done=plan_done) is stops
    assert stages.record.meets_threshold is verdict and stages.stop_reason == reason
    assert stages.proposed() is None, "proposals end with the stage's verdict"


# ------------------------------------------------------------------------------- the stop rule, as Lightning's


def _judged(monitor: str, threshold: float, scores: dict[str, float]) -> tuple[L.Trainer, StageHistory,
                                                                               RetentionStopping]:
    """A stage scored `scores` (generative) against a baseline of 0.5 each, its retention logged as the evaluations
    log it, then judged by `RetentionStopping`."""
    baseline = StageRecord(stage=0, depth=4, scores={k: {"score": 0.5, "form": "generative"} for k in scores})
    stage = StageRecord(stage=1, depth=3, scores={k: {"score": v, "form": "generative"} for k, v in scores.items()})
    stages = StageHistory(history=[baseline, stage])
    stages.log = lambda *a, **k: None
    trainer = bare_trainer()
    log_retention(trainer, stages)
    rule = RetentionStopping(threshold=threshold, monitor=monitor)
    rule.on_train_epoch_end(trainer, stages)
    return trainer, stages, rule


def test_retention_is_a_float64_metric_and_the_threshold_is_compared_exactly() -> None:
    """0.35 / 0.5 is 0.7 in float64, 0.699999988 in float32 (what `log` would keep): exactly at the threshold, the
    stage is kept."""
    trainer, stages, _ = _judged("copy", 0.7, {"copy": 0.35, "successor": 0.1})
    metric = trainer.callback_metrics["retention/copy"]
    assert metric.dtype == torch.float64 and float(metric) == 0.35 / 0.5
    assert float(trainer.callback_metrics["retention/min"]) == pytest.approx(0.2)
    assert stages.proposed() is True and not trainer.should_stop


def test_an_undefined_retention_is_nan_every_stage_so_no_value_is_stale() -> None:
    baseline = StageRecord(stage=0, depth=4, scores={"copy": {"score": 0.5, "form": "generative"},
                                                     "zero": {"score": 0.0, "form": "generative"}})
    stages = StageHistory(history=[baseline, StageRecord(stage=1, depth=3, scores={
        "copy": {"score": 0.5, "form": "generative"}, "zero": {"score": 0.0, "form": "generative"}})])
    trainer = bare_trainer()
    log_retention(trainer, stages)
    stages.history.append(StageRecord(stage=2, depth=2, scores={"zero": {"score": 0.0, "form": "generative"}}))
    log_retention(trainer, stages)  # copy's evaluation failed at stage 2 (on_error: skip)
    metrics = trainer.callback_metrics
    assert torch.isnan(metrics["retention/copy"]) and torch.isnan(metrics["retention/zero"])
    assert torch.isnan(metrics["retention/generative_mean"]) and "retention/classification_mean" in metrics
    assert stages.record.retention == {"zero": None}


def test_a_miss_stops_the_trainer_and_proposes_the_rollback_with_its_reason() -> None:
    trainer, stages, rule = _judged("copy", 0.7, {"copy": 0.3})
    assert trainer.should_stop and stages.proposed() is False and stages.record.meets_threshold is None
    assert rule.stopping_reason_message == "stage 1: copy retention 0.600 < threshold 0.7"
    stages.conclude()
    assert stages.stop_reason == "stage 1: copy retention 0.600 < threshold 0.7; rolled back to stage 0"


def test_the_stop_rule_state_round_trips_through_state_json(tmp_path: Path) -> None:
    """Its own state, and Lightning's `EarlyStopping`'s, whose best score is a tensor (kept exactly, -inf too)."""
    _, stages, rule = _judged("copy", 0.7, {"copy": 0.3})
    lightning = EarlyStopping(monitor="retention/copy", mode="max")
    states = {rule.state_key: rule.state_dict(), lightning.state_key: lightning.state_dict()}
    assert rule.state_dict()["judged"] == [[1, pytest.approx(0.6)]]
    assert rule.state_dict()["stopping_reason"] == EarlyStoppingReason.DIVERGENCE_THRESHOLD.value
    rundir.write_state(tmp_path, {}, stages.history, None, callbacks=states)
    json.loads((tmp_path / "state.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no -Infinity
    loaded = rundir.callback_states(tmp_path)
    fresh = RetentionStopping(threshold=0.7, monitor="copy")
    fresh_lightning = EarlyStopping(monitor="retention/copy", mode="max")
    fresh.load_state_dict(loaded[fresh.state_key])
    fresh_lightning.load_state_dict(loaded[fresh_lightning.state_key])
    assert fresh.state_dict() == rule.state_dict()
    best = fresh_lightning.state_dict()["best_score"]
    assert best.dtype == lightning.best_score.dtype and torch.equal(best, lightning.best_score)


# ------------------------------------------------------------------------------- the stop rule as a user composes it


class WatchfulRetention(RetentionStopping):
    """A user's subclass of the stop rule: it notes what the run had recorded when it came to judge each stage."""

    def __init__(self, threshold: float = 0.9, monitor: str = "held_out_generative_mean") -> None:
        super().__init__(threshold=threshold, monitor=monitor)
        self.seen: list[tuple[int, str | None, bool | None]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.seen.append((pl_module.stage, pl_module.stop_reason, pl_module.record.meets_threshold))
        super().on_train_epoch_end(trainer, pl_module)


class RetentionFloor(EarlyStopping):
    """A stop rule written the Lightning way: `EarlyStopping` on a `retention/` metric, stopping once it falls below
    `floor` (its divergence threshold), which also tells the module to roll the stage back."""

    def __init__(self, key: str, floor: float) -> None:
        super().__init__(monitor=f"retention/{key}", mode="max", divergence_threshold=floor, patience=1_000,
                         check_on_train_epoch_end=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        missed = self.stopping_reason == EarlyStoppingReason.DIVERGENCE_THRESHOLD
        pl_module.propose(not missed, f"stage {pl_module.stage}: {self.stopping_reason_message}" if missed else None)


class PlainFloor(Callback):
    """The same rule as a plain callback, which Lightning runs before the module's own hook, not after it."""

    def __init__(self, key: str, floor: float) -> None:
        self.key, self.floor = key, floor

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        value = float(trainer.callback_metrics[f"retention/{self.key}"])
        pl_module.propose(value >= self.floor, None if value >= self.floor else f"stage {pl_module.stage}: below")
        trainer.should_stop = trainer.should_stop or value < self.floor


EVALUATION = {"class_path": "gradual.callbacks.TaskEvaluation", "init_args": {"tasks": ["successor"], "n": 16,
                                                                             "max_new_tokens": 6}}
REPORT = {"class_path": "gradual.callbacks.Report"}
CHECKPOINT = {"class_path": "gradual.callbacks.StageCheckpoint"}
RULE = {"threshold": 0.7, "monitor": "mc_successor"}
ORDERS = {
    "stop_rule_last": [EVALUATION, REPORT, CHECKPOINT, {"class_path": "gradual.callbacks.RetentionStopping",
                                                       "init_args": RULE}],
    "user_subclass_no_checkpoint_listed": [EVALUATION, REPORT, {"class_path": "test_callbacks.WatchfulRetention",
                                                                "init_args": RULE}],
    "lightning_early_stopping": [EVALUATION, CHECKPOINT, {"class_path": "test_callbacks.RetentionFloor",
                                                          "init_args": {"key": "mc_successor", "floor": 0.7}}, REPORT],
    "plain_callback": [EVALUATION, CHECKPOINT, {"class_path": "test_callbacks.PlainFloor",
                                                "init_args": {"key": "mc_successor", "floor": 0.7}}, REPORT],
}
"""Stop rules, each where a user might list it after the evaluations (which Lightning runs first: plain callbacks in
list order, then the module, then `EarlyStopping` and checkpoint callbacks)."""

STOPPED = ("stage 2: mc_successor (in-data: measured on tasks the recovery data taught) retention 0.500 [0.000, 1.000] "
           "< threshold 0.7; rolled back to stage 1")
"""What the configured order (evaluation, stop rule, report, checkpoint) records on this run (tests/test_fit.py
checks the same rollback over 4 planned stages)."""


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_the_stop_rule_decides_the_same_wherever_and_however_it_is_composed(tmp_path: Path, order: str) -> None:
    """Two planned stages: stage 2, the last, falls below the threshold. Wherever the stop rule is listed and whatever
    its base class, it is judged before anything is decided, "schedule complete" is never recorded, the stage is
    rolled back to stage 1, and the run directory says so."""
    config, run_dir = write_config(tmp_path, trainer__callbacks=ORDERS[order], model__schedule__max_layers=2)
    cli = fit_in_process(config)
    results = json.loads((run_dir / "results.json").read_text())
    stages = results["stages"]
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, StageCheckpoint)]
    assert checkpoints == [cli.trainer.callbacks[-1]] and checkpoints[0].keep == "last_good"
    assert [s["meets_threshold"] for s in stages] == [None, True, False]
    assert stages[2]["retention"]["mc_successor"] == 0.5 and results["final_stage"] == 1
    if order == "lightning_early_stopping":  # Lightning's own words for the miss
        assert results["stop_reason"].startswith("stage 2: Divergence threshold reached: retention/mc_successor = 0.5")
        assert results["stop_reason"].endswith("; rolled back to stage 1")
    elif order == "plain_callback":
        assert results["stop_reason"] == "stage 2: below; rolled back to stage 1"
    else:
        assert results["stop_reason"] == STOPPED
    assert json.loads((run_dir / "final" / "gradual.json").read_text())["stage"] == 1
    assert not (run_dir / "stage_2" / "model.safetensors").exists() and (run_dir / "stage_1" / "config.json").exists()
    rule = next((c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping)), None)
    if isinstance(rule, WatchfulRetention):
        assert rule.seen == [(1, None, None), (2, None, None)], "judged before any verdict or stop reason"
    if rule is not None:  # the stop rule's state, saved with the stage
        saved = json.loads((run_dir / "state.json").read_text())["callbacks"][rule.state_key]
        assert saved["stopping_reason"] == EarlyStoppingReason.DIVERGENCE_THRESHOLD.value


# ------------------------------------------------------------------------------- resume restores callback state


class SnapshotAtStage2(Callback):
    """Copy `state.json` as stage 2 starts: what a run interrupted during stage 2 leaves."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.stage == 1:
            shutil.copy(pl_module.run_dir / "state.json", self.out)


def _fit_with_rule(config: Path, *extra: Callback) -> tuple[GradualCLI, RetentionStopping]:
    cli = GradualCLI(args=["--config", str(config)], run=False)
    cli.trainer.callbacks.extend(extra)
    cli.model.check_run_dir(cli.trainer, cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, next(c for c in cli.trainer.callbacks if isinstance(c, RetentionStopping))


def test_a_resumed_run_restores_the_stop_rules_state_through_state_dict(tmp_path: Path) -> None:
    config, run_dir = write_config(tmp_path, model__schedule__max_layers=2,
                                   trainer__callbacks__3__init_args__keep="all")
    snapshot = tmp_path / "state_at_stage_2.json"
    whole, whole_rule = _fit_with_rule(config, SnapshotAtStage2(snapshot))
    assert [stage for stage, _ in whole_rule.state_dict()["judged"]] == [1, 2]
    interrupted = json.loads(snapshot.read_text())
    assert interrupted["resume_from"] == "stage_1"
    assert [stage for stage, _ in interrupted["callbacks"][whole_rule.state_key]["judged"]] == [1]
    whole_results = json.loads((run_dir / "results.json").read_text())

    shutil.copy(snapshot, run_dir / "state.json")  # as if killed during stage 2: resume from stage 1
    resumed, resumed_rule = _fit_with_rule(config)
    assert resumed.model.history[1].timings == whole.model.history[1].timings, "stage 1 was not redone"
    assert resumed_rule.state_dict() == whole_rule.state_dict(), "stage 1's judgement came back from state.json"
    resumed_results = json.loads((run_dir / "results.json").read_text())
    assert [s["scores"] for s in resumed_results["stages"]] == [s["scores"] for s in whole_results["stages"]]


# ------------------------------------------------------------------------------- the stage checkpoint, always


def _callbacks_config(tmp_path: Path, callbacks: list[dict[str, Any]], **changes: Any) -> Path:
    base = yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"][:2]
    config, _ = write_config(tmp_path, trainer__callbacks=base + callbacks, **changes)
    return config


def test_a_config_without_stage_checkpoint_gets_one_and_no_lightning_checkpoint(tmp_path: Path) -> None:
    cli = GradualCLI(args=["--config", str(_callbacks_config(tmp_path, [REPORT]))], run=False)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert kinds[:3] == [TaskEvaluation, RetentionStopping, Report] and kinds[-1] is StageCheckpoint
    assert cli.trainer.checkpoint_callbacks == [cli.trainer.callbacks[-1]]
    assert cli.trainer.callbacks[-1].keep == "last_good" and ModelCheckpoint not in kinds


@pytest.mark.parametrize(("callbacks", "changes", "needle"), [
    ([CHECKPOINT, {"class_path": "gradual.callbacks.StageCheckpoint", "init_args": {"keep": "all"}}], {},
     "lists StageCheckpoint twice"),
    ([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}], {},
     "trainer.callbacks: ModelCheckpoint is not supported: Lightning's own checkpoints stay off"),
    ([], {"trainer__enable_checkpointing": True}, "trainer.enable_checkpointing=true is not supported"),
], ids=["two_stage_checkpoints", "model_checkpoint", "enable_checkpointing"])
def test_a_second_or_a_lightning_checkpoint_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   callbacks: list[dict[str, Any]],
                                                                   changes: dict[str, Any], needle: str) -> None:
    config = _callbacks_config(tmp_path, callbacks, **changes)
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gradual: error:") and needle in err[-1], err
    assert not (tmp_path / "run").exists()


def test_the_stop_message_and_the_record_carry_the_monitors_95_percent_interval() -> None:
    """With per-problem scores kept, the stage's record holds every interval and the stop line reads
    "retention 0.500 [lo, hi] < threshold 0.8", the interval the paired bootstrap gives."""
    import re

    from gradual.intervals import task_figures

    base_items, stage_items = [1.0] * 16 + [0.0] * 16, [1.0] * 8 + [0.0] * 24

    def judged(monitor: str) -> tuple[StageHistory, RetentionStopping]:
        baseline = StageRecord(stage=0, depth=4, scores={
            "copy": {"score": 0.5, "form": "generative", "items": base_items},
            "products": {"score": 0.5, "form": "generative", "items": base_items}})
        stage = StageRecord(stage=1, depth=3, scores={
            "copy": {"score": 0.25, "form": "generative", "items": stage_items},
            "products": {"score": 0.5, "form": "generative", "items": base_items}})
        stages = StageHistory(history=[baseline, stage])
        stages.log = lambda *a, **k: None
        trainer = bare_trainer()
        log_retention(trainer, stages)
        rule = RetentionStopping(threshold=0.8, monitor=monitor)
        rule.on_train_epoch_end(trainer, stages)
        return stages, rule

    stages, rule = judged("copy")
    lo, hi = task_figures(stage_items, base_items, key="copy").retention_ci
    assert lo < 0.5 < hi
    assert rule.stopping_reason_message == f"stage 1: copy retention 0.500 [{lo:.3f}, {hi:.3f}] < threshold 0.8"
    assert stages.record.intervals["generative"]["worst_task"] == "copy"
    assert stages.record.retention["generative_mean"] == 0.75 and stages.record.retention["generative_worst"] == 0.5
    stages, rule = judged("generative_mean")
    lo, hi = stages.record.intervals["generative"]["mean_ci"]
    assert re.fullmatch(rf"stage 1: generative_mean retention 0\.750 \[{lo:.3f}, {hi:.3f}\] < threshold 0\.8",
                        rule.stopping_reason_message), rule.stopping_reason_message
