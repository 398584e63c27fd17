"""Batched log-likelihood of continuations, for the classification (multiple-choice) form of a task.

Pairs are sorted by length and right-padded, so positions start at 0 in every row and no position ids are needed;
only the logits of the span that holds continuation tokens are computed (`logits_to_keep`), which keeps memory
small for a 50k-token vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as they appear when the two strings are joined.

    Encoding the joined string and splitting after the context's tokens keeps merges across the boundary (a leading
    space belongs to the continuation's first token); if the context's tokens are not a prefix of the joint
    encoding, the continuation is encoded on its own.
    """
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def continuation_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                          pairs: Sequence[tuple[str, str]], batch_size: int = 16, progress: bool = True,
                          desc: str = "score") -> list[float]:
    """Summed log-probability of each continuation given its context, in the caller's order."""
    encoded = [encode_pair(tokenizer, c, x) for c, x in pairs]
    for (ctx, cont), (c, x) in zip(encoded, pairs, strict=True):
        if not ctx or not cont:
            raise ValueError(f"context {c[-40:]!r} and continuation {x!r} must both encode to at least one token")
    order = sorted(range(len(pairs)), key=lambda i: (-(len(encoded[i][0]) + len(encoded[i][1])), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    scores = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(pairs), desc=desc, disable=not progress, unit="choice", leave=False)
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            rows = [encoded[i][0] + encoded[i][1] for i in idx]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            first = min(len(encoded[i][0]) for i in idx) - 1  # position predicting the earliest continuation token
            last = max(len(r) for r in rows) - 1
            keep = torch.arange(first, last, device=device)
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
        model.train(was_training)
    return scores
