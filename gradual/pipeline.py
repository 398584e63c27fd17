"""One pruning stage, step by step. `GradualModule`'s Lightning hooks call these in this order:

1. **choose** (`choose_layers`): the current layers to remove — the importance metric scored on the current, healed
   model (`gradual.importance`; `task_ablation` greedily, on the `select` split's problems), the next of the first
   stage's ranking (`selection.rescore: false`), or the next of `schedule.layers`; chosen on rank 0 and broadcast.
2. **repair** (`repair_cuts`, with `model.repair: lstsq`): a least-squares map folded into the block before each cut.
3. **remove** (`gradual.surgery.remove_layers`).
4. **make trainable** (`make_trainable`): fresh LoRA adapters, or full weights (all layers, or those near the cuts).
5. **train**: Lightning's loop over `GradualModule.training_step` and `gradual.distill.RecoveryObjective`.
6. **merge** (`merge_trained`): FSDP shards gathered back, adapters merged into the base weights.
7. **evaluate**, 8. **propose**, 9. **decide** and **save**: the callbacks (`gradual.callbacks`), the verdict decided
   once in `gradual.stages.StageHistory.conclude` by `StageCheckpoint`, which then saves the stage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from gradual import importance, ranks, sharding, surgery
from gradual.distill import Recovery
from gradual.errors import UsageError
from gradual.lora import LoraSettings, attach_lora, has_4bit, merge_lora, quantize_nf4
from gradual.repair import apply_repairs, plan_repairs
from gradual.stages import Selection

Batches = list[dict[str, torch.Tensor]]


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time, in seconds, to `timings[name]`."""
    t = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


def score_and_choose(model: torch.nn.Module, k: int, selection: Selection, calibration: Callable[[], Batches],
                     seed: int, explicit: Sequence[int] | None = None, removed: Sequence[int] = (),
                     ranking: Sequence[int] | None = None,
                     score_fn: importance.ScoreFn | None = None) -> tuple[list[int], dict[str, Any]]:
    """Current indices of the `k` layers to remove now, and what chose them, on this process alone.

    The record holds the metric, its scores per current layer (None where a layer was not scored: protected under
    `task_ablation`), their original indices and `ranking`: every unprotected original index in removal order (the
    chosen ones first), which `selection.rescore: false` follows at the later stages. `task_ablation` adds the
    unskipped score (`baseline`) and the score with the chosen layers skipped after each greedy round
    (`round_scores`).

    Args:
        explicit: `schedule.layers` (original indices, in order); the next `k` not yet in `removed` are taken.
        ranking: the first stage's `ranking` under `selection.rescore: false`: the next `k` still in the model are
            taken, nothing is scored.
        calibration: the selection's calibration batches, called only when a metric scores them.
        seed: seeds the metric's ties and `random` (the run's seed plus the stage).
        score_fn: `task_ablation`'s score (`gradual.tasks.selection.TaskScore`), searched greedily
            (`importance.greedy_ablation`).
    """
    kept = surgery.original_indices(model)
    if explicit is not None:
        todo = [i for i in explicit if i not in set(removed)][:k]
        return [kept.index(i) for i in todo], {"metric": "explicit", "layers": todo}
    if ranking is not None:
        todo = [i for i in ranking if i in kept][:k]
        if len(todo) < k:
            raise RuntimeError(f"the unpruned model's ranking {list(ranking)} has {len(todo)} layers left, not {k}")
        return sorted(kept.index(i) for i in todo), {"metric": selection.metric, "rescored": False, "layers": todo,
                                                     "ranking": list(ranking)}
    record: dict[str, Any] = {}
    if selection.metric == "task_ablation":
        if score_fn is None:
            raise UsageError("selection.metric='task_ablation' needs a score_fn (gradual.tasks.selection.TaskScore)")
        scores, picked, after = importance.greedy_ablation(model, k, score_fn, protect_first=selection.protect_first,
                                                           protect_last=selection.protect_last)
        record = {"baseline": scores.baseline, "round_scores": [_finite(s) for s in after]}
    else:
        scores = importance.score_layers(model, calibration(), selection.metric, span=selection.span, seed=seed)
        chosen = scores.choose(k, protect_first=selection.protect_first, protect_last=selection.protect_last)
        picked = [i for i in scores.order(selection.protect_first, selection.protect_last) if i in chosen]
        picked += [i for i in chosen if i not in picked]
    order = picked + [i for i in scores.order(selection.protect_first, selection.protect_last) if i not in picked]
    return sorted(picked), {"metric": scores.metric, "scores": [_finite(s) for s in scores.scores],
                            "original": list(scores.original_indices),
                            "ranking": [scores.original_indices[i] for i in order], **record}


def _finite(value: float) -> float | None:
    """A score as JSON can hold it: None for one that is not finite (not scored, or a diverged model's NaN)."""
    return float(value) if math.isfinite(value) else None


def choose_layers(*args: Any, **kwargs: Any) -> tuple[list[int], dict[str, Any]]:
    """`score_and_choose` on rank 0, its choice broadcast: under DDP every rank removes what rank 0 chose
    (`ranks.decide_on_rank0`), whatever its own scores say."""
    return ranks.decide_on_rank0(lambda: score_and_choose(*args, **kwargs))


def repair_cuts(model: torch.nn.Module, chosen: list[int], method: str, calibration: Batches) -> dict[str, Any]:
    """Fit the repair of every cut on rank 0 (ranks must hold the same weights) and apply it on all; returns its
    record for the stage's `importance`."""
    repairs = ranks.decide_on_rank0(lambda: plan_repairs(model, chosen, calibration))
    apply_repairs(model, repairs)
    return {"method": method, "spans": [r.to_dict() for r in repairs]}


def make_trainable(model: torch.nn.Module, recovery: Recovery, lora: LoraSettings, quantize: str | None,
                   original_depth: int) -> torch.nn.Module:
    """`recovery.params`: fresh LoRA adapters (on an NF4 base with `quantize: nf4`), or full weights of every
    decoder layer (`full`) / of the layers next to the cuts (`near_cut`), plus the final norm. Everything else
    stays frozen. Returns the model to train (a peft wrapper for LoRA)."""
    if recovery.params == "lora":
        if quantize == "nf4" and not has_4bit(model):
            model = quantize_nf4(model)
        return attach_lora(model, lora)
    layers = surgery.decoder_layers(model)
    positions: Sequence[int] = range(len(layers))
    if recovery.params == "near_cut":
        positions = surgery.near_cuts(surgery.original_indices(model), recovery.near_cut_layers, depth=original_depth)
    for p in model.parameters():
        p.requires_grad_(False)
    for i in positions:
        for p in layers[i].parameters():
            p.requires_grad_(True)
    for p in surgery.final_norm(model).parameters():
        p.requires_grad_(True)
    return model


def merge_trained(model: torch.nn.Module, recovery: Recovery) -> torch.nn.Module:
    """The trained model as a plain, frozen HF model: FSDP shards gathered back (`gradual.sharding`), LoRA adapters
    merged into the base weights (a 4-bit base de-quantised), so callbacks evaluate and save what they see."""

    if sharding.is_sharded(model):
        model = sharding.unshard(model)
    if recovery.params == "lora":
        model = merge_lora(model, requantize=False)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model
