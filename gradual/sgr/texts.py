"""Self-generated broad text (the `self_text` source of the recovery mixture, `gradual.mixture`): the teacher (the
original, unpruned model by default) continues short, diverse openings, sampled, and each opening plus its
continuation is one training text.

Why: distillation (`model.recovery.loss: kd`) matches the teacher's next-token distribution at every position of a
text, so its data should be text like the teacher's own pretraining text, without a dataset: this source needs no
download and is the teacher's own distribution, the broad counterpart of the SGR answers. The openings are built in
(`gradual/resources/openings.txt`: prose, news, science, code, recipes, letters, questions); they are raw text, not
chat messages, so an instruct model writes documents rather than replies.

Generation runs through `gradual.sgr.teacher.teacher_responses` with the openings as raw prompts: the same batched
generator, backend, DDP split and answer cache as SGR answers, keyed by the teacher's weights, every opening in
order (hence their number and seed), the decoding (temperature, top-p, token budget, sampling seed) and what ends
an answer. A second build with the same settings, a resumed run or another arm reads the cache and generates
nothing; an interrupted generation resumes after its last finished batch.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from importlib import resources

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.generation import DecodingConfig
from gradual.sgr.config import PromptItem, SGRConfig
from gradual.sgr.teacher import teacher_responses

log = logging.getLogger(__name__)

OPENINGS_FILE = "resources/openings.txt"
SELF_TEXT_TASK = "self_text"
"""The `task` label of a `self_text` opening (`PromptItem.task`): no built-in task, so none becomes in-data."""


def builtin_openings() -> list[str]:
    """The packaged openings, one a line; a literal backslash-n in a line is a line break (code, letters)."""
    text = resources.files("gradual").joinpath(OPENINGS_FILE).read_text(encoding="utf-8")
    return [line.strip().replace("\\n", "\n") for line in text.splitlines() if line.strip()]


def opening_prompts(n: int, seed: int, openings: list[str] | None = None) -> list[str]:
    """The opening of each of `n` texts: consecutive passes over `openings` (default: the built-in ones), pass p in
    the order of a permutation seeded by (seed, p), so every opening serves equally often, within one."""
    openings = builtin_openings() if openings is None else openings
    if not openings:
        raise UsageError("self_text has no openings to continue")
    passes = -(-n // len(openings))
    order = np.concatenate([np.random.default_rng([seed, p]).permutation(len(openings)) for p in range(passes)])
    return [openings[i] for i in order[:n]]


def self_text_items(n: int, seed: int) -> list[PromptItem]:
    """The `n` openings as prompt items (what a `self_text` source holds before any model runs)."""
    return [PromptItem(p, None, SELF_TEXT_TASK) for p in opening_prompts(n, seed)]


def self_texts(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None, cfg: SGRConfig,
               items: list[PromptItem], decoding: DecodingConfig, model_id: str | None = None,
               progress: bool = True) -> list[str]:
    """Each opening followed by the teacher's sampled continuation, in item order; a blank continuation is dropped
    (as SGR drops empty answers).

    Args:
        model: the teacher (None with `cfg.backend: vllm`, which loads `model_id` from disk).
        cfg: `data.sgr`, for its backend, cache, batch and chunk sizes; its chat, system prompt and decoding are
            replaced (raw openings, `decoding`).
        items: the openings (`self_text_items`).
        decoding: how the teacher continues: sampled at the source's temperature and top-p, up to its
            `max_new_tokens`, seeded by its seed (one generator per text, so the texts do not depend on the batch
            size or on an interruption).
    """
    if tokenizer is None or (model is None and cfg.backend != "vllm"):
        raise UsageError("self_text needs the original model and tokenizer")
    asked = replace(cfg, chat=False, system_prompt=None, decoding=decoding)
    answers = teacher_responses(model, tokenizer, items, asked, model_id=model_id, progress=progress, raw=True)
    texts = [it.prompt + a[0] for it, a in zip(items, answers, strict=True) if a[0].strip()]
    log.info("self_text: %d texts from %d openings (%d blank continuations dropped)", len(texts), len(items),
             len(items) - len(texts))
    if not texts:
        raise UsageError(f"self_text: the teacher's continuations of all {len(items)} openings are blank; raise "
                         "max_new_tokens or use another source")
    return texts
