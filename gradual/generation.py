"""Fast batched generation shared by SGR (teacher answers) and task evaluation.

Prompts are sorted by token length so each batch wastes little padding; the tokens every prompt of a batch shares
(few-shot examples, the chat template's system turn) run once (`gradual.kvcache`), and a row leaves the batch the
moment it finishes, so no compute goes to padding or to finished rows. Greedy batched output equals batch-size-1
output in fp32 (tested); results come back in the caller's order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from gradual.errors import UsageError
from gradual.kvcache import prefill

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
log = logging.getLogger(__name__)


@dataclass
class DecodingConfig:
    """How to decode. Defaults follow the seed paper's SGR settings (sampled, T=0.9, top-p 0.95).

    Attributes:
        do_sample: sample (default true) or decode greedily (false: temperature, top_p and seed are ignored).
        temperature: sampling temperature, > 0 (default 0.9; lower = closer to greedy).
        top_p: nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p, in (0, 1]
            (default 0.95; 1 = the full distribution).
        max_new_tokens: the most tokens generated per answer (>= 1, default 256).
        stop: strings that end an answer; the answer is cut before the first one (default: none; the model's end
            tokens always end it).
        num_samples: answers per prompt (>= 1, default 1; more than 1 needs do_sample).
        seed: sampling seed; each (prompt, sample) draws from its own generator seeded by it, so answers do not
            depend on the batch size (default 0).
        stop_at_line_end: end an answer once a non-blank line is complete, for one-line few-shot answers
            (default false).
    """

    do_sample: bool = True
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    num_samples: int = 1
    seed: int = 0
    stop_at_line_end: bool = False

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


def response_prompt(tokenizer: PreTrainedTokenizerBase, user: str, system: str | None = DEFAULT_SYSTEM_PROMPT,
                    chat: bool = True) -> str:
    """The text a model continues with its answer: `format_prompt`, plus "\n" when there is no chat template.
    SGR generation and recovery training both use it, so the student learns to continue exactly what the teacher
    saw."""
    templated = chat and bool(getattr(tokenizer, "chat_template", None))
    return format_prompt(tokenizer, user, system, chat) + ("" if templated else "\n")


def max_positions(model: Any) -> int | None:
    """The most tokens the model can attend over (its config's position limit; a model, PEFT wrapper or config),
    or None when the config names none, in which case nothing is truncated."""
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def added_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id the tokenizer puts before every text by itself (Llama, Gemma), or None (GPT-2, Qwen, SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("x")["input_ids"][:1] == [bos] else None


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A prompt's token ids as the model saw them in training: the tokenizer's BOS exactly once at the start when the
    tokenizer adds one, not doubled when the text already begins with it (chat templates write it themselves), and
    no other special token (a continuation of the prompt must not be cut off by an EOS). Quiet about prompts longer
    than the tokenizer's `model_max_length`: the callers fit them to the model's positions."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = added_bos(tokenizer)
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def prompt_room(model: Any, reserved: int, what: str) -> int | None:
    """Tokens a prompt may keep: the model's positions less `reserved` (the tokens still to come), None when the
    limit is unknown. A `reserved` that leaves no room is refused: no truncation can make it fit."""
    limit = max_positions(model)
    if limit is None:
        return None
    if reserved >= limit:
        raise UsageError(f"{what}={reserved} leaves no room for a prompt in the model's {limit} positions; "
                         f"lower it below {limit}")
    return limit - reserved


def truncate_left(ids: list[int], room: int | None) -> tuple[list[int], bool]:
    """The last `room` tokens of a prompt that does not fit (as lm-eval truncates), and whether any were cut."""
    if room is None or len(ids) <= room:
        return ids, False
    return ids[-room:], True


class PromptOutputs(list):
    """Per-prompt results in the caller's order, plus `truncated`: for each prompt, whether it was cut from the left
    to fit the model's positions, so evaluations can report how many were."""

    def __init__(self, items: Iterable[Any] = (), truncated: Iterable[bool] = ()) -> None:
        super().__init__(items)
        self.truncated = list(truncated)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut a completion at the first stop string (generation of a batch runs until every row stops)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def end_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a completion: the tokenizer's EOS and pad, plus the generation config's EOS ids
    (chat models often stop on an end-of-turn token that differs from the tokenizer's EOS)."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos])
    return {int(i) for i in ids if i is not None}


def _pad_and_ends(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, torch.Tensor]:
    """The id that pads a batch (the EOS where the tokenizer has no pad) and every end id (`end_ids`), sorted."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_id, torch.tensor(sorted(end_ids(model, tokenizer)))


def _fit_prompts(model: Any, rows: Sequence[Sequence[int]], max_new_tokens: int
                 ) -> tuple[int | None, list[list[int]], list[bool]]:
    """Each prompt row cut on the left to the model's positions less `max_new_tokens` (`truncate_left`): the room,
    the rows, and which were cut. A budget that fills the positions is refused (`prompt_room`)."""
    room = prompt_room(model, max_new_tokens, "max_new_tokens")
    fitted = [truncate_left(list(r), room) for r in rows]
    return room, [ids for ids, _ in fitted], [cut for _, cut in fitted]


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             config: DecodingConfig | None = None, batch_size: int = 16, progress: bool = True,
             desc: str = "generate",
             on_batch: Callable[[list[int], list[list[str]]], None] | None = None,
             seed_ids: Sequence[int] | None = None) -> PromptOutputs:
    """Complete every prompt `config.num_samples` times; returns one list of completions per prompt, in order.

    Prompts are full strings (apply `format_prompt` first), encoded by `encode_prompt` (one BOS where the model
    expects it, never a chat template's BOS twice). A prompt longer than the model's positions less
    `config.max_new_tokens` keeps its last tokens (lm-eval's left truncation), is marked in the result's `truncated`
    and logged; a budget that fills the positions is refused. `on_batch(indices, completions)` is called after each
    batch with the caller's prompt indices, so a caller can persist results before the whole call ends. Sampling
    draws from one generator per (prompt, sample), seeded from `config.seed` and the prompt's id — `seed_ids[i]`
    (e.g. its index in a larger list), else its position here — so the answers depend neither on the batch size nor,
    with `seed_ids`, on which other prompts share the call (a resumed or sharded caller draws the same answers).
    """
    config = config or DecodingConfig()
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size} is invalid; it must be >= 1")
    if seed_ids is not None and len(seed_ids) != len(prompts):
        raise ValueError(f"seed_ids has {len(seed_ids)} entries for {len(prompts)} prompts")
    ids_for_seed = list(seed_ids) if seed_ids is not None else list(range(len(prompts)))
    pad_id, ends = _pad_and_ends(model, tokenizer)
    room, encoded, truncated = _fit_prompts(model, [encode_prompt(tokenizer, p) for p in prompts],
                                            config.max_new_tokens)
    if any(truncated):
        log.warning("%d of %d prompts do not fit the model's %d positions with %d new tokens; kept their last %d "
                    "tokens", sum(truncated), len(prompts), max_positions(model), config.max_new_tokens, room)
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    results = PromptOutputs([[] for _ in prompts], truncated)
    was_training = model.training
    model.eval()
    new_tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, disable=None if progress else True, unit="prompt", leave=False)
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            rows = [(i, s) for i in idx for s in range(config.num_samples)]
            outputs = _decode(model, [encoded[i] for i, _ in rows], config, pad_id, ends,
                              [config.seed * 1_000_003 + ids_for_seed[i] * config.num_samples + s for i, s in rows],
                              tokenizer)
            for (i, _), tokens in zip(rows, outputs, strict=True):
                new_tokens += len(tokens)
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                results[i].append(truncate_at_stop(text, config.stop))
            if on_batch is not None:
                on_batch(list(idx), [results[i] for i in idx])
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
    finally:
        bar.close()
        model.train(was_training)
    return results


def _decode(model: PreTrainedModel, rows: list[list[int]], config: DecodingConfig, pad_id: int,
            ends: torch.Tensor, seeds: list[int], tokenizer: PreTrainedTokenizerBase,
            keep_end: bool = False) -> list[list[int]]:
    """Decode a batch of token rows with the KV cache; each row leaves the batch as soon as it ends (an end id, a
    stop string or the token budget), so no compute goes to finished rows. Returns each row's new tokens, without
    the end id unless `keep_end`."""
    state, logits = prefill(model, rows, pad_id, extra_columns=config.max_new_tokens)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(config.temperature), TopPLogitsWarper(config.top_p)]
                                  if config.do_sample else [])
    generators = [torch.Generator().manual_seed(s) for s in seeds] if config.do_sample else []
    out: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows)))
    for step in range(config.max_new_tokens):
        if config.do_sample:
            probs = torch.softmax(warpers(None, logits.float()), dim=-1).cpu()
            picks = torch.stack([torch.multinomial(probs[r], 1, generator=generators[a])[0]
                                 for r, a in enumerate(active)])
        else:
            picks = logits.argmax(dim=-1).cpu()
        ended = torch.isin(picks, ends).tolist()
        keep = []
        for r, (a, token, end) in enumerate(zip(active, picks.tolist(), ended, strict=True)):
            if not end or keep_end:
                out[a].append(token)
            if not end and not _stops(tokenizer, out[a], config):
                keep.append(r)
        if not keep or step == config.max_new_tokens - 1:
            break
        if len(keep) < len(active):
            state.select(torch.tensor(keep))
            active = [active[r] for r in keep]
        logits = state.extend(picks[keep][:, None], logits_to_keep=1)[:, -1]
    return out


@torch.no_grad()  # not inference mode: called between training steps, whose tensors must stay usable by autograd
def generate_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sequence[int]],
                 config: DecodingConfig, seeds: Sequence[int], keep_end: bool = False) -> list[list[int]]:
    """`generate` for a caller that holds token ids (on-policy distillation, `gradual.onpolicy`): one batch of
    prompt rows, decoded by the same shared-prefix, early-exit decoder, in eval mode (the model's mode is restored).

    Args:
        rows: prompt token ids, one list per row (encoded as `encode_prompt` does); a row longer than the model's
            positions less `config.max_new_tokens` keeps its last tokens.
        config: the decoding; `num_samples` must be 1 and `stop` strings are honoured as in `generate`.
        seeds: one sampling seed per row (ignored when greedy).
        keep_end: keep the end id that ended a row as its last new token (a row cut by the budget has none).

    Returns each row's new token ids, in row order.
    """
    if config.num_samples != 1:
        raise UsageError(f"num_samples={config.num_samples} is invalid here; generate_ids samples once per row")
    if len(seeds) != len(rows):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(rows)} rows")
    if not rows:
        return []
    _, prompts, _ = _fit_prompts(model, rows, config.max_new_tokens)
    pad_id, ends = _pad_and_ends(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, prompts, config, pad_id, ends, list(seeds), tokenizer, keep_end=keep_end)
    finally:
        model.train(was_training)


def _stops(tokenizer: PreTrainedTokenizerBase, tokens: list[int], config: DecodingConfig) -> bool:
    """Whether a reply is complete: it holds a stop string, or (`stop_at_line_end`) a non-blank line has ended.
    For stop strings the text of the last tokens suffices: a token decodes to at least one character, so a tail of
    as many tokens as the longest stop string has characters holds any stop string that just appeared."""
    if config.stop_at_line_end and "\n" in tokenizer.decode(tokens, skip_special_tokens=True).lstrip():
        return True
    if not config.stop:
        return False
    tail = tokenizer.decode(tokens[-max(len(s) for s in config.stop) - 1:], skip_special_tokens=True)
    return any(s in tail for s in config.stop)


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
