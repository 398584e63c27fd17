"""Callbacks that observe the pruning loop: evaluate, propose a verdict (the stop rule), report, checkpoint.

The contract. Callbacks are typed with `gradual.stages.StageLoop`, what they may use of the module: they read it
freely (`history`, `record`: the current stage's `StageRecord`, `stage`, `in_data_tasks`, `stop_reason`, `model`,
`tokenizer`, `run_dir`, ...) and write to it only through `StageHistory`'s `record_scores`, `record_error`,
`record_retention`, `record_timing` and `propose`. Scores and retention are also Lightning metrics:
`score/<key>` (logged) and `retention/<key or aggregate>` (float64, in `trainer.callback_metrics`), which stop
rules read as Lightning's `EarlyStopping` reads a monitored metric.

A stage's verdict (keep it, or roll it back and stop) is decided in one place, `StageHistory.conclude`, after every
callback has run, so no callback's base class or place in the config can pre-empt another's. Lightning calls
`on_train_epoch_end` on the plain callbacks in `trainer.callbacks` order, then on the module, then on the
`EarlyStopping` and `Checkpoint` callbacks, checkpoints last; `StageCheckpoint` is the run's only checkpoint and
puts itself last, so:

0. `GradualModule` itself, while a stage trains: a non-finite loss or non-finite merged weights abandon the stage
   (`record_error("training", ...)`, `propose(False, ...)`, `trainer.should_stop`) before any callback sees it;
   `record.abandoned` then tells the callbacks to skip it (no evaluation, no verdict of the stop rule, no saved
   model).
1. `TaskEvaluation`, `LmEvalEvaluation` — `on_train_start` (stage 0, unless already scored) and
   `on_train_epoch_end`; list them first. Write `record_scores`, `record_timing`, `record_error` for a task that
   raised (with `on_error: stop`, the default, such a failure also proposes rolling the stage back and stops), and
   the stage's retention (`log_retention`: `record_retention` and the `retention/` metrics).
2. `RetentionStopping` (the stop rule, a Lightning `EarlyStopping`) — `on_train_start` (checks its monitor against
   the baseline; list it after the evaluations, which score the baseline in that hook) and `on_train_epoch_end`,
   where it reads `retention/<monitor>` and proposes keeping or rolling back the stage (on a miss it also sets
   `trainer.should_stop`, the decision reduced across ranks). Its state (`state_dict`) is saved in `state.json` with
   every stage and restored on resume, as is every stateful callback's. A user's own stop rule, of any base class,
   listed anywhere, does the same: read the metrics or records, `propose`.
3. `StageCheckpoint` — `on_fit_start` (restores the callbacks' states on resume), `on_train_start` (removes what an
   interrupted run left half-way), `on_train_epoch_end`, `on_train_end`; always present (`GradualCLI` adds it when
   the config lists none), always last. Its `on_train_epoch_end` first has the module conclude the stage
   (`conclude_stage`: the verdict from the proposals, "schedule complete" when the plan is done and the stage is
   kept), then writes the stage; `record_timing`; the run directory via `gradual.rundir` (every folder under a
   temporary name, then renamed).
4. `Report` — `on_train_epoch_start` (the stages decided so far) and `on_train_end`. Reads only (writes the report
   files), so a verdict is always there to report.

A callback that needs a stage's verdict reads it once the stage is concluded: from the next stage's
`on_train_epoch_start`, or in `on_train_end`.

`gradual compare` adds `SeedBaseline` (`on_train_start`, before the evaluations: `record_scores` of the baseline
shared by all arms), `RecordRetention` (in place of `RetentionStopping`: `record_retention`, never proposes) and
`DataLedger` (reads the batches; writes its own ledger file).

The run's identity (`gradual.identity`: a run directory is resumed only by the same run) holds each callback's
`settings()`: `TaskEvaluation`, `LmEvalEvaluation` and `RetentionStopping` define it (less their batch sizes and
progress bars); `Report`, `StageCheckpoint` and `ProgressLog` change no result and define none. A callback of your
own that changes results (a stop rule) joins the identity by defining `settings()`; an `EarlyStopping` joins it by
its monitor and thresholds.

`ProgressLog` only reads: training progress as plain lines (`gradual fit` uses it in place of Lightning's progress bar
when standard output is not a terminal).
"""

from gradual.callbacks.checkpoint import StageCheckpoint
from gradual.callbacks.evaluation import LmEvalEvaluation, TaskEvaluation
from gradual.callbacks.progress import ProgressLog
from gradual.callbacks.report import Report
from gradual.callbacks.stopping import RetentionStopping

__all__ = ["LmEvalEvaluation", "ProgressLog", "Report", "RetentionStopping", "StageCheckpoint", "TaskEvaluation"]
