"""Keep `results.json`, `report.md` and `retention.png` current after every stage and at the end."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from gradual.run_report import write_report


class Report(Callback):
    """Write the run's report after each stage (partial) and at the end (with the final stage).

    Only reads the module's records; list it after the evaluation and stop-rule callbacks so each stage's row has
    its scores, retention and decision.
    """

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        if trainer.is_global_zero:
            pl_module.run_dir.mkdir(parents=True, exist_ok=True)
            describe = getattr(trainer.datamodule, "describe", None)
            write_report(pl_module.run_dir, [r.to_dict() for r in pl_module.history],
                         pl_module.chosen_stage() if final else None, pl_module.stop_reason, pl_module.run_config(),
                         getattr(pl_module, "in_data_tasks", ()), describe() if describe else None)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, final=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, final=True)
