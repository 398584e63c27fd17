"""Each Lightning internal gradual relies on (`gradual.lightning_compat`) still exists and does what it is used for:
these fail when a Lightning release changes one."""

from __future__ import annotations

import inspect

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from gradual.lightning_compat import rewrap_ddp, start_at_epoch, tensor_parallel_size


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
