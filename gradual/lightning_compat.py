"""The Lightning internals the prune → heal loop needs, each in one function, each guarded by a test
(`tests/test_lightning_compat.py`) that fails when Lightning changes it.

Why any are needed: one Lightning epoch is one pruning stage, and every stage creates new trainable parameters (fresh
adapters, or other full weights), so the DDP wrapper has to be rebuilt around them mid-fit; a resumed run starts
Lightning's epoch count at the stage it reached, which Lightning only does when it restores its own `.ckpt` files
(gradual resumes from its run directory instead); and Lightning's DDP launcher starts the other ranks from the
process's command line, which `gradual fit` called from Python does not hold.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L


def rewrap_ddp(strategy: Any, module: L.LightningModule) -> None:
    """Wrap `module` in a new `DistributedDataParallel` (its trainable parameters changed) and register the
    configured DDP communication hook on the new wrapper: `DDPStrategy._setup_model` and `_register_ddp_hooks`."""
    strategy.model = strategy._setup_model(module)
    strategy._register_ddp_hooks()


def start_at_epoch(trainer: L.Trainer, done: int) -> None:
    """Continue Lightning's epoch count at `done` finished stages (a resumed run), so data slices, logs and the
    progress bar line up with the stage reached: the fit loop's epoch progress counters."""
    progress = trainer.fit_loop.epoch_progress
    for counter in (progress.current, progress.total):
        counter.ready = counter.started = counter.processed = counter.completed = done


def tensor_parallel_size(strategy: Any) -> int:
    """The tensor-parallel size a `ModelParallelStrategy` was given (Lightning keeps it private;
    `_tensor_parallel_size`, 1 for any other strategy)."""
    return getattr(strategy, "_tensor_parallel_size", 1)


@contextmanager
def rank_command(args: Sequence[str]) -> Iterator[None]:
    """Within the block, `sys.argv` is this program followed by `args` (e.g. `fit --config run.yaml`); restored
    afterwards, also on an error.

    Lightning's DDP launcher (`_SubprocessScriptLauncher`) starts every other rank by running the current process's
    command line again, `sys.argv` (`_basic_subprocess_cmd`). `gradual fit` is also run as `main(argv)` from Python
    (a wrapper script, tests), whose command line is another one: without this, the other ranks would run that one,
    not this fit.
    """
    saved = sys.argv
    sys.argv = [saved[0] if saved else "gradual", *args]
    try:
        yield
    finally:
        sys.argv = saved
