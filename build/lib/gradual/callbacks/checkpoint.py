"""Stage checkpoints in Hugging Face format, the resume state, and `final/` (layout: `gradual.rundir`).

Each finished stage writes `stage_<k>/metrics.json`; its model (safetensors, own dtype, tokenizer) is kept for
every stage (`keep: all`) or only for the last stage that met the threshold (`keep: last_good`, enough for
rollback and resume — a 7-8B model is ~16 GB per stage in bf16). `state.json` is written after the model, so
an interrupted run resumes from a stage that is complete on disk; every folder is written under a temporary name
and renamed into place, and what an interrupted run left half-way is removed when it resumes. A stage abandoned on
a non-finite loss or weights is never saved (and `gradual.models.save_model` refuses non-finite weights anyway).

`state.json` also holds every stateful callback's `state_dict()` (keyed by its `state_key`, as Lightning's own
checkpoints hold them), restored through `load_state_dict` when the run resumes.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from gradual import models, rundir
from gradual.errors import UsageError
from gradual.stages import StageLoop

log = logging.getLogger(__name__)


class StageCheckpoint(Checkpoint):
    """Conclude each stage, save it, keep what rollback and resume need, and write `final/` at the end.

    Part of every `gradual fit` run (`GradualCLI` adds one when the config lists none, and refuses a second) and its
    only checkpoint: Lightning's own checkpointing is off. Lightning runs `Checkpoint` callbacks after every other
    callback and after the module's own `on_train_epoch_end`, and this one puts itself last among them, so its
    `on_train_epoch_end` is the stage's last word whatever the config's order: it has the module decide the stage's
    verdict (`conclude_stage`) from everything the other callbacks proposed, then saves the stage with its scores,
    retention and verdict. It writes to the module only through `record_timing("checkpoint_s", ...)`.

    Args:
        keep: `last_good` (default) keeps only the model of the last stage that met the threshold;
            `all` keeps every stage's model.
    """

    def __init__(self, keep: str = "last_good") -> None:
        if keep not in ("all", "last_good"):
            raise UsageError(f"StageCheckpoint keep={keep!r} is unknown; allowed: all, last_good")
        self.keep = keep

    def setup(self, trainer: L.Trainer, pl_module: StageLoop, stage: str) -> None:
        """Be the last callback, also after one added to the Trainer once it was built."""
        trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]

    def on_fit_start(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        """On resume (the module continues from a saved stage), give every callback back the state it saved with
        that stage, before training starts."""
        if pl_module.stage == 0:
            return
        states = rundir.callback_states(pl_module.run_dir)
        for callback in trainer.callbacks:
            if callback.state_key in states:
                callback.load_state_dict(copy.deepcopy(states[callback.state_key]))

    def on_train_start(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        """Before this run writes: remove what an interrupted one left half-way (`*.tmp` folders, stages after the
        one it resumes from), then record stage 0."""
        if trainer.is_global_zero:
            pl_module.run_dir.mkdir(parents=True, exist_ok=True)
            for path in rundir.clean_incomplete(pl_module.run_dir, pl_module.stage):
                log.info("removed %s, left incomplete by an interrupted run", path)
            rundir.write_stage(pl_module.run_dir, pl_module.history[0], export=None)
            self._write_state(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        """The stage's verdict (on every rank), then its folder, metrics and `state.json` (rank 0)."""
        pl_module.conclude_stage()
        if not trainer.is_global_zero:
            return
        record = pl_module.record
        t = time.perf_counter()
        save = not record.abandoned and (self.keep == "all" or record.meets_threshold is not False)
        rundir.write_stage(pl_module.run_dir, record, export=pl_module.export if save else None)
        pl_module.record_timing("checkpoint_s", time.perf_counter() - t)
        rundir.write_metrics(pl_module.run_dir, record)
        self._write_state(trainer, pl_module)
        if self.keep == "last_good" and save:
            for old in pl_module.history[1:-1]:
                rundir.drop_model(pl_module.run_dir, old.stage)

    def on_train_end(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        if not trainer.is_global_zero:
            return
        chosen = pl_module.chosen_stage()

        def baseline(path: Path) -> None:
            """Stage 0 keeps no model on disk: write the unpruned model as it was evaluated."""
            models.save_model(pl_module.baseline_model(), pl_module.tokenizer, path)

        rundir.write_final(pl_module.run_dir, pl_module.history[chosen], pl_module.stop_reason,
                            export=baseline if chosen == 0 else None)
        self._write_state(trainer, pl_module, final_stage=chosen)

    @staticmethod
    def _write_state(trainer: L.Trainer, pl_module: StageLoop, final_stage: int | None = None) -> None:
        states: dict[str, Any] = {}
        for callback in trainer.callbacks:
            state = callback.state_dict()
            if state:
                states[callback.state_key] = state
        rundir.write_state(pl_module.run_dir, pl_module.run_config(), pl_module.history, pl_module.stop_reason,
                            final_stage, callbacks=states)
