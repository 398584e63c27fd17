"""Rank decoder layers by how much the model needs them, so pruning removes the least important first.

Convention: a HIGHER score means MORE important; `LayerScores.order()` lists current layer indices from the
least to the most important (the removal order).

Metrics (`METRICS`):
- ``block_influence`` (ShortGPT): BI_i = 1 − mean over all non-padding calibration tokens of
  cos(input_i, output_i). A layer that barely rotates the residual stream has BI ≈ 0 and goes first.
- ``angular_distance`` (Gromov et al.) with span n: d(l, n) = arccos(cos(h_l, h_{l+n})) / π on the last
  non-padding token of each sequence, averaged over sequences, where h_l is the input of layer l and h_{l+n} the
  output of layer l+n−1. The block with the smallest d is dropped first (`best_span`, `LayerScores.choose(n)`).
  Per-layer importance: layer i gets the smallest d(l, n) over the blocks l..l+n−1 that contain it, i.e. a layer
  is as removable as the most removable block it belongs to. For n = 1 this is exactly d(i, 1), and for any n
  the layers of the best block share the lowest score, so `order()[:n]` is that block.
- ``reverse``: deepest first but the final layer is kept for last: layer N−2 is least important, then N−3, …,
  0, and layer N−1 is the most important.
- ``calibration_loss`` (SLEB / Shortened LLaMA): mean next-token NLL on the calibration batches with the layer
  skipped in place; a higher loss without it means more important. `LayerScores.baseline` is the unskipped loss.
- ``taylor`` (Shortened LLaMA Taylor+): Σ |w · ∂L/∂w| over the layer's weights, from one backward pass of the
  mean calibration NLL. The model's requires_grad flags and existing .grad tensors are restored afterwards.
- ``random``: a seeded random permutation of 0..N−1 (a baseline for comparisons).
- ``task_ablation`` (the seed paper's greedy search step, arXiv 2602.01997): `score_fn(model)` (higher is better)
  is evaluated with each layer skipped; importance = baseline − score, the drop the skip causes. The layer whose skip
  hurts least goes first. `LayerScores.baseline` is the unskipped score. `greedy_ablation` is the whole search for k
  layers: one such round per layer removed, each on top of the layers already chosen. In `gradual fit` the score is
  `gradual.tasks.selection.TaskScore`: generative tasks' problems of the `select` split.

The hidden-state metrics take ONE forward pass over the batches, with hooks on the decoder layers (HF's
`hidden_states[-1]` is after the final norm, so it cannot serve as the last layer's output). Cosines are
computed in float32 and accumulated per token; padding is excluded through the attention mask, so the batch
composition and the padded length do not change any score.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gradual.errors import UsageError
from gradual.generation import encode_prompt, max_positions
from gradual.jsonl import read_jsonl
from gradual.surgery import decoder_layers, original_indices, skip_layers

METRICS: tuple[str, ...] = (
    "block_influence",
    "angular_distance",
    "reverse",
    "calibration_loss",
    "taylor",
    "random",
    "task_ablation",
)

Batch = dict[str, torch.Tensor]
ScoreFn = Callable[[nn.Module], float]
log = logging.getLogger(__name__)


@dataclass
class LayerScores:
    """Importance of every current decoder layer (higher = more important) and how it was measured."""

    metric: str
    scores: list[float]
    original_indices: list[int]
    span: int = 1
    span_scores: list[float] | None = None  # angular_distance: d(l, span) for each block start l
    baseline: float | None = None  # calibration_loss / task_ablation: the value with no layer skipped

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.original_indices):
            raise ValueError(f"{len(self.scores)} scores for {len(self.original_indices)} layers")

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    def _candidates(self, protect_first: int, protect_last: int) -> list[int]:
        if protect_first < 0 or protect_last < 0:
            raise UsageError(f"protect_first={protect_first}, protect_last={protect_last} are invalid; need >= 0")
        return list(range(protect_first, self.num_layers - protect_last))

    def order(self, protect_first: int = 0, protect_last: int = 0) -> list[int]:
        """Current indices from least to most important, leaving out the first/last protected layers."""
        candidates = self._candidates(protect_first, protect_last)
        return sorted(candidates, key=lambda i: (_sort_key(self.scores[i]), i))

    def choose(self, k: int, protect_first: int = 0, protect_last: int = 0) -> list[int]:
        """The k layers to remove now, ascending. For angular_distance scored with span k: the best block."""
        available = len(self._candidates(protect_first, protect_last))
        if not 0 <= k <= available:
            raise UsageError(f"cannot choose {k} layers; {available} of {self.num_layers} are unprotected")
        if self.span_scores is not None and k == self.span > 1:
            return best_span(self.span_scores, k, protect_first=protect_first, protect_last=protect_last)
        return sorted(self.order(protect_first, protect_last)[:k])

    def table(self) -> list[dict[str, int | float]]:
        """Rows in removal order: rank (1 = removed first), current layer, original layer, score."""
        return [
            {"rank": rank, "layer": i, "original": self.original_indices[i], "score": self.scores[i]}
            for rank, i in enumerate(self.order(), start=1)
        ]


def _sort_key(score: float) -> float:
    # A NaN score (a diverged model) sorts as most important so it is never removed by accident.
    return math.inf if math.isnan(score) else score


def best_span(span_scores: Sequence[float], n: int, *, protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """Gromov's rule: the contiguous block l*..l*+n−1 with the smallest d(l, n), avoiding protected layers.

    `span_scores[l]` is d(l, n) for l = 0..N−n (as in `LayerScores.span_scores`); ties go to the shallower block.
    """
    num_layers = len(span_scores) + n - 1
    starts = [s for s in range(len(span_scores)) if s >= protect_first and s + n <= num_layers - protect_last]
    if n < 1 or not starts:
        raise UsageError(f"no block of {n} layers fits in {num_layers} layers with "
                         f"protect_first={protect_first}, protect_last={protect_last}")
    start = min(starts, key=lambda s: (_sort_key(span_scores[s]), s))
    return list(range(start, start + n))


# ---------------------------------------------------------------------------------------------------------------
# Calibration data


def _builtin_texts() -> list[str]:
    """The packaged prompts; code snippets there write their line breaks as a literal backslash-n."""
    text = resources.files("gradual").joinpath("resources/calibration.txt").read_text(encoding="utf-8")
    return [line.strip().replace("\\n", "\n") for line in text.splitlines() if line.strip()]


def _read_file_texts(path: Path, field_name: str) -> list[str]:
    if not path.is_file():
        raise UsageError(f"calibration file not found: {path} (give a .txt with one text per line, "
                         f"a .jsonl with a '{field_name}' field, or nothing for the built-in prompts)")
    if path.suffix.lower() not in (".jsonl", ".json"):
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = []
    for place, record in read_jsonl(path):
        if not isinstance(record.get(field_name), str):
            raise UsageError(f"{place} has no string field '{field_name}'; set the text field name")
        if record[field_name].strip():
            texts.append(record[field_name])
    return texts


def calibration_texts(source: str | Path | Sequence[str] | None = None, n: int | None = 32, seed: int = 0,
                      field_name: str = "text") -> list[str]:
    """Calibration texts from a list of strings, a .jsonl file (field `field_name`), a .txt file (one text per
    line) or, for None / "builtin", the packaged prompts. More than `n` texts → a seeded sample of n.
    """
    if n is not None and n < 1:
        raise UsageError(f"n={n} calibration texts is invalid; need >= 1")
    if source is None or (isinstance(source, str) and source == "builtin"):
        texts = _builtin_texts()
    elif isinstance(source, (str, Path)):
        texts = _read_file_texts(Path(source), field_name)
    else:
        texts = [t for t in source if isinstance(t, str) and t.strip()]
        if len(texts) != len(source):
            raise UsageError("calibration texts must be non-empty strings")
    if not texts:
        raise UsageError(f"no calibration texts found in {source!r}")
    if n is not None and len(texts) > n:
        texts = random.Random(seed).sample(texts, n)
    return texts


def calibration_batches(tokenizer: Any, texts: Sequence[str], batch_size: int = 8,
                        max_length: int = 256) -> list[Batch]:
    """Tokenise (with the tokenizer's BOS once, as `encode_prompt`), keep the first `max_length` tokens and
    right-pad into batches of similar length. `score_layers` cuts them further to the model's positions.

    Texts are sorted longest first so batches waste little padding and the largest batch runs first.
    """
    if batch_size < 1 or max_length < 1:
        raise UsageError(f"batch_size={batch_size}, max_length={max_length} are invalid; both must be >= 1")
    encoded = [encode_prompt(tokenizer, t)[:max_length] for t in texts]
    encoded = sorted((ids for ids in encoded if ids), key=len, reverse=True)
    if not encoded:
        raise UsageError("calibration texts produced no tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return [_pad_right(encoded[i:i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)]


def fit_positions(batches: list[Batch], limit: int | None) -> list[Batch]:
    """Right-padded batches cut to the model's `limit` positions (a text loses its end, as `max_length` cuts it),
    so a `max_length` above the model's limit cannot index past its position table; logs how many texts lost
    tokens."""
    if limit is None:
        return batches
    cut = sum(int((b["attention_mask"].sum(-1) > limit).sum()) for b in batches)
    if not cut:
        return batches
    log.warning("%d of %d calibration texts are longer than the model's %d positions; kept their first %d tokens",
                cut, sum(len(b["input_ids"]) for b in batches), limit, limit)
    return [{key: value[:, :limit] for key, value in b.items()} for b in batches]


def _pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> Batch:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def score_layers(model: nn.Module, batches: Iterable[Batch] | None, metric: str, *, span: int = 1, seed: int = 0,
                 score_fn: ScoreFn | None = None, progress: bool = True) -> LayerScores:
    """Score every current decoder layer of `model` with `metric` (see the module docstring)."""
    if metric not in METRICS:
        raise UsageError(f"unknown importance metric {metric!r}; allowed: {', '.join(METRICS)}")
    layers = decoder_layers(model)
    num = len(layers)
    originals = original_indices(model)
    batches = fit_positions(list(batches or []), max_positions(model))
    if metric in ("block_influence", "angular_distance", "calibration_loss", "taylor") and not batches:
        raise UsageError(f"metric {metric!r} needs calibration batches; none were given")

    if metric in ("block_influence", "angular_distance"):
        if not 1 <= span <= num:
            raise UsageError(f"span={span} is invalid; it must be between 1 and the {num} layers")
        with eval_mode(model):
            bi, spans = _hidden_state_scores(model, layers, batches, span if metric == "angular_distance" else 1,
                                             progress)
        if metric == "block_influence":
            return LayerScores(metric, bi, originals)
        per_layer = [min(spans[max(0, i - span + 1):min(i, num - span) + 1]) for i in range(num)]
        return LayerScores(metric, per_layer, originals, span=span, span_scores=spans)
    if metric == "reverse":
        return LayerScores(metric, [float(num - 1 if i == num - 1 else num - 2 - i) for i in range(num)], originals)
    if metric == "random":
        return LayerScores(metric, [float(v) for v in random.Random(seed).sample(range(num), num)], originals)
    if metric == "calibration_loss":
        with eval_mode(model), torch.inference_mode():
            baseline, losses = _skip_each(model, num, lambda m: _mean_nll(m, batches), progress, metric)
        return LayerScores(metric, losses, originals, baseline=baseline)
    if metric == "taylor":
        with eval_mode(model):
            return LayerScores(metric, _taylor_scores(model, layers, batches, progress), originals)
    if score_fn is None:
        raise UsageError("metric 'task_ablation' needs a score_fn(model) -> float (higher is better)")
    with eval_mode(model), torch.no_grad():
        baseline, skipped = _skip_each(model, num, lambda m: float(score_fn(m)), progress, metric)
    return LayerScores(metric, [baseline - s for s in skipped], originals, baseline=baseline)


def greedy_ablation(model: nn.Module, k: int, score_fn: ScoreFn, *, protect_first: int = 0, protect_last: int = 0,
                    progress: bool = True) -> tuple[LayerScores, list[int], list[float]]:
    """The seed paper's greedy layer search (arXiv 2602.01997) for `k` layers: in round r, every unprotected layer
    not yet chosen is skipped in turn on top of the r − 1 already chosen, and the one whose skip leaves the highest
    score is chosen (ties: the shallower). One round per layer removed: 1 + Σ_r (C − r + 1) scorings for C
    candidates, never the C^k of an exhaustive search.

    Returns the first round's `LayerScores` (`task_ablation`: baseline − score with the layer skipped; protected
    layers are not scored and read +inf, most important), the chosen current indices in the order chosen, and the
    score after each round's choice."""
    num = len(decoder_layers(model))
    candidates = LayerScores("task_ablation", [0.0] * num, [0] * num)._candidates(protect_first, protect_last)
    if not 0 <= k <= len(candidates):
        raise UsageError(f"cannot choose {k} layers; {len(candidates)} of {num} are unprotected")
    chosen: list[int] = []
    after: list[float] = []
    first: dict[int, float] = {}
    with eval_mode(model), torch.no_grad():
        baseline = float(score_fn(model))
        for r in range(k):
            scored = {}
            for index in tqdm([c for c in candidates if c not in chosen], desc=f"task_ablation {r + 1}/{k}",
                              disable=None if progress else True, leave=False):
                with skip_layers(model, [*chosen, index]):
                    scored[index] = float(score_fn(model))
            first = first or scored
            best = max(scored, key=lambda i: (-math.inf if math.isnan(scored[i]) else scored[i], -i))
            chosen.append(best)
            after.append(scored[best])
    scores = [baseline - first[i] if i in first else math.inf for i in range(num)]
    return LayerScores("task_ablation", scores, original_indices(model), baseline=baseline), chosen, after


