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
