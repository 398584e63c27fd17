"""Retention as Lightning metrics, and the stop rule that reads them: stop when retention falls below the user's
threshold, and roll back to the last stage that met it."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from gradual.errors import UsageError
from gradual.retention import (
    AGGREGATES,
    DEFAULT_MONITOR,
    FORMS,
    GROUP_TEXT,
    GROUPS,
    METRIC,
    in_group,
    intervals,
    is_in_data_monitor,
    label_text,
    monitor_interval,
    retention,
    with_interval,
)
from gradual.stages import StageLoop


def log_retention(trainer: L.Trainer, stages: StageLoop) -> None:
    """Record the current stage's retention against stage 0 (`record_retention`) and put it into
    `trainer.callback_metrics` as `retention/<name>`, where stop rules read it as Lightning's `EarlyStopping` reads
    a monitored metric. The evaluations call it after recording their scores.

    Written into `callback_metrics` directly rather than through `log`: stop rules compare the exact float64 value
    (`log` accumulates in float32, which can move a retention equal to the threshold to either side of it); every
    rank writes the same values (the scores were broadcast from rank 0), so nothing needs syncing; and every name
    (the aggregates and each baseline key) is written, NaN where retention is undefined, so a monitor always has
    this stage's value (the module clears them as a stage starts: none is left over from an earlier stage).
    """
    baseline = stages.history[0].scores
    values = retention(stages.record.scores, baseline, stages.in_data_tasks)
    stages.record_retention(values, intervals(stages.record.scores, baseline, stages.in_data_tasks))
    metrics = trainer.callback_metrics
    for name in dict.fromkeys([*AGGREGATES, *baseline, *values]):
        value = values.get(name)
        metrics[f"{METRIC}{name}"] = torch.tensor(math.nan if value is None else value, dtype=torch.float64)


class RetentionStopping(EarlyStopping):
    """The stop rule: Lightning's `EarlyStopping` on `retention/<monitor>`, each stage's retention against the
    baseline, which stops below `threshold` and has the stage rolled back.

    Reads the metric the evaluation callbacks logged (`log_retention`), takes the stop decision identically on
    every rank (`reduce_boolean_decision`), stops the trainer on a miss and proposes the verdict through the
    module's `propose`; the module decides it once every callback has run. Its state (`state_dict`: the retention
    it judged per stage, where it stopped and why) is saved with each stage and restored on resume.

    Args:
        threshold: the retention the final model must keep, in (0, 1] (0.9 keeps 90% of the baseline score).
        monitor: `held_out_generative_mean` (default: tasks none of whose problems fed recovery — retention there
            shows capability coming back, not being taught), `held_out_classification_mean`,
            `near_held_out_<form>_mean` (held-out tasks of a family recovery drew from), `far_held_out_<form>_mean`
            (of families it did not), `in_data_generative_mean`, `in_data_classification_mean`, `generative_mean`,
            `classification_mean` (all tasks), any `_worst` in place of `_mean`, `min`, or one score key (e.g.
            `chain_sum`). A monitor computed only from in-data tasks is allowed and named as such in the stop
            message and the report.
    """

    def __init__(self, threshold: float = 0.9, monitor: str = DEFAULT_MONITOR) -> None:
        if not 0 < threshold <= 1:
            raise UsageError(f"retention threshold={threshold} is invalid; allowed: 0 < threshold <= 1")
        super().__init__(monitor=f"{METRIC}{monitor}", mode="max", divergence_threshold=threshold,
                         check_on_train_epoch_end=True)
        self.threshold, self.key = threshold, monitor
        self.judged: dict[int, float | None] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, threshold=self.threshold)

    def settings(self) -> dict[str, Any]:
        """The rule (`gradual.identity.HasSettings`: part of the run's identity, so a run is not resumed under
        another threshold or monitor). A subclass with settings of its own adds them here."""
        return {"threshold": self.threshold, "monitor": self.key}

    def state_dict(self) -> dict[str, Any]:
        """The retention judged per stage (None: undefined), and the epoch and reason of a stop (JSON values)."""
        return {"judged": [[stage, value] for stage, value in sorted(self.judged.items())],
                "stopped_epoch": self.stopped_epoch, "stopping_reason": self.stopping_reason.value,
                "stopping_reason_message": self.stopping_reason_message}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.judged = {int(stage): value for stage, value in state_dict["judged"]}
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.stopping_reason = EarlyStoppingReason(state_dict["stopping_reason"])
        self.stopping_reason_message = state_dict["stopping_reason_message"]

    def check_callbacks(self, callbacks: Sequence[Callback], in_data: Collection[str] = ()) -> None:
        """Refuse a monitor that no evaluation callback listed before this one can fill, before any heavy work.

        Called by `GradualCLI` once the callbacks and the data module exist (before recovery data are generated or
        a model loads); `in_data` names the tasks whose problems feed recovery. lm-eval groups fill sub-task keys
        known only after they ran: `lm_eval/<task>...` is accepted for a listed `<task>`. Raises UsageError naming
        the monitor and the allowed values.
        """
        before = list(callbacks)[:list(callbacks).index(self)] if self in callbacks else list(callbacks)
        forms: dict[str, str | None] = {}
        for cb in before:
            if hasattr(cb, "key_forms"):
                forms.update(cb.key_forms())
        if not forms:
            raise UsageError("RetentionStopping has no evaluation callback before it to read scores from; list "
                             "TaskEvaluation or LmEvalEvaluation first")
        aggregate = re.fullmatch(rf"(?:({'|'.join(GROUPS)})_)?({'|'.join(FORMS)})_(?:mean|worst)", self.key)
        if aggregate:
            group, form = aggregate.groups()
            if any(f in (form, None) and (group is None or in_group(k, group, in_data)) for k, f in forms.items()):
                return
            which = f"{GROUP_TEXT[group]} {form}" if group else form
            raise UsageError(f"retention monitor={self.key!r} needs a {which} score, but the evaluation callbacks "
                             f"fill only: {_labelled(forms, in_data)}")
        if self.key in AGGREGATES or self.key in forms:
            return
        if any(f is None and self.key.startswith(k) for k, f in forms.items()):
            return  # an lm-eval group's sub-task
        raise UsageError(f"retention monitor={self.key!r} is not a score; allowed: "
                         f"{', '.join(AGGREGATES + tuple(forms))}")

    def on_train_start(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        """Refuse a monitor that cannot be computed before any layer is removed."""
        baseline = pl_module.history[0].scores
        if not baseline:
            raise UsageError("RetentionStopping found no baseline scores; list an evaluation callback before it")
        in_data = pl_module.in_data_tasks
        if self.key in AGGREGATES:
            if self.key not in retention(baseline, baseline, in_data):
                raise UsageError(f"retention monitor={self.key!r} has no task with a non-zero baseline score")
            return
        errors = pl_module.history[0].errors
        if self.key not in baseline and self.key in errors:
            raise RuntimeError(f"retention monitor {self.key!r} could not be evaluated on the baseline: "
                               f"{errors[self.key]}")
        if self.key not in baseline:
            raise UsageError(f"retention monitor={self.key!r} is not a score; allowed: "
                             f"{', '.join(AGGREGATES + tuple(baseline))}")
        if baseline[self.key]["score"] <= 0:
            raise UsageError(f"retention monitor={self.key!r} has a zero baseline score, so retention is "
                             "undefined; monitor another task or an aggregate")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        """Judge the stage on `retention/<monitor>` and propose keeping it or rolling it back. A stage another
        callback already proposed to roll back (abandoned on a non-finite loss, or an evaluation that failed with
        `on_error: stop`) is not judged; a monitor whose evaluation failed this stage (`on_error: skip`) cannot
        show retention, so the stage is rolled back rather than judged on the other scores."""
        if pl_module.proposed() is False:
            return
        record = pl_module.record
        value = float(trainer.callback_metrics.get(self.monitor, torch.tensor(math.nan)))
        reason = None
        if math.isnan(value):
            failed = [self.key] if self.key in record.errors else [k for k in record.errors if self.key in AGGREGATES]
            if not failed:
                raise RuntimeError(f"retention monitor {self.key!r} has no value at stage {record.stage} (its "
                                   "score is missing or its baseline is 0); scores present: "
                                   f"{', '.join(record.scores) or 'none'}")
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
            reason = (f"stage {record.stage}: retention monitor {self.key} has no value (evaluation of "
                      f"{', '.join(failed)} failed: {record.errors[failed[0]]})")
        else:
            self._log_progress(trainer, pl_module, value)
            if value < self.threshold:
                named = " (in-data: measured on tasks the recovery data taught)" if is_in_data_monitor(
                    self.key, pl_module.in_data_tasks) else ""
                self.stopping_reason = EarlyStoppingReason.DIVERGENCE_THRESHOLD
                shown = with_interval(value, monitor_interval(record.intervals, self.key), digits=3)
                reason = f"stage {record.stage}: {self.key}{named} retention {shown} < threshold {self.threshold}"
        self.judged[record.stage] = None if math.isnan(value) else value
        stop = trainer.strategy.reduce_boolean_decision(reason is not None, all=False)
        if not stop:
            pl_module.propose(True)
            return
        self.stopped_epoch, self.stopping_reason_message = trainer.current_epoch, reason
        pl_module.propose(False, reason or f"stage {record.stage}: {self.key} missed the threshold on another rank")
        trainer.should_stop = True

    @staticmethod
    def _log_progress(trainer: L.Trainer, pl_module: StageLoop, value: float) -> None:
        """The monitored retention on the progress bar, with the group means: only held-out retention shows
        capability returning, near held-out (a family recovery drew from) apart from far."""
        pl_module.log("retention", value, prog_bar=True, on_epoch=True)
        for group in GROUPS:
            mean = float(trainer.callback_metrics.get(f"{METRIC}{group}_generative_mean", torch.tensor(math.nan)))
            if not math.isnan(mean):
                pl_module.log(f"{group}_gen", mean, prog_bar=True, on_epoch=True)


def _labelled(forms: dict[str, str | None], in_data: Collection[str]) -> str:
    return ", ".join(f"{k} ({label_text(k, in_data)})" for k in forms)