def format_table(scores: LayerScores) -> str:
    """A plain-text table of `scores.table()` for the CLI, least important first."""
    title = f"{scores.metric}" + (f" (span {scores.span})" if scores.span > 1 else "")
    if scores.baseline is not None:
        title += f"; baseline {scores.baseline:.6g}"
    lines = [title, f"{'rank':>4}  {'layer':>5}  {'original':>8}  {'score':>12}"]
    lines += [f"{r['rank']:>4}  {r['layer']:>5}  {r['original']:>8}  {r['score']:>12.6g}" for r in scores.table()]
    return "\n".join(lines)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Measure without dropout, then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _forward(model: nn.Module, batch: Batch, device: torch.device) -> Any:
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                 use_cache=False)


def layer_output(value: Any) -> torch.Tensor:
    """The hidden state a decoder layer returned (some return a tuple, some the tensor alone)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _hidden_state_scores(model: nn.Module, layers: nn.ModuleList, batches: list[Batch], span: int,
                         progress: bool) -> tuple[list[float], list[float]]:
    """One forward pass: per-layer block influence and d(l, span) for every block start l."""
    num = len(layers)
    cos_sums = [0.0] * num
    angle_sums = [0.0] * (num - span + 1)
    tokens = 0
    sequences = 0
    current: dict[str, Any] = {}

    def hook(index: int) -> Callable[..., None]:
        def capture(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = layer_output(output).float()
            keep = current["mask"].to(h_in.device)
            cos = F.cosine_similarity(h_in, h_out, dim=-1)
            cos_sums[index] += cos[keep].sum().item()
            rows = torch.arange(h_in.shape[0], device=h_in.device)
            last = current["last"].to(h_in.device)
            if index == 0:
                current["states"][0] = h_in[rows, last].cpu()
            current["states"][index + 1] = h_out[rows, last].cpu()
        return capture

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = _input_device(model)
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="hidden states", disable=None if progress else True, leave=False):
                mask = batch["attention_mask"].bool()
                positions = torch.arange(mask.shape[1]).expand_as(mask)
                current.update(mask=mask, last=torch.where(mask, positions, 0).amax(dim=1), states={})
                _forward(model, batch, device)
                states, real = current["states"], mask.any(dim=1)
                for start in range(num - span + 1):
                    angles = _angle(states[start][real], states[start + span][real])
                    angle_sums[start] += angles.sum().item() / math.pi
                tokens += int(mask.sum())
                sequences += int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - s / tokens for s in cos_sums], [s / sequences for s in angle_sums]


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) per row, computed as 2·atan2(|â − b̂|, |â + b̂|): exact 0 for equal vectors, stable near 0."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    return 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))


def _nll_sum(model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over targets whose token and context token are both real (not padding)."""
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device).bool()
    logits = _forward(model, batch, device).logits
    valid = (mask[:, 1:] & mask[:, :-1]).to(logits.device)
    targets = ids[:, 1:].to(logits.device)[valid]
    return F.cross_entropy(logits[:, :-1][valid].float(), targets, reduction="sum"), int(valid.sum())


