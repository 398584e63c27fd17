"""Evaluation callbacks: score the live model at stage 0 (baseline) and after every stage's merge."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from gradual.callbacks.stopping import log_retention
from gradual.errors import UsageError
from gradual.stages import StageLoop
from gradual.tasks import FORMS, TASKS, check_task_settings, evaluate
from gradual.tasks.lm_eval_bridge import evaluate_lm_eval

log = logging.getLogger(__name__)


ON_ERROR = ("stop", "skip")


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise UsageError(f"on_error={on_error!r} is unknown; allowed: {', '.join(ON_ERROR)}")
    return on_error


def error_line(exc: BaseException) -> str:
    """An exception as one short line for records and reports (the traceback goes to the log)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class _Evaluation(Callback):
    """Records the current model's scores, `{key: {"score", "form", "n", "failures", "truncated"}}`, through
    `record_scores` (and its time through `record_timing`): the baseline at train start (unless stage 0 is already
    scored: a resumed run, or `SeedBaseline`), every stage after its merge. After a stage's scores it records their
    retention and puts it into `trainer.callback_metrics` (`log_retention`: `retention/<name>`), and logs each score
    as `score/<key>`. List evaluations before the callbacks that read scores (`RetentionStopping`). A stage
    abandoned on a non-finite loss is not evaluated.

    A task whose evaluation raises is reported through `record_error` (its score keys, with the error; the
    traceback goes to the log) and the other tasks' scores are kept. Then `on_error` decides: `stop` (the
    default) proposes rolling the stage back and ends the run with a complete report (on the baseline, where
    nothing can be rolled back, the run fails before pruning); `skip` continues without that score, its retention
    undefined for the stage (the means cover the tasks that were scored; a stop rule monitoring that very key rolls
    back).
    `stop` is the default because an incomplete measurement is weaker evidence than the stop rule was set up
    with: a stage is kept only when everything asked for was measured. A bad task name or setting (a UsageError)
    always fails.

    Rank 0 evaluates and broadcasts, so every DDP rank takes the same stop decision.
    """

    name = "evaluation"

    def __init__(self, on_error: str = "stop") -> None:
        self.on_error = check_on_error(on_error)

    def units(self) -> list[str]:
        """What is evaluated, one independently failing unit (a task) at a time."""
        raise NotImplementedError

    def unit_keys(self, unit: str) -> list[str]:
        """The score keys a unit fills (where its failure is recorded)."""
        raise NotImplementedError

    def results(self, pl_module: StageLoop, units: list[str] | None = None) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def measure(self, pl_module: StageLoop) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Scores of every unit, and the error of each score key whose unit raised. All units are evaluated in
        one call; when it raises, each unit is evaluated on its own, so one broken task costs only its own keys."""
        units = self.units()
        try:
            return self.results(pl_module, units), {}
        except UsageError:
            raise
        except Exception as exc:
            if len(units) == 1:
                log.warning("%s evaluation of %s failed", self.name, units[0], exc_info=True)
                return {}, dict.fromkeys(self.unit_keys(units[0]), error_line(exc))
        scores: dict[str, dict[str, Any]] = {}
        errors: dict[str, str] = {}
        for unit in units:
            try:
                scores.update(self.results(pl_module, [unit]))
            except UsageError:
                raise
            except Exception as exc:
                log.warning("%s evaluation of %s failed", self.name, unit, exc_info=True)
                errors.update(dict.fromkeys(self.unit_keys(unit), error_line(exc)))
        return scores, errors

    def _fill(self, trainer: L.Trainer, pl_module: StageLoop, baseline: bool = False) -> None:
        t = time.perf_counter()
        measured = self.measure(pl_module) if trainer.is_global_zero else None
        results, errors = trainer.strategy.broadcast(measured, src=0)
        pl_module.record_scores(results)
        for key, message in errors.items():
            pl_module.record_error(key, message)
        pl_module.record_timing(f"{self.name}_s", time.perf_counter() - t)
        if not baseline:
            log_retention(trainer, pl_module)
            for key, value in results.items():
                pl_module.log(f"score/{key}", float(value["score"]), on_epoch=True)
        if not errors:
            return
        what = f"{self.name} evaluation of {', '.join(errors)} failed ({next(iter(errors.values()))})"
        if self.on_error == "skip":
            log.warning("%s at stage %d; continuing without it (on_error: skip)", what, pl_module.record.stage)
        elif baseline:
            raise RuntimeError(f"{what} on the baseline (stage 0), before any layer was removed; fix the task, or "
                               "set on_error: skip to run without it")
        else:
            pl_module.propose(False, f"stage {pl_module.record.stage}: {what} (on_error: stop)")
            trainer.should_stop = True

    def on_train_start(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        """Score the baseline, unless stage 0 already is (a resumed run, or `SeedBaseline`): only while stage 0 is
        the current stage, since a resumed run holds the last stage's model, not the baseline."""
        baseline = pl_module.history[0]
        if pl_module.record is baseline and not set(self.keys()) <= set(baseline.scores):
            self._fill(trainer, pl_module, baseline=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: StageLoop) -> None:
        if not pl_module.record.abandoned:
            self._fill(trainer, pl_module)

    def keys(self) -> list[str]:
        return [k for unit in self.units() for k in self.unit_keys(unit)]

    def key_forms(self) -> dict[str, str | None]:
        """The score keys this callback will fill, with their form (`generative`/`classification`; None: known only
        after the first evaluation). Lets `RetentionStopping` check its monitor before any heavy work."""
        raise NotImplementedError


