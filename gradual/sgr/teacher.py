"""The teacher's answers to SGR prompts (`teacher_responses`): through the answer cache, generated batched by
transformers (`gradual.generation.generate`) or by vLLM from the teacher on disk, and under DDP split across ranks
and gathered back in order."""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.generation import DecodingConfig, encode_prompt, generate, response_prompt
from gradual.ranks import broadcast_from_rank0, gather_in_order, rank_world, split_for_rank
from gradual.sgr.cache import ResponseCache
from gradual.sgr.config import PromptItem, SGRConfig
from gradual.sgr.fingerprint import CACHE_VERSION, DiskTeacher, cache_key

log = logging.getLogger(__name__)

OnBatch = Callable[[list[int], list[list[str]]], None]


class _TransformersBackend:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                 progress: bool) -> None:
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress

    def __call__(self, inputs: list[str], decoding: DecodingConfig, on_batch: OnBatch | None,
                 seed_ids: list[int]) -> list[list[str]]:
        """Each prompt samples from its own generator seeded by its index in the whole prompt list (`seed_ids`), so
        a resumed or sharded run draws the same answers as one uninterrupted process."""
        return generate(self.model, self.tokenizer, inputs, decoding, batch_size=self.batch_size,
                        progress=self.progress, desc="sgr", on_batch=on_batch, seed_ids=seed_ids)


def vllm_sampling_kwargs(decoding: DecodingConfig, stop_ids: set[int] | None = None) -> dict[str, Any]:
    """`vllm.SamplingParams` arguments equivalent to a DecodingConfig (greedy = temperature 0; top-k left at
    vLLM's "off" default). The seed goes to the engine: a per-request seed would give every prompt the same draws.
    `stop_ids` (the ids that end an answer, as in the cache key) are passed explicitly, so vLLM stops where the
    transformers backend does, whatever its own reading of the generation config."""
    kwargs: dict[str, Any] = dict(n=decoding.num_samples, max_tokens=decoding.max_new_tokens,
                                  stop=list(decoding.stop) or None)
    if stop_ids:
        kwargs["stop_token_ids"] = sorted(stop_ids)
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p)
    else:
        kwargs.update(temperature=0.0, top_p=1.0)
    return kwargs


def vllm_engine_kwargs(teacher: DiskTeacher, vllm_args: dict[str, Any], seed: int) -> dict[str, Any]:
    """`vllm.LLM` arguments: the user's `vllm_args`, then the teacher's source and commit, which the cache key was
    computed from and which `vllm_args` therefore cannot override."""
    return {"seed": seed, **vllm_args, "model": teacher.source, "revision": teacher.revision,
            "tokenizer": teacher.source, "tokenizer_revision": teacher.revision}


