"""Fast batched generation shared by SGR (teacher answers) and task evaluation.

Prompts are sorted by token length so each batch wastes little padding, padded on the left so every row's
next token sits in the last column, and decoded with the KV cache. Greedy batched output equals
batch-size-1 output in fp32 (tested); results come back in the caller's order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass
class DecodingConfig:
    """How to decode. Defaults follow the seed paper's SGR settings (sampled, T=0.9, top-p 0.95)."""

    do_sample: bool = True
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens={self.max_new_tokens} is invalid; it must be >= 1")
        if self.num_samples < 1:
            raise UsageError(f"num_samples={self.num_samples} is invalid; it must be >= 1")
        if not self.do_sample and self.num_samples > 1:
            raise UsageError(f"num_samples={self.num_samples} needs do_sample=true; greedy decoding gives one answer")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise UsageError(f"temperature={self.temperature}, top_p={self.top_p} are invalid; "
                             "need temperature > 0 and 0 < top_p <= 1")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UsageError(f"stop={self.stop!r} is invalid; stop strings must be non-empty strings")


def format_prompt(tokenizer: PreTrainedTokenizerBase, user: str, system: str | None = DEFAULT_SYSTEM_PROMPT,
                  chat: bool = True) -> str:
    """The model's chat template when it has one (and `chat` is on); the plain text otherwise."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return user


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut a completion at the first stop string (generation of a batch runs until every row stops)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _end_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a completion: the tokenizer's EOS and pad, plus the generation config's EOS ids
    (chat models often stop on an end-of-turn token that differs from the tokenizer's EOS)."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos])
    return {int(i) for i in ids if i is not None}


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             config: DecodingConfig | None = None, batch_size: int = 16, progress: bool = True,
             desc: str = "generate",
             on_batch: Callable[[list[int], list[list[str]]], None] | None = None) -> list[list[str]]:
    """Complete every prompt `config.num_samples` times; returns one list of completions per prompt, in order.

    Prompts are full strings (apply `format_prompt` first). Special tokens are not added again, so a chat
    template's BOS is not doubled. `on_batch(indices, completions)` is called after each batch with the
    caller's prompt indices, so a caller can persist results before the whole call ends. The tokenizer's
    padding side is restored afterwards (training code usually pads on the right).
    """
    config = config or DecodingConfig()
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size} is invalid; it must be >= 1")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    end_ids = _end_ids(model, tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    results: list[list[str]] = [[] for _ in prompts]
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    new_tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt", leave=False)
    try:
        for b, lo in enumerate(range(0, len(order), batch_size)):
            idx = order[lo:lo + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
            kwargs = dict(max_new_tokens=config.max_new_tokens, num_return_sequences=config.num_samples,
                          pad_token_id=tokenizer.pad_token_id, use_cache=True)
            if config.do_sample:
                torch.manual_seed(config.seed * 1_000_003 + b)
                kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if config.stop:
                kwargs.update(stop_strings=list(config.stop), tokenizer=tokenizer)
            out = model.generate(**batch, **kwargs)
            gen = out[:, batch["input_ids"].shape[1]:]
            for row, seq in enumerate(gen):
                keep = _until_end(seq, end_ids)
                new_tokens += int(keep.numel())
                text = tokenizer.decode(keep, skip_special_tokens=True)
                results[idx[row // config.num_samples]].append(truncate_at_stop(text, config.stop))
            if on_batch is not None:
                on_batch(list(idx), [results[i] for i in idx])
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
    finally:
        bar.close()
        model.train(was_training)
        tokenizer.padding_side = old_side
    return results


def _until_end(seq: torch.Tensor, end_ids: set[int]) -> torch.Tensor:
    """Tokens before the first end id: `generate` pads rows that finished early."""
    hits = torch.isin(seq, torch.tensor(sorted(end_ids), device=seq.device)).nonzero()
    return seq[: int(hits[0])] if len(hits) else seq


def agreement_rate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   batch_size: int = 16, max_new_tokens: int = 64, progress: bool = False) -> float:
    """Share of prompts whose batched greedy completion equals the batch-size-1 completion.

    1.0 is expected in fp32; in bf16/fp16 padding changes the kernels' reduction order and a few near-tie
    tokens flip. Report it on a real model before trusting batched evaluation at low precision.
    """
    if not prompts:
        raise UsageError("agreement_rate needs at least one prompt")
    config = DecodingConfig(do_sample=False, max_new_tokens=max_new_tokens)
    batched = generate(model, tokenizer, prompts, config, batch_size=batch_size, progress=progress, desc="batched")
    single = generate(model, tokenizer, prompts, config, batch_size=1, progress=progress, desc="batch 1")
    return sum(a == b for a, b in zip(batched, single, strict=True)) / len(prompts)
