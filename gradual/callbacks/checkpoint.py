"""Stage checkpoints in Hugging Face format, the resume state, and `final/`.

Each finished stage writes `stage_<k>/metrics.json`; its model (safetensors, own dtype, tokenizer) is kept for
every stage (`keep: all`) or only for the last stage that met the threshold (`keep: last_good`, enough for
rollback and resume — a 7-8B model is ~16 GB per stage in bf16). `state.json` is written after the model, so
an interrupted run resumes from a stage that is complete on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from gradual import models
from gradual.errors import UsageError
from gradual.module import STATE_FILE

MODEL_FILES = ("*.safetensors", "*.safetensors.index.json")


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write: a crash never leaves a half-written state file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class StageCheckpoint(Checkpoint):
    """Save each stage, keep what rollback and resume need, and write `final/` at the end.

    Args:
        keep: `last_good` (default) keeps only the model of the last stage that met the threshold;
            `all` keeps every stage's model.
    """

    def __init__(self, keep: str = "last_good") -> None:
        if keep not in ("all", "last_good"):
            raise UsageError(f"StageCheckpoint keep={keep!r} is unknown; allowed: all, last_good")
        self.keep = keep

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_stage(pl_module, pl_module.history[0], save_model=False)
            self._write_state(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        record = pl_module.history[-1]
        t = time.perf_counter()
        save = self.keep == "all" or record.meets_threshold is not False
        self._write_stage(pl_module, record, save_model=save)
        record.timings["checkpoint_s"] = time.perf_counter() - t
        write_json(pl_module.run_dir / f"stage_{record.stage}" / "metrics.json", record.to_dict())
        self._write_state(pl_module)
        if self.keep == "last_good" and save:
            for old in pl_module.history[1:-1]:
                self._drop_model(pl_module.run_dir / f"stage_{old.stage}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        final = pl_module.run_dir / "final"
        chosen = pl_module.chosen_stage()
        if final.exists():
            shutil.rmtree(final)
        if chosen == 0:
            models.save_model(pl_module.baseline_model(), pl_module.tokenizer, final)
        else:
            shutil.copytree(pl_module.run_dir / f"stage_{chosen}", final,
                            ignore=shutil.ignore_patterns("metrics.json"))
        write_json(final / "gradual.json", {"stage": chosen, "removed": pl_module.history[chosen].removed_total,
                                            "kept": pl_module.history[chosen].kept,
                                            "stop_reason": pl_module.stop_reason})
        self._write_state(pl_module, finished=True)

    def _write_stage(self, pl_module: L.LightningModule, record: Any, save_model: bool) -> None:
        stage_dir = pl_module.run_dir / f"stage_{record.stage}"
        if save_model:
            tmp = stage_dir.with_name(stage_dir.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            pl_module.export(tmp)
            if stage_dir.exists():
                shutil.rmtree(stage_dir)
            os.replace(tmp, stage_dir)
        else:
            stage_dir.mkdir(parents=True, exist_ok=True)
        write_json(stage_dir / "metrics.json", record.to_dict())

    def _write_state(self, pl_module: L.LightningModule, finished: bool = False) -> None:
        saved = [r.stage for r in pl_module.history if r.meets_threshold is not False
                 and (pl_module.run_dir / f"stage_{r.stage}" / "config.json").is_file()]
        write_json(pl_module.run_dir / STATE_FILE, {
            "config": pl_module.run_config(), "history": [r.to_dict() for r in pl_module.history],
            "resume_from": f"stage_{saved[-1]}" if saved else None, "finished": finished,
            "final_stage": pl_module.chosen_stage() if finished else None, "stop_reason": pl_module.stop_reason})

    @staticmethod
    def _drop_model(stage_dir: Path) -> None:
        """Remove a stage's weights but keep its metrics.json."""
        for path in stage_dir.iterdir() if stage_dir.is_dir() else ():
            if path.name != "metrics.json":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