class _VLLMBackend:
    """vLLM engine for the teacher, built once per `teacher_responses` call from the teacher on disk.

    vLLM loads the weights from `teacher.source` (at `teacher.revision`), the same files the cache key hashed; a
    pruned or healed teacher must be saved first and its folder passed as `model_id`.
    """

    def __init__(self, teacher: DiskTeacher, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int],
                 vllm_args: dict[str, Any], seed: int) -> None:
        try:
            import vllm
        except ImportError:
            raise UsageError("sgr backend='vllm' needs the vllm package (pip install vllm, GPU only); "
                             "use backend='transformers'") from None
        self.vllm, self.tokenizer, self.stop_ids = vllm, tokenizer, stop_ids
        self.llm = vllm.LLM(**vllm_engine_kwargs(teacher, vllm_args, seed))

    def __call__(self, inputs: list[str], decoding: DecodingConfig, on_batch: OnBatch | None) -> list[list[str]]:
        prompts = [{"prompt_token_ids": encode_prompt(self.tokenizer, p)} for p in inputs]
        params = self.vllm.SamplingParams(**vllm_sampling_kwargs(decoding, self.stop_ids))
        outputs = self.llm.generate(prompts, params)
        return [[o.text for o in out.outputs] for out in outputs]

    def close(self) -> None:
        """Drop the engine so its GPU memory can go to training."""
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _chunk_seed(seed: int, chunk: int, rank: int) -> int:
    """A distinct sampling seed per (chunk, rank): otherwise every chunk and rank would replay the same draws."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{chunk}:{rank}".encode()).digest()[:4], "little")


def teacher_responses(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
                      items: Sequence[PromptItem], cfg: SGRConfig, model_id: str | None = None,
                      progress: bool = True, raw: bool = False) -> list[list[str]]:
    """The teacher's `cfg.decoding.num_samples` answers to every prompt, in order, from the cache where present.

    Prompts are user messages formatted by `response_prompt`; with `raw` they are the model's whole input as they
    stand (few-shot prompts answered in the evaluation's format, `self_documents`), and the cache keys the raw text.

    transformers backend: `model` answers. vLLM backend: `model_id` on disk answers and `model` may be None (see
    `cache_key`). Under DDP each chunk's missing prompts are split rank::world and gathered, so every rank returns
    the full list; only rank 0 reads and writes the cache (and broadcasts what it read).
    """
    rank, world = rank_world()
    if cfg.backend == "vllm" and world > 1:
        raise UsageError("sgr backend='vllm' does not run under torch.distributed; use backend='transformers'")
    prompts = [it.prompt for it in items]
    inputs = prompts if raw else [response_prompt(tokenizer, p, cfg.system_prompt, cfg.chat) for p in prompts]
    model_id = model_id or getattr(getattr(model, "config", None), "name_or_path", "") or None
    fp, stop_ids, teacher = cache_key(model, tokenizer, inputs, cfg, model_id)
    cache = None
    if cfg.cache_dir and rank == 0:
        meta = {"fingerprint": fp, "version": CACHE_VERSION, "model_id": model_id, "num_prompts": len(items),
                "decoding": asdict(cfg.decoding), "backend": cfg.backend, "vllm_args": cfg.vllm_args,
                "end_ids": sorted(stop_ids), "chat": cfg.chat, "system_prompt": cfg.system_prompt,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        cache = ResponseCache(Path(cfg.cache_dir) / f"{fp}.jsonl", meta)
    done = broadcast_from_rank0(cache.load(prompts) if cache else {})
    todo = [i for i in range(len(items)) if i not in done]
    if cache:
        log.info("sgr cache %s: %d of %d prompts cached, %d to generate", cache.path, len(done), len(items), len(todo))
    if not todo:
        return [done[i] for i in range(len(items))]
    backend = (_VLLMBackend(teacher, tokenizer, stop_ids, cfg.vllm_args, cfg.decoding.seed) if teacher is not None
               else _TransformersBackend(model, tokenizer, cfg.batch_size, progress and rank == 0))
    bar = tqdm(total=len(items), initial=len(done), desc="sgr prompts", unit="prompt",
               disable=None if progress and rank == 0 else True)
    try:
        for c, lo in enumerate(range(0, len(todo), cfg.chunk_size)):
            mine = split_for_rank(todo[lo:lo + cfg.chunk_size], rank, world)

            def write(idx: list[int], outs: list[list[str]], mine: list[int] = mine) -> None:
                """Single process: persist each batch as soon as it is generated."""
                if cache:
                    cache.append([(mine[j], prompts[mine[j]], o) for j, o in zip(idx, outs, strict=True)])
                bar.update(len(idx))

            per_batch = world == 1 and cfg.backend == "transformers"
            if isinstance(backend, _VLLMBackend):  # one engine seed per (chunk, rank): vLLM draws per request
                outs = backend([inputs[i] for i in mine], replace(cfg.decoding, seed=_chunk_seed(cfg.decoding.seed, c,
                                                                                                 rank)), None)
            else:
                outs = backend([inputs[i] for i in mine], cfg.decoding, write if per_batch else None, mine)
            gathered = gather_in_order(list(zip(mine, outs, strict=True)))
            if not per_batch:
                if cache:
                    cache.append([(i, prompts[i], o) for i, o in gathered])
                bar.update(len(gathered))
            done.update(gathered)
    finally:
        bar.close()
        if isinstance(backend, _VLLMBackend):
            backend.close()
    return [done[i] for i in range(len(items))]
