"""Each Lightning internal gradual relies on (`gradual.lightning_compat`) still exists and does what it is used for:
these fail when a Lightning release changes one."""

from __future__ import annotations

import inspect
import sys

import lightning as L
import pytest
from lightning.fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd, _SubprocessScriptLauncher
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from gradual.lightning_compat import rank_command, rewrap_ddp, start_at_epoch, tensor_parallel_size


def test_ddp_strategy_can_rewrap_a_module_and_register_its_hooks() -> None:
    assert list(inspect.signature(DDPStrategy._setup_model).parameters) == ["self", "model"]
    assert list(inspect.signature(DDPStrategy._register_ddp_hooks).parameters) == ["self"]
    assert callable(rewrap_ddp)


def test_a_resumed_fit_starts_at_the_stage_it_reached() -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.current_epoch == 0
    start_at_epoch(trainer, 3)
    assert trainer.current_epoch == 3
    assert trainer.fit_loop.epoch_progress.current.completed == trainer.fit_loop.epoch_progress.total.completed == 3


def test_the_tensor_parallel_size_of_a_model_parallel_strategy_is_read() -> None:
    assert tensor_parallel_size(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)) == 2
    assert tensor_parallel_size(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)) == 1
    assert tensor_parallel_size(DDPStrategy()) == 1


def test_the_ddp_launcher_starts_the_other_ranks_with_the_fit_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning starts the other ranks from `sys.argv`; within `rank_command` that is this fit, restored after."""
    assert "_basic_subprocess_cmd()" in inspect.getsource(_SubprocessScriptLauncher._call_children_scripts)
    monkeypatch.setattr(sys, "argv", ["/bin/wrapper", "--its", "own"])
    with rank_command(["fit", "--config", "run.yaml"]):
        assert sys.argv == ["/bin/wrapper", "fit", "--config", "run.yaml"]
        assert list(_basic_subprocess_cmd())[-3:] == ["fit", "--config", "run.yaml"]
    assert sys.argv == ["/bin/wrapper", "--its", "own"]
    with pytest.raises(KeyboardInterrupt), rank_command(["fit"]):
        raise KeyboardInterrupt
    assert sys.argv == ["/bin/wrapper", "--its", "own"]