def _target_count(batches: list[Batch]) -> int:
    count = sum(int((b["attention_mask"][:, 1:].bool() & b["attention_mask"][:, :-1].bool()).sum()) for b in batches)
    if count == 0:
        raise UsageError("calibration texts are too short: every sequence has fewer than 2 tokens")
    return count


def _mean_nll(model: nn.Module, batches: list[Batch]) -> float:
    """Token-weighted mean NLL over all batches (independent of how texts were batched or padded)."""
    count = _target_count(batches)
    device = _input_device(model)
    return sum(_nll_sum(model, b, device)[0].item() for b in batches) / count


def _skip_each(model: nn.Module, num: int, measure: Callable[[nn.Module], float], progress: bool,
               desc: str) -> tuple[float, list[float]]:
    """`measure` on the intact model, then with each layer skipped in place in turn."""
    baseline = measure(model)
    values = []
    for index in tqdm(range(num), desc=desc, disable=None if progress else True, leave=False):
        with skip_layers(model, [index]):
            values.append(measure(model))
    return baseline, values


def _taylor_scores(model: nn.Module, layers: nn.ModuleList, batches: list[Batch], progress: bool) -> list[float]:
    """Σ|w·g| per layer from the gradient of the mean calibration NLL; grad flags and .grad restored after."""
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    layer_params = [[p for p in layer.parameters() if p.is_floating_point()] for layer in layers]
    count = _target_count(batches)
    device = _input_device(model)
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for group in layer_params:
            for p in group:
                p.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            for batch in tqdm(batches, desc="taylor", disable=None if progress else True, leave=False):
                plain = {k: batch[k].clone() for k in ("input_ids", "attention_mask")}
                nll, _ = _nll_sum(model, plain, device)
                (nll / count).backward()
            return [float(sum((p.detach().float() * p.grad.float()).abs().sum().item()
                              for p in group if p.grad is not None)) for group in layer_params]
    finally:
        for p, flag, grad in zip(params, saved_flags, saved_grads, strict=True):
            p.grad = grad
            p.requires_grad_(flag)
