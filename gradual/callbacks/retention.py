"""Stop when retention falls below the user's threshold, and roll back to the last stage that met it."""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

from gradual.errors import UsageError
from gradual.retention import AGGREGATES, DEFAULT_MONITOR, group_of, is_in_data_monitor, retention


class RetentionStopping(Callback):
    """The stop rule: each stage's retention against the baseline; stop below `threshold` and roll back.

    Reads the scores the evaluation callbacks listed before it recorded, then records through the module's
    `record_retention` and `decide` (which names the stage rolled back to) and stops the trainer on a miss.

    Args:
        threshold: the retention the final model must keep, in (0, 1] (0.9 keeps 90% of the baseline score).
        monitor: `held_out_generative_mean` (default: tasks none of whose problems fed recovery — retention there
            shows capability coming back, not being taught), `held_out_classification_mean`,
            `in_data_generative_mean`, `in_data_classification_mean`, `generative_mean`, `classification_mean`
            (all tasks), `min`, or one score key (e.g. `chain_sum`). A monitor computed only from in-data tasks is
            allowed and named as such in the stop message and the report.
    """

    def __init__(self, threshold: float = 0.9, monitor: str = DEFAULT_MONITOR) -> None:
        if not 0 < threshold <= 1:
            raise UsageError(f"retention threshold={threshold} is invalid; allowed: 0 < threshold <= 1")
        self.threshold, self.monitor = threshold, monitor

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
        aggregate = re.fullmatch(r"(?:(held_out|in_data)_)?(generative|classification)_mean", self.monitor)
        if aggregate:
            group, form = aggregate.groups()
            if any(f in (form, None) and (group is None or group_of(k, in_data) == group) for k, f in forms.items()):
                return
            which = f"{group.replace('_', '-')} {form}" if group else form
            raise UsageError(f"retention monitor={self.monitor!r} needs a {which} score, but the evaluation callbacks "
                             f"fill only: {_labelled(forms, in_data)}")
        if self.monitor in AGGREGATES or self.monitor in forms:
            return
        if any(f is None and self.monitor.startswith(k) for k, f in forms.items()):
            return  # an lm-eval group's sub-task
        raise UsageError(f"retention monitor={self.monitor!r} is not a score; allowed: "
                         f"{', '.join(AGGREGATES + tuple(forms))}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a monitor that cannot be computed before any layer is removed."""
        baseline = pl_module.history[0].scores
        if not baseline:
            raise UsageError("RetentionStopping found no baseline scores; list an evaluation callback before it")
        in_data = getattr(pl_module, "in_data_tasks", ())
        if self.monitor in AGGREGATES:
            if self.monitor not in retention(baseline, baseline, in_data):
                raise UsageError(f"retention monitor={self.monitor!r} has no task with a non-zero baseline score")
            return
        errors = pl_module.history[0].errors
        if self.monitor not in baseline and self.monitor in errors:
            raise RuntimeError(f"retention monitor {self.monitor!r} could not be evaluated on the baseline: "
                               f"{errors[self.monitor]}")
        if self.monitor not in baseline:
            raise UsageError(f"retention monitor={self.monitor!r} is not a score; allowed: "
                             f"{', '.join(AGGREGATES + tuple(baseline))}")
        if baseline[self.monitor]["score"] <= 0:
            raise UsageError(f"retention monitor={self.monitor!r} has a zero baseline score, so retention is "
                             "undefined; monitor another task or an aggregate")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the stage's retention and decide. A stage already decided before this rule ran (abandoned on a
        non-finite loss, or stopped by an evaluation that failed with `on_error: stop`) keeps that decision; a
        monitor whose evaluation failed this stage (`on_error: skip`) cannot show retention, so the stage is
        rolled back rather than judged on the other scores."""
        record = pl_module.record
        in_data = getattr(pl_module, "in_data_tasks", ())
        values = retention(record.scores, pl_module.history[0].scores, in_data)
        pl_module.record_retention(values)
        if record.meets_threshold is not None:
            trainer.should_stop = trainer.should_stop or record.meets_threshold is False
            return
        value = values.get(self.monitor)
        if value is None:
            failed = [self.monitor] if self.monitor in record.errors else \
                [k for k in record.errors if self.monitor in AGGREGATES]
            if not failed:
                raise RuntimeError(f"retention monitor {self.monitor!r} has no value at stage {record.stage} (its "
                                   "score is missing or its baseline is 0); scores present: "
                                   f"{', '.join(record.scores) or 'none'}")
            pl_module.decide(False, f"stage {record.stage}: retention monitor {self.monitor} has no value (evaluation "
                                    f"of {', '.join(failed)} failed: {record.errors[failed[0]]})")
            trainer.should_stop = True
            return
        pl_module.log("retention", value, prog_bar=True, on_epoch=True)
        for group in ("held_out", "in_data"):  # both on the progress bar: only held-out shows capability returning
            if values.get(f"{group}_generative_mean") is not None:
                pl_module.log(f"{group}_gen", values[f"{group}_generative_mean"], prog_bar=True, on_epoch=True)
        if value >= self.threshold:
            pl_module.decide(True)
            return
        named = " (in-data: measured on tasks the recovery data taught)" if is_in_data_monitor(
            self.monitor, in_data) else ""
        pl_module.decide(False, f"stage {record.stage}: {self.monitor}{named} retention {value:.3f} < threshold "
                                f"{self.threshold}")
        trainer.should_stop = True


def _labelled(forms: dict[str, str | None], in_data: Collection[str]) -> str:
    return ", ".join(f"{k} ({group_of(k, in_data).replace('_', '-')})" for k in forms)