class TaskEvaluation(_Evaluation):
    """Built-in offline tasks in both forms: generative (exact match) and classification (log-likelihood choice).

    Args:
        tasks: built-in task names (see `gradual tasks`); `mc_<task>` keys hold the classification form.
        n: problems per task (the same problems for both forms and at every stage; a task with fewer distinct
            problems scores each once). Default 400: measured on SmolLM2 at 64 problems, a held-out group mean of
            three tasks (baselines 0.19-0.38) had a 95% interval of ±0.09-0.12, so ±0.05 needs ~300-400 (the width
            falls as 1/√n); on a CPU a 135M model evaluates ~0.26 s per problem and task (both forms, one thread),
            so CPU configs choose fewer and say how wide their intervals are.
        forms: which forms to score: `generative`, `classification`.
        fmt: prompt format, `fewshot` (5 worked examples) or `chat` (the model's chat template, 0-shot).
        batch_size: generation / scoring batch size.
        max_new_tokens: generation budget per answer (None: each task's own budget).
        seed: problem seed (the evaluation split).
        difficulty: problem sizes, `small` (one-digit arithmetic, short lists: sized for ~100M models) or `large`
            (multi-digit arithmetic, long lists and bracket sequences: sized for 7-8B models, which score near 100%
            on `small`). Recovery prompts from the tasks (`data.sgr.difficulty`) should use the same.
        enable_code: allow `humaneval` (needs `pip install gradual[code]`): model-written code then runs in a
            sandboxed subprocess with time and memory limits. Off by default.
        progress: progress bars per task and form (off for batch jobs whose logs should stay readable).
        on_error: a task whose evaluation raises is reported (`errors` in the stage's record, the report) and its
            other scores are kept; then `stop` (default) rolls the stage back and ends the run, `skip` continues
            without that task's score for the stage.
    """

    name = "tasks"

    def __init__(self, tasks: list[str], n: int = 400, forms: list[str] | None = None, fmt: str = "fewshot",
                 batch_size: int = 32, max_new_tokens: int | None = None, seed: int = 0,
                 enable_code: bool = False, progress: bool = True, difficulty: str = "small",
                 on_error: str = "stop") -> None:
        super().__init__(on_error)
        # -- settings checks (the task settings in one place: gradual.tasks.check_task_settings) --
        if not tasks:
            raise UsageError("TaskEvaluation.tasks is empty; name at least one built-in task (see `gradual tasks`)")
        self.forms = list(FORMS if forms is None else forms)
        check_task_settings(tasks, self.forms, fmt, enable_code, difficulty)
        if n < 1:
            raise UsageError(f"n={n} is invalid; it must be >= 1")
        if batch_size < 1:
            raise UsageError(f"TaskEvaluation batch_size={batch_size} is invalid; it must be >= 1")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise UsageError(f"TaskEvaluation max_new_tokens={max_new_tokens} is invalid; it must be >= 1 or null "
                             "(each task's own budget)")
        # -- end of settings checks --
        self.difficulty = difficulty
        self.tasks, self.n, self.fmt = list(tasks), n, fmt
        self.batch_size, self.max_new_tokens, self.seed = batch_size, max_new_tokens, seed
        self.enable_code, self.progress = enable_code, progress

    def settings(self) -> dict[str, Any]:
        """What decides the scores (`gradual.identity.HasSettings`: part of the run's identity); not `batch_size` or
        `progress`."""
        return {"tasks": list(self.tasks), "n": self.n, "forms": list(self.forms), "fmt": self.fmt,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "enable_code": self.enable_code,
                "difficulty": self.difficulty, "on_error": self.on_error}

    def units(self) -> list[str]:
        return list(self.tasks)

    def unit_keys(self, unit: str) -> list[str]:
        keys = []
        if "generative" in self.forms:
            keys.append(unit)
        if "classification" in self.forms and unit in TASKS and TASKS[unit].has_classification:
            keys.append(f"mc_{unit}")
        return keys

    def key_forms(self) -> dict[str, str | None]:
        return {k: "classification" if k.startswith("mc_") else "generative" for k in self.keys()}

    def results(self, pl_module: StageLoop, units: list[str] | None = None) -> dict[str, dict[str, Any]]:
        out = evaluate(pl_module.model, pl_module.tokenizer, self.tasks if units is None else units, n=self.n,
                       forms=tuple(self.forms), fmt=self.fmt, batch_size=self.batch_size,
                       max_new_tokens=self.max_new_tokens, seed=self.seed, enable_code=self.enable_code,
                       progress=self.progress, difficulty=self.difficulty)
        return {key: r.stage_score() for key, r in out.items()}


