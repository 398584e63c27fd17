"""The parts of a run's identity (`gradual.identity`) read from objects however they were built: the same settings
give the same identity, other settings another, and what only shows progress or writes reports is left out."""

from __future__ import annotations

import functools

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from gradual.callbacks import ProgressLog, Report, RetentionStopping, StageCheckpoint, TaskEvaluation
from gradual.identity import callback_settings, optimizer_settings, training_settings


def test_an_optimizer_is_identified_by_what_it_builds_not_by_how_it_was_given() -> None:
    partial = functools.partial(torch.optim.AdamW, lr=1e-3)
    assert optimizer_settings(partial, None) == optimizer_settings(lambda p: torch.optim.AdamW(p, lr=1e-3), None)
    assert optimizer_settings(partial, None)[0]["init_args"]["lr"] == 1e-3
    assert optimizer_settings(functools.partial(torch.optim.AdamW, lr=2e-3), None) != optimizer_settings(partial, None)
    assert optimizer_settings(None, None) == (None, None), "the module's defaults"
    warmup = functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.5, total_iters=4)
    _, scheduler = optimizer_settings(None, warmup)
    assert scheduler["class_path"] == "torch.optim.lr_scheduler.LinearLR"
    assert scheduler["init_args"]["start_factor"] == 0.5 and scheduler["init_args"]["total_iters"] == 4
    assert optimizer_settings(None, functools.partial(warmup, total_iters=8))[1] != scheduler


def test_epoch_limits_are_recorded_as_they_act() -> None:
    """-1, None (Lightning's 1000 once fitting) and anything above the plan's stages allow the same stages; an unset
    minimum reads as Lightning's 0."""
    def trainer(**kwargs: object) -> L.Trainer:
        return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)

    limits = [training_settings(trainer(max_epochs=m), stages=3) for m in (None, -1, 1000, 3)]
    assert all(s == limits[0] for s in limits) and limits[0]["max_epochs"] == 3 and limits[0]["min_epochs"] == 0
    assert training_settings(trainer(max_epochs=2), stages=3)["max_epochs"] == 2
    assert training_settings(trainer(min_epochs=2), stages=3)["min_epochs"] == 2


def test_callbacks_that_decide_results_are_listed_in_order_and_the_others_left_out() -> None:
    evaluation = TaskEvaluation(tasks=["successor"], n=4, batch_size=2, progress=False)
    listed = callback_settings([ProgressLog(), evaluation, Report(), RetentionStopping(threshold=0.7),
                                EarlyStopping(monitor="retention/min", divergence_threshold=0.5), StageCheckpoint()])
    assert [c["class_path"] for c in listed] == ["gradual.callbacks.evaluation.TaskEvaluation",
                                                 "gradual.callbacks.stopping.RetentionStopping",
                                                 "lightning.pytorch.callbacks.early_stopping.EarlyStopping"]
    assert listed[1]["init_args"] == {"threshold": 0.7, "monitor": "held_out_generative_mean"}
    assert listed[2]["init_args"]["divergence_threshold"] == 0.5
    assert "batch_size" not in listed[0]["init_args"] and "progress" not in listed[0]["init_args"]
    same = TaskEvaluation(tasks=["successor"], n=4, batch_size=16)  # another batch size: the same scores
    assert callback_settings([same]) == listed[:1]


def _identity(on_policy: float = 0.0, n_texts: int = 256) -> dict:
    """A run identity's recovery and data parts as `GradualModule.run_config` records them (the rest is alike)."""
    from dataclasses import asdict

    from gradual.distill import Recovery
    from gradual.mixture import DataSource

    return {"model": "tiny:llama", "recovery": asdict(Recovery(loss="kd", on_policy=on_policy)),
            "data": {"sources": [asdict(DataSource("tasks", tasks=["copy"])),
                                 asdict(DataSource("self_text", n_texts=n_texts))]}}


def _recorded_before_added(config: dict) -> dict:
    """`config` as a run recorded before the added settings existed: without them."""
    import copy

    old = copy.deepcopy(config)
    for name in ("on_policy", "on_policy_tokens"):
        del old["recovery"][name]
    for source in old["data"]["sources"]:
        for name in ("n_texts", "max_new_tokens", "temperature", "top_p", "seed"):
            del source[name]
    return old


def test_a_run_recorded_before_a_setting_existed_resumes_while_the_setting_holds_its_default(tmp_path) -> None:
    import json

    import pytest

    from gradual import rundir
    from gradual.errors import UsageError

    recorded = _recorded_before_added(_identity())
    (tmp_path / rundir.STATE_FILE).write_text(json.dumps({"config": recorded}))
    (tmp_path / "stage_0").mkdir()
    rundir.check_run_dir(tmp_path, _identity(), overwrite=False)  # resumes: nothing cleared
    assert (tmp_path / "stage_0").is_dir()
    assert json.loads((tmp_path / rundir.STATE_FILE).read_text())["config"] == recorded
    with pytest.raises(UsageError, match=r"different run \(changed: recovery\.on_policy\)"):
        rundir.check_run_dir(tmp_path, _identity(on_policy=0.5), overwrite=False)
    with pytest.raises(UsageError, match=r"changed: data\.sources\.1\.n_texts\)"):
        rundir.check_run_dir(tmp_path, _identity(n_texts=64), overwrite=False)
    (tmp_path / rundir.STATE_FILE).write_text(json.dumps({"config": {**recorded, "model": "tiny:qwen2"}}))
    with pytest.raises(UsageError, match=r"changed: model\)"):  # a setting the record has still decides
        rundir.check_run_dir(tmp_path, _identity(), overwrite=False)


def test_added_settings_hold_the_config_classes_defaults() -> None:
    from gradual.identity import added_settings

    added = added_settings()
    assert added[("recovery", "on_policy")] == 0.0 and added[("recovery", "on_policy_tokens")] == 128
    assert added[("data", "sources", "*", "n_texts")] == 256 and len(added) == 7
