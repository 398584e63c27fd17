"""The recovery data of a `gradual fit` run: SGR pairs produced by the teacher before the student is loaded."""

from __future__ import annotations

import gc
import os

import torch

from gradual import models
from gradual.data import RecoveryDataModule
from gradual.sgr import SGRConfig, build_pairs, load_prompts


class GradualDataModule(RecoveryDataModule):
    """(prompt, response) pairs for every stage's recovery, built by `gradual.sgr`.

    With `sgr.teacher: original` (the paper's recipe) the unpruned model answers the prompts in `setup`, before the
    LightningModule loads its own copy, so only one model is in memory at a time; answers are cached on disk, so a
    resumed run or a second run with the same settings generates nothing. With `sgr.teacher: previous` the module
    asks for fresh answers from its current model at the start of every stage (`regenerate`).

    Args:
        model: the model to prune (linked from `model.model`); the teacher and the tokenizer come from it.
        sgr: prompt source, decoding and response mode (`sgr`, `sgr_filtered`, `dataset`); its `system_prompt`
            and `chat` also format the training examples, so the student learns in the teacher's format.
        dtype: teacher dtype for generation.
        batch_size: examples per batch and rank.
        max_length: tokens per example (prompt + response); longer responses are truncated. Capped at the model's
            positions (examples cut there are counted and logged), so one config fits models of any context size.
        seed: data order seed (linked from `model.seed`).
        trust_remote_code: linked from the model.
    """

    def __init__(self, model: str = "smollm2-135m-instruct", sgr: SGRConfig | None = None,
                 dtype: str = "float32", batch_size: int = 8, max_length: int = 512, seed: int = 0,
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

    def recovery_tasks(self) -> list[str]:
        """Built-in tasks whose problems feed the recovery data: their evaluation scores are *in-data*, every other
        task's *held-out* (`gradual.retention`). Known from the settings alone, before anything is generated."""
        from gradual.tasks import TASKS

        return sorted({it.task for it in self.items if it.task in TASKS})

    def setup(self, stage: str) -> None:
        if self.pairs:
            return
        tokenizer = models.load_tokenizer(self.model_name, trust_remote_code=self.trust_remote_code)
        self.set_tokenizer(tokenizer)
        teacher = None
        if self.sgr.responses != "dataset":
            teacher = models.load_model(self.model_name, dtype=self.dtype_name,
                                        trust_remote_code=self.trust_remote_code)
            if torch.cuda.is_available():
                teacher.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        self.set_pairs(build_pairs(teacher, tokenizer, self.sgr, model_id=self.model_name,
                                              items=self.items))
        del teacher
        gc.collect()

    def regenerate(self, model: torch.nn.Module, model_id: str) -> None:
        """Fresh answers from the current model (`sgr.teacher: previous`), cached under its own fingerprint."""
        self.set_pairs(build_pairs(model, self.tokenizer, self.sgr, model_id=model_id, items=self.items))