class LmEvalEvaluation(_Evaluation):
    """Any lm-eval task (stock name or a local YAML task directory) on the live model through lm-eval's HFLM.

    Args:
        tasks: lm-eval task names.
        include_path: a directory of local YAML tasks (offline with `dataset_path: json`).
        limit: items per task (None: all).
        num_fewshot: few-shot examples (None: the task's default).
        batch_size: lm-eval batch size.
        on_error: a task that raises (a broken metric, a dataset that went missing) is reported (`errors` in the
            stage's record, the report) and the other tasks' scores are kept; then `stop` (default) rolls the stage
            back and ends the run, `skip` continues without that task's score for the stage.
    """

    name = "lm_eval"

    def __init__(self, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                 num_fewshot: int | None = None, batch_size: int = 16, on_error: str = "stop") -> None:
        super().__init__(on_error)
        # -- settings checks (the task names and include_path: `check_lm_eval_tasks`, run by `gradual fit`) --
        if not tasks:
            raise UsageError("LmEvalEvaluation.tasks is empty; name at least one lm-eval task")
        if batch_size < 1:
            raise UsageError(f"LmEvalEvaluation batch_size={batch_size} is invalid; it must be >= 1")
        if limit is not None and limit < 1:
            raise UsageError(f"LmEvalEvaluation limit={limit} is invalid; it must be >= 1 or null")
        if num_fewshot is not None and num_fewshot < 0:
            raise UsageError(f"LmEvalEvaluation num_fewshot={num_fewshot} is invalid; it must be >= 0 or null")
        # -- end of settings checks --
        self.tasks, self.include_path, self.limit = list(tasks), include_path, limit
        self.num_fewshot, self.batch_size = num_fewshot, batch_size
        self._keys: list[str] | None = None

    def settings(self) -> dict[str, Any]:
        """What decides the scores (`gradual.identity.HasSettings`: part of the run's identity); not `batch_size`."""
        return {"tasks": list(self.tasks), "include_path": self.include_path, "limit": self.limit,
                "num_fewshot": self.num_fewshot, "on_error": self.on_error}

    def units(self) -> list[str]:
        return list(self.tasks)

    def unit_keys(self, unit: str) -> list[str]:
        return [f"lm_eval/{unit}"]

    def keys(self) -> list[str]:
        """`lm_eval/<task>` per task; once evaluated, the keys lm-eval reported (a group adds its sub-tasks)."""
        return self._keys or super().keys()

    def key_forms(self) -> dict[str, str | None]:
        return dict.fromkeys(self.keys())

    def results(self, pl_module: StageLoop, units: list[str] | None = None) -> dict[str, dict[str, Any]]:
        out = evaluate_lm_eval(pl_module.model, pl_module.tokenizer, self.tasks if units is None else units,
                               limit=self.limit, num_fewshot=self.num_fewshot, include_path=self.include_path,
                               batch_size=self.batch_size)
        return {f"lm_eval/{key}": r.stage_score() for key, r in out.items()}

    def measure(self, pl_module: StageLoop) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        scores, errors = super().measure(pl_module)
        if self._keys is None:
            self._keys = list(scores) + [k for k in errors if k not in scores]
        return scores, errors
