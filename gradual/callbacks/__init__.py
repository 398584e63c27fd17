"""Callbacks that observe the pruning loop and decide: evaluate, stop on retention, checkpoint, report.

Order matters in `trainer.callbacks`: evaluation callbacks first, then `RetentionStopping`, then `Report`;
`StageCheckpoint` always runs last (Lightning moves checkpoint callbacks to the end).
"""

from gradual.callbacks.checkpoint import StageCheckpoint
from gradual.callbacks.evaluation import LmEvalEvaluation, TaskEvaluation
from gradual.callbacks.report import Report
from gradual.callbacks.retention import RetentionStopping

__all__ = ["LmEvalEvaluation", "Report", "RetentionStopping", "StageCheckpoint", "TaskEvaluation"]
