"""Training pairs from the teacher's answers: `build_pairs` (SGR: every answer, only the answers the task's scorer
`accepts`, or the dataset's own answers) and `sdft_pairs` (the teacher's accepted rewrites of reference answers)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.sgr.config import PromptItem, SGRConfig
from gradual.sgr.prompts import load_prompts
from gradual.sgr.teacher import teacher_responses

log = logging.getLogger(__name__)


def accepts(item: PromptItem, response: str) -> bool:
    """Whether the built-in task's scorer counts `response` as a correct answer to `item`."""
    from gradual.tasks.builtin import get_task
    from gradual.tasks.extract import extract_answer, normalize_reference

    task = get_task(item.task)
    if item.reference is None:
        raise UsageError(f"prompt of task {item.task!r} has no reference answer to check a response against")
    return extract_answer(task.kind, response, task.labels) == normalize_reference(task.kind, item.reference)


def build_pairs(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None, cfg: SGRConfig,
                model_id: str | None = None, items: Sequence[PromptItem] | None = None,
                progress: bool = True) -> list[dict[str, str]]:
    """Training pairs `{"prompt": raw user text, "response": answer, "task": origin}` as `cfg.responses` says.

    "sgr": every non-empty teacher answer (one pair per sample); "sgr_filtered": only those `accepts` passes;
    "dataset": the source's own answers (no model needed). Empty answers teach nothing and are dropped.
    """
    items = load_prompts(cfg) if items is None else list(items)
    if not items:
        raise UsageError("sgr has no prompts to build recovery pairs from")
    if cfg.responses == "dataset":
        missing = [it for it in items if not (it.reference or "").strip()]
        if missing:
            raise UsageError(f"sgr responses='dataset' but {len(missing)} prompts have no reference answer")
        return [{"prompt": it.prompt, "response": it.reference, "task": it.task} for it in items]
    if tokenizer is None or (model is None and cfg.backend != "vllm"):
        raise UsageError(f"sgr responses={cfg.responses!r} needs a teacher model and tokenizer")
    answers = teacher_responses(model, tokenizer, items, cfg, model_id=model_id, progress=progress)
    pairs, empty, rejected = [], 0, 0
    for it, responses in zip(items, answers, strict=True):
        for r in responses:
            if not r.strip():
                empty += 1
            elif cfg.responses == "sgr_filtered" and not accepts(it, r):
                rejected += 1
            else:
                pairs.append({"prompt": it.prompt, "response": r, "task": it.task})
    total = sum(len(a) for a in answers)
    log.info("sgr: %d pairs from %d answers (%d empty, %d rejected by the scorer)", len(pairs), total, empty, rejected)
    if not pairs:
        raise UsageError(f"sgr responses={cfg.responses!r} kept none of {total} teacher answers "
                         f"({empty} empty, {rejected} rejected); use responses='sgr' or a stronger teacher")
    return pairs


SDFT_TEMPLATE = ("{prompt}\n\nReference answer: {reference}\n\n"
                 "Rewrite the reference answer in your own words as your reply to the request above.")
"""What the SDFT teacher is asked (a user message, chat-formatted like any SGR prompt): the task prompt, its reference
answer, and a request to rewrite it."""


def sdft_pairs(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None, cfg: SGRConfig,
               items: Sequence[PromptItem], model_id: str | None = None,
               progress: bool = True) -> tuple[list[dict[str, str]], int]:
    """Self-distillation fine-tuning pairs (SDFT, arXiv 2402.13669): one per task prompt, the teacher's rewrite of the
    reference answer when the task's scorer `accepts` it, otherwise the reference answer itself.

    Why: the student learns correct answers written in the teacher's own words (its own distribution), which heals a
    pruned model with less forgetting than the dataset's answers (arXiv 2410.09982). The teacher sees `SDFT_TEMPLATE`
    and answers through `teacher_responses` (same decoding, backend and cache as SGR; the template makes the inputs,
    hence the cache file, its own); the pair keeps the plain prompt. With several samples per prompt
    (`decoding.num_samples`) the first accepted one is used. Returns the pairs in item order and how many of them are
    teacher rewrites (the rest are references).
    """
    if tokenizer is None or (model is None and cfg.backend != "vllm"):
        raise UsageError("sdft needs a teacher model and tokenizer")
    if not items or any(it.reference is None for it in items):
        raise UsageError("sdft needs task prompts with reference answers")
    asks = [replace(it, prompt=SDFT_TEMPLATE.format(prompt=it.prompt, reference=it.reference)) for it in items]
    answers = teacher_responses(model, tokenizer, asks, cfg, model_id=model_id, progress=progress)
    pairs, kept = [], 0
    for it, responses in zip(items, answers, strict=True):
        rewrite = next((r for r in responses if r.strip() and accepts(it, r)), None)
        kept += rewrite is not None
        pairs.append({"prompt": it.prompt, "response": it.reference if rewrite is None else rewrite, "task": it.task})
    log.info("sdft: %d of %d teacher rewrites accepted by the task scorer; the reference answer kept for the rest",
             kept, len(items))
    return pairs, kept


def self_documents(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None, cfg: SGRConfig,
                   items: Sequence[PromptItem], difficulty: str = "small", model_id: str | None = None,
                   progress: bool = True, max_new_tokens: int | None = None) -> list[str]:
    """Few-shot documents answered by the teacher itself: each item's prompt (the evaluation's few-shot prompt of a
    training problem, `tasks.documents.fewshot_prompts`) followed by the teacher's reply up to the end of its first
    non-blank line (`answer_line`) and a newline. The reference answer is discarded.

    Why: the seed paper (arXiv 2602.01997) heals on the unpruned model's self-generated responses rather than the
    dataset's answers; here they are given in the format of use, so the student is distilled on the text it is
    evaluated on, along the teacher's own trajectory. Decoding is the evaluation's (`fewshot_decoding`: greedy, the
    task's few-shot budget unless `max_new_tokens`, first line), not `cfg.decoding`'s sampled chat answers: the
    documents then hold what the model says when it is scored. Answers go through `teacher_responses` (its backend,
    cache and fingerprint, DDP split), the prompts raw (no chat template), one cache file per task and budget.
    Documents whose reply is blank are dropped, as SGR drops empty answers.
    """
    from gradual.tasks.builtin import get_task
    from gradual.tasks.documents import answer_line
    from gradual.tasks.evaluate import fewshot_decoding

    if tokenizer is None or (model is None and cfg.backend != "vllm"):
        raise UsageError("tasks answers='self' needs the original model and tokenizer")
    by_task: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_task.setdefault(it.task, []).append(i)
    replies: list[str] = [""] * len(items)
    for task, idx in by_task.items():
        budget = max_new_tokens or get_task(task, difficulty).fewshot_tokens
        asked = replace(cfg, chat=False, system_prompt=None, decoding=fewshot_decoding(budget))
        answers = teacher_responses(model, tokenizer, [items[i] for i in idx], asked, model_id=model_id,
                                    progress=progress, raw=True)
        for i, responses in zip(idx, answers, strict=True):
            replies[i] = responses[0]
    documents = [it.prompt + line + "\n" for it, line in zip(items, map(answer_line, replies), strict=True)
                 if line.strip()]
    log.info("tasks answers='self': %d documents from %d prompts (%d blank replies dropped)", len(documents),
             len(items), len(items) - len(documents))
    if not documents:
        raise UsageError(f"tasks answers='self': the teacher's replies to all {len(items)} prompts are blank; "
                         "use answers='reference'")
    return documents
