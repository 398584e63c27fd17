"""Keep `results.json`, `report.md` and `retention.png` current after every stage's verdict and at the end."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from gradual.datamodule import GradualDataModule
from gradual.run_report import write_report
from gradual.stages import StageLoop


class Report(Callback):
    """Write the run's report once each stage is decided (partial) and at the end (with the final stage).

    Only reads the module's records. A stage's verdict is decided after every callback's `on_train_epoch_end`
    (`StageCheckpoint` concludes it), so the report is written when the next stage starts and when training ends:
    every row then has its scores, retention and verdict, wherever the config lists this callback.
    """

    def _write(self, trainer: L.Trainer, pl_module: StageLoop, final: bool) -> None:
        if trainer.is_global_zero:
            pl_module.run_dir.mkdir(parents=True, exist_ok=True)
            dm = trainer.datamodule
            write_report(pl_module.run_dir, [r.to_dict() for r in pl_module.history],
                         pl_module.chosen_stage() if final else None, pl_module.stop_reason, pl_module.run_config(),
                         pl_module.in_data_tasks, dm.describe() if isinstance(dm, GradualDataModule) else None)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        if pl_module.stage > 0:
            self._write(trainer, pl_module, final=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        self._write(trainer, pl_module, final=True)
