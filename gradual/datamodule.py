"""The recovery data of a `gradual fit` run: a weighted mixture of sources, built before the student is loaded."""

from __future__ import annotations

import gc
import logging
import shutil
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from gradual import models, ranks
from gradual.data import Part, RecoveryDataModule
from gradual.mixture import DataSource, check_sources, source_texts
from gradual.sgr import PromptItem, SGRConfig, build_pairs, load_prompts, sdft_pairs

log = logging.getLogger(__name__)
VLLM_TEACHER_DIR = "sgr_teacher"  # under run_dir: the previous stage's model, saved for vLLM to load


@dataclass
class SourcePool:
    """What a source holds before any model runs: the prompts the teacher answers (`sgr`, `sdft`) or the texts
    (`tasks`, `text`), the built-in tasks they come from, and for `sdft` how many rewrites the last build kept."""

    source: DataSource
    name: str
    items: list[PromptItem] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    rewrites: int | None = None


class GradualDataModule(RecoveryDataModule):
    """Every stage's recovery data: a weighted mixture of sources (`gradual.mixture`), by default `data.sgr`'s SGR pairs
    alone, exactly as before sources existed (same pairs, same order, same answer cache).

    With `sgr.teacher: original` (the paper's recipe) the unpruned model answers the `sgr` and `sdft` prompts in
    `setup`, before the LightningModule loads its own copy, so only one model is in memory at a time; answers are
    cached on disk, so a resumed run or a second run with the same settings generates nothing. With `sgr.backend:
    vllm` no model is loaded here at all: vLLM loads the teacher from disk. With `sgr.teacher: previous` every stage
    after the first trains on fresh answers of the model the finished stages left (`train_dataloader`). `tasks` and
    `text` sources need no teacher. Every setting is checked, and every prompt, document and text is read, when the
    module is built: bad input ends before any model loads.

    Args:
        model: the model to prune (linked from `model.model`); the teacher and the tokenizer come from it.
        sgr: the `sgr` source's prompts, and the settings `sgr` and `sdft` share: decoding, teacher, backend, cache,
            response mode (`sgr`, `sgr_filtered`, `dataset`; `sgr` source only), the evaluation split task problems
            must not overlap (`eval_n`, `eval_seed`), their `seed` and default `difficulty`. Its `system_prompt` and
            `chat` also format every training pair, so the student learns in the teacher's format.
        sources: the mixture, a list of `DataSource` (`kind`: sgr | tasks | text | sdft, `weight`, kind settings);
            each stage holds every source in proportion to its weight. null (default) = `[{kind: sgr}]`. Pairs
            (sgr, sdft) are learned on the response only, texts (tasks, text) on every token.
        dtype: teacher dtype for generation (`float32`, `bfloat16`, `float16`, `auto`); None (the default) = the
            model's `model.dtype`, so a bf16 run does not generate in float32. With vLLM it is the engine's dtype
            unless `sgr.vllm_args` sets one.
        batch_size: examples per batch and rank.
        max_length: tokens per example (prompt + response, or text); longer responses and texts are cut at the end.
            Capped at the model's positions (examples cut there are counted and logged), so one config fits models of
            any context size.
        seed: data order seed (linked from `model.seed`).
        trust_remote_code: linked from the model.
    """

    def __init__(self, model: str = "smollm2-135m-instruct", sgr: SGRConfig | None = None,
                 sources: list[DataSource] | None = None, dtype: str | None = None, batch_size: int = 8,
                 max_length: int = 512, seed: int = 0, trust_remote_code: bool = False) -> None:
        sgr = sgr or SGRConfig()
        super().__init__(batch_size=batch_size, samples_per_epoch=batch_size, max_length=max_length,
                         system_prompt=sgr.system_prompt, chat=sgr.chat, seed=seed,
                         max_positions=models.model_positions(model, trust_remote_code))
        self.model_name, self.dtype_name, self.trust_remote_code = model, dtype, trust_remote_code
        self.sgr = sgr
        if self.sgr.cache_dir is None:
            self.sgr.cache_dir = str(models.cache_dir() / "sgr")
        self.sources = check_sources([DataSource("sgr")] if sources is None else list(sources))
        kinds = [s.kind for s in self.sources]
        self.pools = [self._pool(s, s.kind if kinds.count(s.kind) == 1 else f"{s.kind} #{i + 1}")
                      for i, s in enumerate(self.sources)]
        self.answered_after = 0  # stages done when the current pairs' teacher answered (0: the original model)

    def _pool(self, source: DataSource, name: str) -> SourcePool:
        """Read what `source` needs before any model runs (prompts, documents, texts), refusing bad input."""
        from gradual.tasks import TASKS, get_task, task_names
        from gradual.tasks.documents import fewshot_documents

        if source.kind == "sgr":
            items = load_prompts(self.sgr)
            return SourcePool(source, name, items=items, tasks=sorted({it.task for it in items if it.task in TASKS}))
        if source.kind == "text":
            return SourcePool(source, name, texts=source_texts(source, self.sgr.seed))
        names = task_names(source.tasks or None)
        difficulty = source.difficulty or self.sgr.difficulty
        if source.kind == "sdft":
            prompts = replace(self.sgr, source="tasks", tasks=names, n_per_task=source.n_per_task,
                              difficulty=difficulty, responses="sgr", path=None)
            return SourcePool(source, name, items=load_prompts(prompts), tasks=sorted(names))
        texts = [doc for task in names for doc in fewshot_documents(
            get_task(task, difficulty), source.n_per_task, source.shots, self.sgr.seed, self.sgr.eval_n,
            self.sgr.eval_seed)]
        return SourcePool(source, name, texts=texts, tasks=sorted(names))

    def recovery_tasks(self) -> list[str]:
        """Built-in tasks whose problems feed the recovery data (the union over its sources: `sgr`'s task prompts,
        `tasks`, `sdft`; a `text` source adds none): their evaluation scores are *in-data*, every other task's
        *held-out* (`gradual.retention`). Known from the settings alone, before anything is generated."""
        return sorted({task for pool in self.pools for task in pool.tasks})

    def describe(self) -> list[dict[str, Any]]:
        """What each source (weight > 0, in config order) contributes, for the run's results: `name`, `kind`,
        `weight`, `share` (its fraction of every stage's examples), `tasks` (the built-in tasks it drew from) and what
        its settings gave (`prompts` for sgr/sdft, `documents` and `shots` for tasks, `texts` and `path` for text; null
        path = the built-in texts). Once the data are built: `examples` (pairs or texts), `rewrites` for sdft (teacher
        rewrites the task scorer accepted; the other examples are reference answers); once tokenised, `dropped`
        (nothing to learn within max_length) and `clamped` (cut at the model's positions)."""
        total = sum(s.weight for s in self.sources)
        rows = []
        for k, pool in enumerate(self.pools):
            s = pool.source
            row: dict[str, Any] = {"name": pool.name, "kind": s.kind, "weight": s.weight, "share": s.weight / total,
                                   "tasks": pool.tasks}
            if s.kind in ("sgr", "sdft"):
                row["prompts"] = len(pool.items)
            if s.kind == "tasks":
                row.update(documents=len(pool.texts), shots=s.shots)
            if s.kind == "text":
                row.update(texts=len(pool.texts), path=s.path)
            if len(self.parts) == len(self.pools):
                row["examples"] = len(self.parts[k].examples)
                if s.kind == "sdft":
                    row["rewrites"] = pool.rewrites
            if self._dataset is not None:
                row.update(dropped=self.part_counts[k]["dropped"], clamped=self.part_counts[k]["clamped"])
            rows.append(row)
        return rows

    @property
    def needs_teacher(self) -> bool:
        """Whether a source asks the teacher: `sgr` unless its responses are the dataset's, and `sdft`."""
        return any(s.kind == "sdft" or (s.kind == "sgr" and self.sgr.responses != "dataset") for s in self.sources)

    def build(self, teacher: torch.nn.Module | None, model_id: str) -> None:
        """Build every source's examples, `teacher` answering (`sgr`, `sdft`; None with vLLM, which loads `model_id`
        from disk), and hand them to the sampler as weighted parts."""
        parts = []
        for pool in self.pools:
            s = pool.source
            if s.kind == "sgr":
                examples = build_pairs(teacher, self.tokenizer, self.sgr, model_id=model_id, items=pool.items)
            elif s.kind == "sdft":
                examples, pool.rewrites = sdft_pairs(teacher, self.tokenizer, replace(self.sgr, responses="sgr"),
                                                     pool.items, model_id=model_id)
            else:
                examples = [{"text": t} for t in pool.texts]
            parts.append(Part(pool.name, s.weight, examples))
        self.set_parts(parts)

    def setup(self, stage: str) -> None:
        if self.parts:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        self.dtype_name = self.dtype_name or getattr(module, "dtype_name", None) or "float32"
        self._warn_on_difficulty_mismatch()
        tokenizer = models.load_tokenizer(self.model_name, trust_remote_code=self.trust_remote_code)
        self.set_tokenizer(tokenizer)
        teacher = None
        if self.sgr.backend == "vllm":
            self.sgr = replace(self.sgr, vllm_args={"dtype": self.dtype_name, **self.sgr.vllm_args})
        elif self.needs_teacher:
            teacher = models.load_model(self.model_name, dtype=self.dtype_name,
                                        trust_remote_code=self.trust_remote_code)
            if torch.cuda.is_available():
                teacher.to(f"cuda:{ranks.local_rank()}")
        self.build(teacher, self.model_name)
        del teacher
        gc.collect()

    def train_dataloader(self) -> DataLoader:
        """The stage's batches. Lightning builds each stage's loader here, before the stage's
        `on_train_epoch_start`, so with `sgr.teacher: previous` the answers of the model the finished stages left are
        generated here (also on resume, from the stage the run resumed from); any later would train stage k on the
        answers of stage k-2."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        done = len(getattr(module, "history", [])) - 1
        if self.sgr.teacher == "previous" and self.needs_teacher and done >= 1 and done != self.answered_after:
            model_id = f"{self.model_name}@stage_{done}"
            if self.sgr.backend == "vllm":  # vLLM loads the teacher from disk: save the current model for it
                folder = module.run_dir / VLLM_TEACHER_DIR
                shutil.rmtree(folder, ignore_errors=True)
                models.save_model(module.model, module.tokenizer, folder)
                model_id = str(folder)
            self.regenerate(module.model, model_id)
            self.answered_after = done
        return super().train_dataloader()

    def regenerate(self, model: torch.nn.Module, model_id: str) -> None:
        """Fresh answers from `model` (`sgr.teacher: previous`), cached under its own fingerprint; with vLLM,
        `model_id` is the folder it was saved to."""
        self.build(model, model_id)

    def _warn_on_difficulty_mismatch(self) -> None:
        """Recovery problems from the tasks should be as hard as the problems the run is judged on."""
        if self.trainer is None:
            return
        drawn = {pool.name: pool.source.difficulty or self.sgr.difficulty for pool in self.pools
                 if pool.source.kind in ("tasks", "sdft") or (pool.source.kind == "sgr" and self.sgr.source == "tasks")}
        for callback in self.trainer.callbacks:
            difficulty = getattr(callback, "difficulty", None)
            for name, mine in drawn.items():
                if isinstance(difficulty, str) and difficulty != mine:
                    log.warning("recovery source %s draws difficulty=%r but %s evaluates difficulty=%r: the recovery "
                                "problems do not match the evaluated ones", name, mine, type(callback).__name__,
                                difficulty)
