"""Callbacks a `gradual compare` arm adds to its `gradual fit` run: shared baseline, retention without stopping,
and a ledger of the training prompts each stage saw (to check that arms trained on the same data).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from gradual.errors import UsageError
from gradual.retention import retention
from gradual.stages import StageLoop
from gradual.training_examples import IGNORE_INDEX

LEDGER_FILE = "ledger.json"


class SeedBaseline(Callback):
    """Give stage 0 the scores of a baseline evaluated once for all arms, so no arm re-evaluates the unpruned model.

    Must come before the evaluation callbacks: they skip the baseline when its keys are already scored.

    Args:
        path: a JSON file with `{"scores": {key: {"score", "form", "n", "failures"}}}` (written by `gradual compare`).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def settings(self) -> dict[str, Any]:
        """The baseline's file (`gradual.identity.HasSettings`: part of the run's identity)."""
        return {"path": str(self.path)}

    def on_train_start(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        if pl_module.history[0].scores:
            return
        if not self.path.is_file():
            raise UsageError(f"SeedBaseline path={str(self.path)!r} does not exist; run `gradual compare` to write it")
        pl_module.record_scores(copy.deepcopy(json.loads(self.path.read_text())["scores"]))


class RecordRetention(Callback):
    """Retention without a stop rule: every arm must reach its target depth, so nothing proposes a verdict. Stands
    where `RetentionStopping` stands in a `gradual fit` config (an arm's config names it, and so does the identity
    of its run directory). The evaluations already record each stage's retention and intervals (`log_retention`);
    this records the same values again and keeps those intervals (recording retention alone would clear them)."""

    def settings(self) -> dict[str, Any]:
        """None to record; listed in the run's identity all the same (`gradual.identity.HasSettings`): a run
        without a stop rule is another run than one with it."""
        return {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        pl_module.record_retention(retention(pl_module.record.scores, pl_module.history[0].scores,
                                             pl_module.in_data_tasks), pl_module.record.intervals)


def prompt_digest(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> str:
    """A short hash of one example's prompt tokens (the positions whose loss is masked)."""
    ids = input_ids[(labels == IGNORE_INDEX) & (attention_mask == 1)]
    return hashlib.sha1(ids.cpu().numpy().astype(np.int64).tobytes()).hexdigest()[:16]


class DataLedger(Callback):
    """Record the prompt of every training example per stage in `<run_dir>/ledger.json`.

    Two arms saw the same data when the multisets of their prompt digests match; responses differ by design
    (dataset answers vs self-generated ones). A resumed run redoes the interrupted stage and overwrites its entry.
    Under DDP the ledger holds rank 0's share of every step.
    """

    def __init__(self) -> None:
        self._current: list[str] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        self._current = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: StageLoop, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        rows = zip(batch["input_ids"], batch["labels"], mask, strict=True)
        self._current.extend(prompt_digest(ids, labels, m) for ids, labels, m in rows)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        if not trainer.is_global_zero:
            return
        path = pl_module.run_dir / LEDGER_FILE
        ledger = json.loads(path.read_text()) if path.is_file() else {}
        ledger[str(pl_module.history[-1].stage)] = self._current
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ledger))


def read_ledger(run_dir: Path) -> dict[int, list[str]]:
    """Stage → prompt digests of a run (empty when it trained nothing)."""
    path = Path(run_dir) / LEDGER_FILE
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def data_digest(digests: list[str]) -> str:
    """One hash of a multiset of prompts: equal for two arms that trained on the same examples in any order."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16] if digests else "-"
