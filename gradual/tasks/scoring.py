"""Log-likelihood of continuations, for the classification (multiple-choice) form of a task.

Two equivalent paths (tested to agree):
- cached (default): the token prefix every context shares (the few-shot examples, or a chat template's system
  turn) runs once per batch; the distinct contexts of a batch then run together on that KV cache
  (`gradual.kvcache`), and the remaining tokens of every context's k-th choice run together on a copy of the
  contexts' cache, one choice slot after another. On CPU this is ~5x less compute than rerunning the few-shot
  examples for every choice. The split is made on token ids, never on strings, so no tokenization changes.
- batched: pairs sorted by length and right-padded (positions start at 0 in every row, no position ids needed).
Both compute logits only where continuation tokens are predicted (`logits_to_keep`), which keeps memory small for
a 50k-token vocabulary. Contexts are encoded by `encode_prompt` (the model's BOS once), continuations without special
tokens; a context too long for the model's positions keeps its last tokens, as lm-eval truncates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.generation import PromptOutputs, encode_prompt, max_positions, truncate_left
from gradual.kvcache import prefill

log = logging.getLogger(__name__)


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as they appear when the two strings are joined.

    Encoding the joined string and splitting after the context's tokens keeps merges across the boundary (a leading
    space belongs to the continuation's first token); if the context's tokens are not a prefix of the joint
    encoding, the continuation is encoded on its own. The context starts as every prompt does (`encode_prompt`).
    """
    ctx = encode_prompt(tokenizer, context)
    whole = encode_prompt(tokenizer, context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def continuation_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                          pairs: Sequence[tuple[str, str]], batch_size: int = 16, progress: bool = True,
                          desc: str = "score", prefix_cache: bool = True) -> PromptOutputs:
    """Summed log-probability of each continuation given its context, in the caller's order.

    A context whose pair does not fit the model's positions keeps its last tokens (the model sees at most the
    positions: the context and all but the last continuation token); `truncated` marks those pairs. A continuation
    longer than the positions is refused."""
    limit = max_positions(model)
    encoded, truncated = [], []
    for c, x in pairs:
        ctx, cont = encode_pair(tokenizer, c, x)
        if not ctx or not cont:
            raise ValueError(f"context {c[-40:]!r} and continuation {x!r} must both encode to at least one token")
        if limit is not None and len(cont) > limit:
            raise UsageError(f"continuation {x[:40]!r} has {len(cont)} tokens, more than the model's {limit} "
                             "positions")
        ctx, cut = truncate_left(ctx, None if limit is None else limit + 1 - len(cont))
        encoded.append((ctx, cont))
        truncated.append(cut)
    if any(truncated):
        log.warning("%d of %d contexts do not fit the model's %d positions with their continuation; kept their last "
                    "tokens", sum(truncated), len(pairs), limit)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        scores = (_cached if prefix_cache else _batched)(model, encoded, pad_id, batch_size, progress, desc)
        return PromptOutputs(scores, truncated)
    finally:
        model.train(was_training)


def _cached(model: PreTrainedModel, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
            progress: bool, desc: str) -> list[float]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(encoded):
        groups.setdefault(tuple(ctx), []).append(i)
    contexts = sorted(groups, key=len)
    scores = [0.0] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, disable=None if progress else True, unit="choice", leave=False)
    try:
        for lo in range(0, len(contexts), batch_size):
            batch = contexts[lo:lo + batch_size]
            pairs = [(j, i) for j, ctx in enumerate(batch) for i in groups[ctx]]
            state, last = prefill(model, [list(c) for c in batch], pad_id,
                                  extra_columns=max(len(encoded[i][1]) for _, i in pairs))
            first = torch.log_softmax(last.float(), dim=-1)
            for j, i in pairs:
                scores[i] = float(first[j, encoded[i][1][0]])
            for k in range(max(len(groups[ctx]) for ctx in batch)):  # the k-th choice of every context at once
                members = [(j, groups[ctx][k]) for j, ctx in enumerate(batch) if k < len(groups[ctx])]
                width = max(len(encoded[i][1]) for _, i in members) - 1
                if width <= 0:
                    continue
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                targets = torch.zeros((len(batch), width), dtype=torch.long)
                real = torch.zeros((len(batch), width), dtype=torch.long)
                for j, i in members:
                    cont = encoded[i][1]
                    ids[j, :len(cont) - 1] = torch.tensor(cont[:-1])
                    targets[j, :len(cont) - 1] = torch.tensor(cont[1:])
                    real[j, :len(cont) - 1] = 1
                logits = state.fork().extend(ids, real).float()
                picked = logits.gather(-1, targets[..., None].to(logits.device))[..., 0] - logits.logsumexp(-1)
                rest = (picked * real.to(picked.device)).sum(-1).cpu()
                for j, i in members:
                    scores[i] += float(rest[j])
            bar.update(len(pairs))
    finally:
        bar.close()
    return scores


def _batched(model: PreTrainedModel, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
             progress: bool, desc: str) -> list[float]:
    order = sorted(range(len(encoded)), key=lambda i: (-(len(encoded[i][0]) + len(encoded[i][1])), i))
    device = next(model.parameters()).device
    scores = [0.0] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, disable=None if progress else True, unit="choice", leave=False)
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            rows = [encoded[i][0] + encoded[i][1][:-1] for i in idx]  # the last token predicts nothing needed
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            first = min(len(encoded[i][0]) for i in idx) - 1  # position predicting the earliest continuation token
            keep = torch.arange(first, width, device=device)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for r, i in enumerate(idx):
                ctx, cont = encoded[i]
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=device) - first
                target = torch.tensor(cont, device=device)
                scores[i] = float(logp[r, pos, target].sum())
            bar.update(len(idx))
    finally:
        bar.close()
    return scores
