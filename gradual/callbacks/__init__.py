"""Callbacks that observe the pruning loop and decide: evaluate, stop on retention, report, checkpoint.

The contract. Callbacks read the module freely (`history`, `record`: the current stage's `StageRecord`,
`in_data_tasks`, `stop_reason`, `model`, `tokenizer`, `run_dir`) and write to it only through
`gradual.stages.StageHistory`'s methods: `record_scores`, `record_error`, `record_retention`, `record_timing` and
`decide`. Which hook each uses, in Lightning's order (callbacks in `trainer.callbacks` order, then the module's own
hook; checkpoint callbacks after the module's `on_train_epoch_end`):

0. `GradualModule` itself, while a stage trains: a non-finite loss or non-finite merged weights abandon the stage
   (`record_error("training", ...)`, `decide(False, ...)`, `trainer.should_stop`) before any callback sees it;
   `record.abandoned` then tells the callbacks to skip it (no evaluation, no saved model).
1. `TaskEvaluation`, `LmEvalEvaluation` — `on_train_start` (stage 0, unless already scored) and
   `on_train_epoch_end`; list them first. Write `record_scores`, `record_timing`, and `record_error` for a task
   that raised; with `on_error: stop` (the default) such a failure also `decide`s the stage failed and stops.
2. `RetentionStopping` (the stop rule) — `on_train_start` (checks its monitor against the baseline) and
   `on_train_epoch_end`; after the evaluations. Writes `record_retention`, and `decide` unless the stage is
   already decided; on a miss it also sets `trainer.should_stop`.
3. `Report` — `on_train_epoch_end`, `on_train_end`; after the stop rule. Reads only (writes the report files).
4. `GradualModule.on_train_epoch_end` — stops with "schedule complete" when the plan is done.
5. `StageCheckpoint` — `on_train_start` (removes what an interrupted run left half-way), `on_train_epoch_end`,
   `on_train_end`; always last (Lightning moves checkpoint callbacks after the module's hook). Writes
   `record_timing`; the run directory via `gradual.rundir` (every folder under a temporary name, then renamed).

`gradual compare` adds `SeedBaseline` (`on_train_start`, before the evaluations: `record_scores` of the baseline
shared by all arms), `RecordRetention` (in place of `RetentionStopping`: `record_retention`, never stops) and
`DataLedger` (reads the batches; writes its own ledger file).

`ProgressLog` only reads: training progress as plain lines (`gradual fit` uses it in place of Lightning's progress bar
when standard output is not a terminal).
"""

from gradual.callbacks.checkpoint import StageCheckpoint
from gradual.callbacks.evaluation import LmEvalEvaluation, TaskEvaluation
from gradual.callbacks.progress import ProgressLog
from gradual.callbacks.report import Report
from gradual.callbacks.retention import RetentionStopping

__all__ = ["LmEvalEvaluation", "ProgressLog", "Report", "RetentionStopping", "StageCheckpoint", "TaskEvaluation"]
