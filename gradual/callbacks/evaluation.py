"""Evaluation callbacks: score the live model at stage 0 (baseline) and after every stage's merge."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from gradual.errors import UsageError
from gradual.tasks import CODE_TASKS, TASKS, evaluate
from gradual.tasks.builtin import check_difficulty
from gradual.tasks.lm_eval_bridge import evaluate_lm_eval


class _Evaluation(Callback):
    """Records the current model's scores, `{key: {"score", "form", "n", "failures", "truncated"}}`, through
    `record_scores` (and its time through `record_timing`): the baseline at train start (unless stage 0 is already
    scored: a resumed run, or `SeedBaseline`), every stage after its merge. List evaluations before the callbacks
    that read scores (`RetentionStopping`, `Report`).

    Rank 0 evaluates and broadcasts, so every DDP rank takes the same stop decision.
    """

    name = "evaluation"

    def results(self, pl_module: L.LightningModule) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def _fill(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> None:
        t = time.perf_counter()
        results = self.results(pl_module) if trainer.is_global_zero else None
        results = trainer.strategy.broadcast(results, src=0)
        pl_module.record_scores(results)
        pl_module.record_timing(f"{self.name}_s", time.perf_counter() - t)
        for key, value in results.items() if log else ():
            pl_module.log(f"score/{key}", float(value["score"]), on_epoch=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        baseline = pl_module.history[0]
        if not set(self.keys()) <= set(baseline.scores):
            self._fill(trainer, pl_module, log=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fill(trainer, pl_module)

    def keys(self) -> list[str]:
        raise NotImplementedError

    def key_forms(self) -> dict[str, str | None]:
        """The score keys this callback will fill, with their form (`generative`/`classification`; None: known only
        after the first evaluation). Lets `RetentionStopping` check its monitor before any heavy work."""
        raise NotImplementedError


class TaskEvaluation(_Evaluation):
    """Built-in offline tasks in both forms: generative (exact match) and classification (log-likelihood choice).

    Args:
        tasks: built-in task names (see `gradual tasks`); `mc_<task>` keys hold the classification form.
        n: problems per task (the same problems for both forms and at every stage).
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
    """

    name = "tasks"

    def __init__(self, tasks: list[str], n: int = 100, forms: list[str] | None = None, fmt: str = "fewshot",
                 batch_size: int = 32, max_new_tokens: int | None = None, seed: int = 0,
                 enable_code: bool = False, progress: bool = True, difficulty: str = "small") -> None:
        unknown = [t for t in tasks if t not in TASKS and t not in CODE_TASKS]
        if unknown:
            raise UsageError(f"unknown task(s) {', '.join(map(repr, unknown))}; allowed: "
                             f"{', '.join([*TASKS, *CODE_TASKS])}")
        if any(t in CODE_TASKS for t in tasks) and not enable_code:
            raise UsageError("task 'humaneval' runs model-written code; set enable_code: true to allow it")
        self.forms = list(forms or ["generative", "classification"])
        bad = [f for f in self.forms if f not in ("generative", "classification")]
        if bad:
            raise UsageError(f"forms={bad} are unknown; allowed: generative, classification")
        if fmt not in ("fewshot", "chat"):
            raise UsageError(f"fmt={fmt!r} is unknown; allowed: fewshot, chat")
        if n < 1:
            raise UsageError(f"n={n} is invalid; it must be >= 1")
        self.difficulty = check_difficulty(difficulty)
        self.tasks, self.n, self.fmt = list(tasks), n, fmt
        self.batch_size, self.max_new_tokens, self.seed = batch_size, max_new_tokens, seed
        self.enable_code, self.progress = enable_code, progress

    def keys(self) -> list[str]:
        keys = []
        for t in self.tasks:
            if "generative" in self.forms:
                keys.append(t)
            if "classification" in self.forms and t in TASKS and TASKS[t].has_classification:
                keys.append(f"mc_{t}")
        return keys

    def key_forms(self) -> dict[str, str | None]:
        return {k: "classification" if k.startswith("mc_") else "generative" for k in self.keys()}

    def results(self, pl_module: L.LightningModule) -> dict[str, dict[str, Any]]:
        out = evaluate(pl_module.model, pl_module.tokenizer, self.tasks, n=self.n, forms=tuple(self.forms),
                       fmt=self.fmt, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, seed=self.seed,
                       enable_code=self.enable_code, progress=self.progress, difficulty=self.difficulty)
        return {key: {"score": r.score, "form": r.form, "n": r.n, "failures": dict(r.failures),
                      "truncated": r.truncated} for key, r in out.items()}


class LmEvalEvaluation(_Evaluation):
    """Any lm-eval task (stock name or a local YAML task directory) on the live model through lm-eval's HFLM.

    Args:
        tasks: lm-eval task names.
        include_path: a directory of local YAML tasks (offline with `dataset_path: json`).
        limit: items per task (None: all).
        num_fewshot: few-shot examples (None: the task's default).
        batch_size: lm-eval batch size.
    """

    name = "lm_eval"

    def __init__(self, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                 num_fewshot: int | None = None, batch_size: int = 16) -> None:
        if not tasks:
            raise UsageError("LmEvalEvaluation.tasks is empty; name at least one lm-eval task")
        self.tasks, self.include_path, self.limit = list(tasks), include_path, limit
        self.num_fewshot, self.batch_size = num_fewshot, batch_size
        self._keys: list[str] | None = None

    def keys(self) -> list[str]:
        return self._keys or [f"lm_eval/{t}" for t in self.tasks]

    def key_forms(self) -> dict[str, str | None]:
        return dict.fromkeys(self.keys())

    def results(self, pl_module: L.LightningModule) -> dict[str, dict[str, Any]]:
        out = evaluate_lm_eval(pl_module.model, pl_module.tokenizer, self.tasks, limit=self.limit,
                               num_fewshot=self.num_fewshot, include_path=self.include_path,
                               batch_size=self.batch_size)
        results = {f"lm_eval/{key}": {"score": r.score, "form": r.form, "n": r.n, "failures": dict(r.failures),
                                      "truncated": r.truncated} for key, r in out.items()}
        self._keys = list(results)
        return results
