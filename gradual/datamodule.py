"""The recovery data of a `gradual fit` run: SGR pairs produced by the teacher before the student is loaded."""

from __future__ import annotations

import gc
import logging
import os
import shutil
from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from gradual import models
from gradual.data import RecoveryDataModule
from gradual.sgr import SGRConfig, build_pairs, load_prompts

log = logging.getLogger(__name__)
VLLM_TEACHER_DIR = "sgr_teacher"  # under run_dir: the previous stage's model, saved for vLLM to load


class GradualDataModule(RecoveryDataModule):
    """(prompt, response) pairs for every stage's recovery, built by `gradual.sgr`.

    With `sgr.teacher: original` (the paper's recipe) the unpruned model answers the prompts in `setup`, before the
    LightningModule loads its own copy, so only one model is in memory at a time; answers are cached on disk, so a
    resumed run or a second run with the same settings generates nothing. With `sgr.backend: vllm` no model is
    loaded here at all: vLLM loads the teacher from disk. With `sgr.teacher: previous` every stage after the first
    trains on fresh answers of the model the finished stages left (`train_dataloader`).

    Args:
        model: the model to prune (linked from `model.model`); the teacher and the tokenizer come from it.
        sgr: prompt source, decoding and response mode (`sgr`, `sgr_filtered`, `dataset`); its `system_prompt`
            and `chat` also format the training examples, so the student learns in the teacher's format.
        dtype: teacher dtype for generation (`float32`, `bfloat16`, `float16`, `auto`); None (the default) = the
            model's `model.dtype`, so a bf16 run does not generate in float32. With vLLM it is the engine's dtype
            unless `sgr.vllm_args` sets one.
        batch_size: examples per batch and rank.
        max_length: tokens per example (prompt + response); longer responses are truncated. Capped at the model's
            positions (examples cut there are counted and logged), so one config fits models of any context size.
        seed: data order seed (linked from `model.seed`).
        trust_remote_code: linked from the model.
    """

    def __init__(self, model: str = "smollm2-135m-instruct", sgr: SGRConfig | None = None,
                 dtype: str | None = None, batch_size: int = 8, max_length: int = 512, seed: int = 0,
                 trust_remote_code: bool = False) -> None:
        sgr = sgr or SGRConfig()
        super().__init__(batch_size=batch_size, samples_per_epoch=batch_size, max_length=max_length,
                         system_prompt=sgr.system_prompt, chat=sgr.chat, seed=seed,
                         max_positions=models.model_positions(model, trust_remote_code))
        self.model_name, self.dtype_name, self.trust_remote_code = model, dtype, trust_remote_code
        self.sgr = sgr
        if self.sgr.cache_dir is None:
            self.sgr.cache_dir = str(models.cache_dir() / "sgr")
        self.items = load_prompts(self.sgr)
        self.answered_after = 0  # stages done when the current pairs' teacher answered (0: the original model)

    def recovery_tasks(self) -> list[str]:
        """Built-in tasks whose problems feed the recovery data: their evaluation scores are *in-data*, every other
        task's *held-out* (`gradual.retention`). Known from the settings alone, before anything is generated."""
        from gradual.tasks import TASKS

        return sorted({it.task for it in self.items if it.task in TASKS})

    def setup(self, stage: str) -> None:
        if self.pairs:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        self.dtype_name = self.dtype_name or getattr(module, "dtype_name", None) or "float32"
        self._warn_on_difficulty_mismatch()
        tokenizer = models.load_tokenizer(self.model_name, trust_remote_code=self.trust_remote_code)
        self.set_tokenizer(tokenizer)
        teacher = None
        if self.sgr.backend == "vllm":
            self.sgr = replace(self.sgr, vllm_args={"dtype": self.dtype_name, **self.sgr.vllm_args})
        elif self.sgr.responses != "dataset":
            teacher = models.load_model(self.model_name, dtype=self.dtype_name,
                                        trust_remote_code=self.trust_remote_code)
            if torch.cuda.is_available():
                teacher.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        self.set_pairs(build_pairs(teacher, tokenizer, self.sgr, model_id=self.model_name, items=self.items))
        del teacher
        gc.collect()

    def train_dataloader(self) -> DataLoader:
        """The stage's batches. Lightning builds each stage's loader here, before the stage's
        `on_train_epoch_start`, so with `sgr.teacher: previous` the answers of the model the finished stages left are
        generated here (also on resume, from the stage the run resumed from); any later would train stage k on the
        answers of stage k-2."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        done = len(getattr(module, "history", [])) - 1
        if (self.sgr.teacher == "previous" and self.sgr.responses != "dataset" and done >= 1
                and done != self.answered_after):
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
        self.set_pairs(build_pairs(model, self.tokenizer, self.sgr, model_id=model_id, items=self.items))

    def _warn_on_difficulty_mismatch(self) -> None:
        """Recovery prompts from the tasks should be as hard as the problems the run is judged on."""
        if self.sgr.source != "tasks" or self.trainer is None:
            return
        for callback in self.trainer.callbacks:
            difficulty = getattr(callback, "difficulty", None)
            if isinstance(difficulty, str) and difficulty != self.sgr.difficulty:
                log.warning("sgr.difficulty=%r but %s evaluates difficulty=%r: the recovery prompts do not match "
                            "the evaluated problems", self.sgr.difficulty, type(callback).__name__, difficulty)
