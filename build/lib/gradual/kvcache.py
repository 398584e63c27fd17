"""Batched, cached forward passes over token rows that share a prefix — the engine of generation and choice scoring.

Evaluation prompts share their few-shot examples and chat prompts share the template's system turn, so the common
token prefix runs once at batch size 1 and its KV cache is repeated per row. Each row's own tokens follow, padded
on the left so every row's last token sits in the last column; the pads sit *between* the prefix and the row's
tokens, masked out, and every token gets an explicit position id, so a row sees exactly the keys and positions it
would see alone. Rows can then be dropped in place (finished generations), or the whole batch forked (to score
one answer choice per row at a time).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row."""
    n = min(len(r) for r in rows)
    first = rows[0]
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return n


def sliding_window(model: PreTrainedModel) -> int | None:
    """The smallest attention window of the model's sliding-window layers (Gemma 2/3, Mistral v0.1, ...), if any."""
    cache = DynamicCache(config=model.config)
    windows = [layer.sliding_window for layer in getattr(cache, "layers", []) if getattr(layer, "is_sliding", False)]
    return min(windows) if windows else None


def _cache_kwarg(model: PreTrainedModel) -> str:
    """transformers 5.2x calls the cache argument `cache`; earlier releases `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _output_cache(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@dataclass
class CachedRows:
    """The KV cache of a batch of rows plus what the next forward needs: the attention mask over every cached
    column (1 = a real token) and each row's next position id."""

    model: PreTrainedModel
    cache: Any
    mask: torch.Tensor
    next_pos: torch.Tensor

    def fork(self) -> CachedRows:
        """An independent copy to extend (e.g. with one answer choice per row) while this one stays as it is."""
        return CachedRows(self.model, copy.deepcopy(self.cache), self.mask, self.next_pos)

    def select(self, index: torch.Tensor) -> None:
        """Keep (or repeat) the rows in `index`, in that order."""
        index = index.to(self.mask.device)
        if self.cache is not None:
            self.cache.batch_select_indices(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]

    def extend(self, ids: torch.Tensor, real: torch.Tensor | None = None,
               logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """Run `ids` (rows × width) on the cache and append them; `real` marks which are tokens (pads may lead or
        trail). Returns the logits of the last `logits_to_keep` columns (0 = all)."""
        device = self.mask.device
        ids = ids.to(device)
        real = torch.ones_like(ids) if real is None else real.to(device)
        positions = self.next_pos[:, None] + (real.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([self.mask, real], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=logits_to_keep, **{_cache_kwarg(self.model): self.cache})
        self.cache, self.mask = _output_cache(out), mask
        self.next_pos = self.next_pos + real.sum(-1)
        return out.logits


def prefill(model: PreTrainedModel, rows: Sequence[Sequence[int]], pad_id: int,
            extra_columns: int = 0) -> tuple[CachedRows, torch.Tensor]:
    """Run every row once: the shared prefix at batch size 1, then each row's remaining tokens left-padded.

    Every row keeps at least its last token out of the shared part, since that token's logits predict what
    follows. A sliding window counts cache columns, so pads between the prefix and a row's tokens would shift it:
    when the rows plus `extra_columns` (tokens still to come) could outgrow the window, nothing is shared and the
    pads all lead, where they shift nothing. Returns the cached rows and the logits after each row's last token
    (rows × vocab)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("prefill needs at least one row and no empty row")
    device = next(model.parameters()).device
    window = sliding_window(model)
    fits = window is None or max(len(r) for r in rows) + extra_columns < window
    shared = min(common_prefix(rows), min(len(r) for r in rows) - 1) if fits else 0
    state = CachedRows(model, None, torch.ones((1, 0), dtype=torch.long, device=device),
                       torch.zeros(1, dtype=torch.long, device=device))
    if shared > 0:
        state.extend(torch.tensor([rows[0][:shared]]), logits_to_keep=1)
    state.select(torch.zeros(len(rows), dtype=torch.long))
    width = max(len(r) for r in rows) - shared
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        own = row[shared:]
        ids[i, width - len(own):] = torch.tensor(own)
        real[i, width - len(own):] = 1
    logits = state.extend(ids, real, logits_to_keep=1)
    return state, logits[:, -1]
