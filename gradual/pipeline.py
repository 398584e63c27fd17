"""One pruning stage, step by step. `GradualModule`'s Lightning hooks call these in this order:

1. **choose** (`LayerChooser`, `choose_layers`): the current layers to remove — the importance metric scored on
   the current, healed model (`gradual.importance`; `task_ablation` greedily, on the `select` split's problems), the
   next of the first stage's ranking (`selection.rescore: false`), or the next of `schedule.layers`; chosen on rank 0
   and broadcast.
2. **repair** (`repair_cuts`, with `model.repair: lstsq`): a least-squares map folded into the block before each cut.
3. **remove** (`gradual.surgery.remove_layers`).
4. **make trainable** (`make_trainable`): fresh LoRA adapters, or full weights (all layers, or those near the cuts).
5. **train**: the stage's loss and teacher (`stage_objective`), then Lightning's loop over
   `GradualModule.training_step` and `gradual.distill.RecoveryObjective`.
6. **merge** (`merge_trained`): FSDP shards gathered back, adapters merged into the base weights.
7. **evaluate**, 8. **propose**, 9. **decide** and **save**: the callbacks (`gradual.callbacks`), the verdict decided
   once in `gradual.stages.StageHistory.conclude` by `StageCheckpoint`, which then saves the stage.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from gradual import importance, ranks, sharding, surgery
from gradual.distill import Recovery, RecoveryObjective, Teacher
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


class LayerChooser:
    """Step 1 with what it keeps from stage to stage: the calibration batches (tokenised once per run), the
    `task_ablation` score (its problems and prompts built once), and the first stage's ranking that
    `selection.rescore: false` follows (read from the run's history, so a resumed run follows it too).

    Args:
        selection: how layers are ranked (`gradual.stages.Selection`).
        tokenizer: the model's tokenizer (calibration texts, task prompts).
        seed: the run's seed; a stage's metric is seeded with it plus the stage.
        explicit: `schedule.layers` (original indices, in order), or None.
    """

    def __init__(self, selection: Selection, tokenizer: Any, seed: int, explicit: Sequence[int] | None) -> None:
        self.selection, self.tokenizer, self.seed, self.explicit = selection, tokenizer, seed, explicit
        self._calibration: Batches | None = None
        self._score: importance.ScoreFn | None = None

    def calibration(self, device: torch.device | str) -> Batches:
        """The selection's calibration batches on `device`."""
        if self._calibration is None:
            s = self.selection
            texts = importance.calibration_texts(s.calibration, n=s.num_calibration, seed=self.seed)
            self._calibration = importance.calibration_batches(
                self.tokenizer, texts, batch_size=s.calibration_batch_size, max_length=s.calibration_max_length)
        return [{key: v.to(device) for key, v in b.items()} for b in self._calibration]

    def score_fn(self) -> importance.ScoreFn | None:
        """`task_ablation`'s score (`gradual.tasks.selection.TaskScore`); None for the other metrics."""
        if self.selection.metric != "task_ablation":
            return None
        if self._score is None:
            from gradual.tasks.selection import TaskScore

            s = self.selection
            self._score = TaskScore(self.tokenizer, s.tasks or [], n=s.n, fmt=s.fmt, score=s.task_score,
                                    difficulty=s.difficulty)
        return self._score

    def first_ranking(self, history: Sequence[Any]) -> list[int] | None:
        """Under `selection.rescore: false`, once stage 1 is recorded: the ranking it made of the unpruned model's
        layers (original indices, removal order); None otherwise (the current model is scored).

        Raises:
            RuntimeError: stage 1's record holds no ranking (a run directory written without one).
        """
        if self.selection.rescore or len(history) < 2 or self.explicit is not None:
            return None
        ranking = history[1].importance.get("ranking")
        if ranking is None:
            raise RuntimeError("selection.rescore is false, but stage 1's record holds no ranking of the unpruned "
                               "model's layers; start the run again with overwrite: true")
        return list(ranking)

    def choose(self, model: torch.nn.Module, k: int, history: Sequence[Any],
               device: torch.device | str) -> tuple[list[int], dict[str, Any]]:
        """Current indices of the `k` layers to remove at the stage after `history` (`choose_layers`)."""
        removed = [i for r in history for i in r.removed]
        return choose_layers(model, k, self.selection, lambda: self.calibration(device),
                             self.seed + max(0, len(history) - 1), explicit=self.explicit, removed=removed,
                             ranking=self.first_ranking(history), score_fn=self.score_fn())


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


def stage_objective(recovery: Recovery, original: Teacher | None, k: int, steps: int, model: torch.nn.Module,
                    reload_start: Callable[[], torch.nn.Module]) -> tuple[RecoveryObjective | None, Teacher | None]:
    """Step 5's loss for a stage removing `k` layers in `steps` steps, and the teacher copied for it (or None).

    A consolidation stage (`k == 0`) distils from the original model; a removal stage distils from it too, or under
    `recovery.teacher: previous` from a frozen copy of `model` as the stage starts, before anything changes it
    (None: a stage that trains nothing needs no copy). A 4-bit start (stage 1 under `quantize: nf4`) is not copied
    but reloaded de-quantised by `reload_start`.
    """
    if k == 0:
        return RecoveryObjective(replace(recovery, loss="kd"), original), None
    if recovery.teacher == "original":
        return RecoveryObjective(recovery, original), None
    if not steps:
        return None, None
    teacher = Teacher(reload_start() if has_4bit(model) else copy.deepcopy(model))
    return RecoveryObjective(recovery, teacher), teacher


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
