"""Training progress as plain lines, for output that is not a terminal (a log file, a cluster job's output).

Lightning's progress bar redraws one line in place: written to a file it shows nothing until the stage ends (rich) or
fills the file with carriage returns (tqdm). `ProgressLog` prints a complete line instead, at the stage's first
optimizer step, then every `interval` seconds, and at its last step: stage, step, recent loss, tokens/s, time spent
and time left in the stage's training; and one line when the stage is done (its depth, loss and retention).
`gradual fit` uses it in place of the bar when standard output is not a terminal (`GradualCLI`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks.progress import ProgressBar

from gradual.callbacks.stopping import RetentionStopping
from gradual.errors import UsageError
from gradual.retention import monitor_interval, with_interval

DEFAULT_INTERVAL = 30.0
INTERVAL_ENV = "GRADUAL_PROGRESS_INTERVAL"


def default_interval() -> float:
    """`$GRADUAL_PROGRESS_INTERVAL` seconds if set (0: every step), else 30: the default line's pace can be changed
    for a cluster job without editing its config."""
    value = os.environ.get(INTERVAL_ENV, "").strip()
    if not value:
        return DEFAULT_INTERVAL
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"${INTERVAL_ENV}={value!r} is invalid; give seconds between progress lines, e.g. 30") \
            from None


def clock(seconds: float) -> str:
    """`h:mm:ss`, the form log readers expect for durations."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLog(ProgressBar):
    """Training progress as one plain line at a steady interval (rank 0 only), instead of a bar redrawn in place.

    A line, at the stage's first optimizer step, then at the first step `interval` seconds after the last line, and
    at the stage's last step::

        [12:04:31] stage 1/3 step 20/48 loss 0.4123 tokens/s 812 elapsed 0:06:10 left 0:08:39

    `loss` is the mean training loss of the optimizer steps since the previous line; `tokens/s` counts the batches'
    real tokens (their attention mask; padding excluded) over the same time (per rank under DDP, where it says
    so); `elapsed` runs from the stage's first batch, and `left` assumes the remaining steps take as long as the
    ones so far (scoring, evaluation and saving are not included). When the stage is done, one more line gives its
    depth, mean loss, wall time, the held-out and in-data generative retention and, after `RetentionStopping`, the
    monitored retention and the decision; list this callback after the stop rule for that (`gradual fit` appends it
    last when it adds it itself).

    Args:
        interval: seconds between lines (0: every optimizer step); None = `$GRADUAL_PROGRESS_INTERVAL` or 30.
    """

    def __init__(self, interval: float | None = None) -> None:
        super().__init__()
        interval = default_interval() if interval is None else interval
        if isinstance(interval, bool) or not (math.isfinite(interval) and interval >= 0):
            raise UsageError(f"ProgressLog interval={interval!r} is invalid; give seconds >= 0 (0: every step)")
        self.interval = float(interval)
        self._enabled = True
        self._stage_start = 0.0
        self._first_batch: float | None = None
        self._last_line = 0.0
        self._tokens = 0
        self._losses: list[float] = []
        self._finished: tuple[Any, float] | None = None  # (record, seconds) of a stage awaiting its line

    # ProgressBar's interface: Lightning disables the bar on ranks other than 0 and around some tuner routines
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs, flush=True)

    def _shows(self, trainer: L.Trainer) -> bool:
        return self._enabled and trainer.is_global_zero

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_finished(trainer, pl_module)
        self._stage_start = time.perf_counter()
        self._first_batch = None
        self._tokens, self._losses = 0, []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._first_batch is None:
            self._first_batch = self._last_line = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._shows(trainer):
            return
        accumulate = trainer.accumulate_grad_batches
        self._tokens += _real_tokens(batch)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):  # Lightning hands on the loss divided by the accumulation factor
            self._losses.append(float(loss.detach()) * accumulate)
        if (batch_idx + 1) % accumulate:
            return
        step, total = (batch_idx + 1) // accumulate, self._total_steps(trainer, pl_module)
        now = time.perf_counter()
        if step == 1 or step >= total or now - self._last_line >= self.interval:
            self.print(self._step_line(trainer, pl_module, step, total, now))
            self._last_line, self._tokens, self._losses = now, 0, []

    def _step_line(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, total: int,
                   now: float) -> str:
        elapsed = now - (self._first_batch or now)
        since = max(now - self._last_line, 1e-9)
        loss = f"{sum(self._losses) / len(self._losses):.4f}" if self._losses else "n/a"
        per_rank = " per rank" if trainer.world_size > 1 else ""
        left = elapsed / step * max(0, total - step)
        return (f"[{time.strftime('%H:%M:%S')}] {self._stage(trainer, pl_module)} step {step}/{total} loss {loss} "
                f"tokens/s {self._tokens / since:.0f}{per_rank} elapsed {clock(elapsed)} left {clock(left)}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The stage's line waits for its verdict, which `StageCheckpoint` concludes after every callback: it is
        printed as the next stage starts, or as training ends."""
        record = getattr(pl_module, "record", None)
        if self._shows(trainer) and record is not None:
            self._finished = (record, time.perf_counter() - self._stage_start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_finished(trainer, pl_module)

    def _print_finished(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One line for the last finished stage: what the callbacks recorded and its verdict."""
        if self._finished is None:
            return
        (record, seconds), self._finished = self._finished, None
        parts = [f"depth {record.depth}"]
        if record.removed:
            parts.append(f"removed original layer{'s' if len(record.removed) > 1 else ''} "
                         f"{', '.join(map(str, record.removed))}")
        if record.loss is not None:
            parts.append(f"loss {record.loss:.4f}")
        if record.abandoned:
            parts.append(f"abandoned: {record.errors.get('training')}")
        for group, label in (("held_out", "held-out"), ("near_held_out", "near held-out"),
                             ("far_held_out", "far held-out"), ("in_data", "in-data")):  # as the bar shows them
            if record.retention.get(f"{group}_generative_mean") is not None:
                parts.append(f"{label} gen. retention {record.retention[f'{group}_generative_mean']:.3f}")
        rule = next((cb for cb in trainer.callbacks if isinstance(cb, RetentionStopping)), None)
        value = record.retention.get(rule.key) if rule is not None else None
        if value is not None:
            verdict = {True: "kept", False: "rolled back"}.get(record.meets_threshold, "undecided")
            shown = with_interval(value, monitor_interval(record.intervals, rule.key), digits=3)
            parts.append(f"{rule.key} retention {shown} (threshold {rule.threshold}: {verdict})")
        plan = getattr(pl_module, "plan", None)
        stage = f"stage {record.stage}/{len(plan)}" if plan is not None else f"epoch {record.stage}"
        self.print(f"[{time.strftime('%H:%M:%S')}] {stage} done in {clock(seconds)}: {', '.join(parts)}")

    @staticmethod
    def _stage(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """`stage k/n`: the pruning stage of a `GradualModule` (stage 0 is the unpruned model), else the epoch."""
        record, plan = getattr(pl_module, "record", None), getattr(pl_module, "plan", None)
        if record is not None and plan is not None:
            return f"stage {record.stage}/{len(plan)}"
        return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    @staticmethod
    def _total_steps(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """The stage's optimizer steps: its record's, else what the epoch's batches allow."""
        record = getattr(pl_module, "record", None)
        if record is not None and getattr(record, "steps", 0):
            return int(record.steps)
        batches = trainer.num_training_batches
        return max(1, int(batches) // trainer.accumulate_grad_batches) if math.isfinite(batches) else 0


def _real_tokens(batch: Any) -> int:
    """Tokens of a batch that are not padding: its attention mask's sum (all its input ids without one)."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return ids.numel()
    return 0


def stdout_is_terminal() -> bool:
    """Whether standard output (where progress is shown) is a terminal; False for a file, a pipe or a closed stream."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False
