"""Recovery from the original model: the teacher, the losses, and the recovery objective the module calls.

Three pieces, as in NVIDIA ModelOpt's distillation API:
- `Teacher`: the original, unpruned model — loaded once, frozen, in eval mode, kept outside the LightningModule's
  module tree (so optimizers, DDP and checkpoints never see it); or, with `recovery.teacher: previous`, a frozen copy
  of the model each stage starts from. Under DDP every rank runs its own copy on its own batch.
- The losses: `forward_kl` (per-token KL(teacher ‖ student) over the full vocabulary at temperature τ — the recipe
  Minitron found best for healing a pruned model, arXiv 2407.14679 / 2408.11796) and `hidden_state_loss` (the
  student's layer outputs against the teacher's at the same original index).
- `RecoveryObjective`: what one recovery step minimises (`kd`, `sft`, or `kd+sft`, plus the optional hidden-state
  term), called by `GradualModule.training_step`.

Memory: the KL is computed in chunks of positions under activation checkpointing, so besides the student's and the
teacher's logits (each B×T×V in the model's dtype) only one chunk's float32 soft-max is alive at a time, in the
forward and in the backward pass — never a second full B×T×V float32 tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gradual import models, surgery
from gradual.errors import UsageError

IGNORE_INDEX = -100
LOSSES = ("sft", "kd", "kd+sft")
PARAMS = ("lora", "full", "near_cut")
TEACHERS = ("original", "previous")


@dataclass
class Recovery:
    """How a stage heals: what a recovery step minimises, and which weights it trains.

    Attributes:
        loss: `sft` (cross-entropy on the data's tokens — the seed paper's recipe), `kd` (forward KL to the original
            model's next-token distribution, full vocabulary), or `kd+sft` (their weighted sum).
        temperature: τ of the KL (both distributions softened by τ; the loss is scaled by τ² so gradients keep their
            size). 1 = the plain distributions.
        sft_weight: weight of the cross-entropy in `kd+sft` (the KL has weight 1).
        hidden_weight: weight of the hidden-state loss (0 = off): mean squared error between each student layer's
            output and the teacher's at the same original index, relative to the teacher's mean square.
        chunk_size: positions per KL chunk (memory: chunk_size × vocabulary float32 values at a time).
        teacher_dtype: dtype of the teacher (`float32`, `bfloat16`, `float16`; null = the student's `dtype`).
        teacher_quantize: `nf4` loads the teacher in 4 bits to save memory on GPUs (null = not quantised).
        params: what trains: `lora` (fresh adapters every stage, merged at its end), `full` (every weight of every
            decoder layer and the final norm), or `near_cut` (full weights of the `near_cut_layers` kept layers on
            each side of every cut, plus the final norm; LLM-Streamline arXiv 2403.19135 and arXiv 2411.15558 found
            training whole layers near the cut heals better than a small LoRA).
        near_cut_layers: k of `near_cut`: kept layers trained on each side of a cut.
        teacher: whom a removal stage distils from: `original` (default: the unpruned model, loaded once) or
            `previous` (the model as the stage found it: the previous stage's healed model, before this stage's
            removal — a smaller step to imitate, but errors compound). `previous` is a frozen copy made at each
            stage's start in the student's dtype (`teacher_dtype` and `teacher_quantize` apply to the original
            only): on a GPU it costs one more model's weights beside the student, as the original would, and the
            original is then loaded only for a consolidation stage (`schedule.final_steps`), which always distils
            from it.
        on_policy: share of training batches that are on-policy, in [0, 1] (GKD's λ, arXiv 2306.13649; default 0 =
            none): on such a batch the student continues the batch's prompts itself (sampled) and the loss is the
            forward KL to the teacher on its generated tokens alone (`gradual.onpolicy`), whatever `loss` says for
            the other batches. A batch is on-policy with probability `on_policy`, drawn from (seed, stage, batch
            index), so a resumed run repeats the choice. Needs a teacher (loaded even under `loss: sft`).
        on_policy_tokens: the most tokens the student generates per on-policy row (>= 1, default 128).
    """

    loss: str = "sft"
    temperature: float = 1.0
    sft_weight: float = 1.0
    hidden_weight: float = 0.0
    chunk_size: int = 1024
    teacher_dtype: str | None = None
    teacher_quantize: str | None = None
    params: str = "lora"
    near_cut_layers: int = 1
    teacher: str = "original"
    on_policy: float = 0.0
    on_policy_tokens: int = 128

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UsageError(f"recovery.loss={self.loss!r} is unknown; allowed: {', '.join(LOSSES)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UsageError(f"recovery.temperature={self.temperature} is invalid; it must be finite and > 0")
        for name in ("sft_weight", "hidden_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UsageError(f"recovery.{name}={getattr(self, name)} is invalid; it must be finite and >= 0")
        if self.chunk_size < 1:
            raise UsageError(f"recovery.chunk_size={self.chunk_size} is invalid; it must be >= 1")
        models.check_quantize(self.teacher_quantize, "recovery.teacher_quantize")
        models.check_dtype(self.teacher_dtype, "recovery.teacher_dtype", nullable=True)
        if self.params not in PARAMS:
            raise UsageError(f"recovery.params={self.params!r} is unknown; allowed: {', '.join(PARAMS)}")
        if self.near_cut_layers < 1:
            raise UsageError(f"recovery.near_cut_layers={self.near_cut_layers} is invalid; it must be >= 1")
        if not (math.isfinite(self.on_policy) and 0 <= self.on_policy <= 1):
            raise UsageError(f"recovery.on_policy={self.on_policy} is invalid; it must be a share in [0, 1]")
        if self.on_policy_tokens < 1:
            raise UsageError(f"recovery.on_policy_tokens={self.on_policy_tokens} is invalid; it must be >= 1")
        if self.teacher not in TEACHERS:
            raise UsageError(f"recovery.teacher={self.teacher!r} is unknown; allowed: {', '.join(TEACHERS)}")
        if self.teacher == "previous" and not self.needs_teacher:
            raise UsageError(f"recovery.teacher={self.teacher!r} is used only by distillation; allowed with "
                             f"loss={self.loss!r}, hidden_weight 0 and on_policy 0: original (or set loss: kd or "
                             "kd+sft)")

    @property
    def needs_teacher(self) -> bool:
        """Whether any batch asks the teacher: a distillation loss, the hidden-state term, or on-policy batches."""
        return self.distils or self.on_policy > 0

    @property
    def distils(self) -> bool:
        """Whether an ordinary (off-policy) batch's loss asks the teacher."""
        return self.loss != "sft" or self.hidden_weight > 0


# ---------------------------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------------------------

class Teacher:
    """A frozen model in eval mode: the original (`load`), or a stage's starting model (`recovery.teacher:
    previous`). A plain object, not an `nn.Module` attribute of the student's module, so it is never trained,
    wrapped by DDP or written into a checkpoint.

    Args:
        model: the loaded teacher (its `config.gradual_original_layers`, if any, maps its layers to original indices).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.original = surgery.original_indices(self.model)

    @classmethod
    def load(cls, name: str, dtype: str = "float32", quantize: str | None = None,
             trust_remote_code: bool = False) -> Teacher:
        """Load the original model `name` (any `models.load_model` source) as a teacher."""
        return cls(models.load_model(name, dtype=dtype, quantize=quantize, trust_remote_code=trust_remote_code))

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], hidden_states: bool = False) -> Any:
        """The teacher's forward on the student's batch (labels dropped): logits [B, T, V] and, when asked, the
        hidden states (embeddings + one per layer)."""
        device = batch["input_ids"].device
        if next(self.model.parameters()).device != device and not getattr(self.model, "is_loaded_in_4bit", False):
            self.model.to(device)
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        return self.model(**inputs, output_hidden_states=hidden_states, use_cache=False)


# ---------------------------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------------------------

def loss_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T-1] bool: which next-token predictions count — those whose target is a label (not -100), as in the
    cross-entropy. Position t predicts token t+1, so the mask is `labels[:, 1:] != -100`; plain text with labels
    equal to the input ids counts every real token."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].masked_fill(batch.get("attention_mask", torch.ones_like(batch["input_ids"])) == 0,
                                                IGNORE_INDEX)
    return labels[:, 1:] != IGNORE_INDEX


def _chunk_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over rows of KL(softmax(teacher/τ) ‖ softmax(student/τ)), in float32; [n, V] inputs.

    0 · log 0 = 0: a vocabulary id where the teacher has no mass adds nothing, even where the student is −inf too
    (masked or padded vocabulary rows); a student at −inf where the teacher has mass gives +inf, as the KL is."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    p = t.exp()
    return torch.where(p > 0, p * (t - s), 0.0).sum()


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, chunk_size: int = 1024, reduction: str = "mean") -> torch.Tensor:
    """Per-token forward KL(teacher ‖ student) over the full vocabulary, times τ², averaged (or summed) over positions.

    Args:
        student_logits, teacher_logits: [B, T, V] next-token logits (any float dtype; same vocabulary size —
            a tokenizer whose vocabulary was padded differently is cut to the common size). −inf entries are
            allowed (masked vocabulary): ids where the teacher is −inf add 0.
        mask: [B, T] bool, the positions that count (see `loss_mask`, aligned to the logits' first T-1 positions).
        temperature: τ > 0; the loss is multiplied by τ² (Hinton et al.) so its gradient scale does not shrink.
        chunk_size: positions per chunk; each chunk's float32 soft-max is recomputed in the backward pass
            (activation checkpointing), so memory beyond the two logits tensors is O(chunk_size × V).
        reduction: `mean` over the counted positions, or their `sum` (for a caller that normalises a whole
            optimizer step, `RecoveryObjective`).

    Returns a scalar in nats (per counted position for `mean`; 0 when nothing counts), +inf where the student puts no
    mass on an id the teacher does. Source: Minitron (arXiv 2407.14679).
    """
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = student_logits[..., :vocab][mask]
    t = teacher_logits[..., :vocab][mask].detach()
    n = s.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    total = student_logits.new_zeros((), dtype=torch.float32)
    for lo in range(0, n, chunk_size):
        part = (s[lo:lo + chunk_size], t[lo:lo + chunk_size], temperature)
        total = total + (checkpoint(_chunk_kl, *part, use_reentrant=False) if s.requires_grad else _chunk_kl(*part))
    return (total if reduction == "sum" else total / n) * temperature ** 2


def layer_pairs(student_original: list[int], teacher_original: list[int]) -> list[tuple[int, int]]:
    """(student hidden-state index, teacher hidden-state index) pairs at the same original layer.

    HF `hidden_states[0]` is the embedding output and `hidden_states[k]` the output of layer k-1, except the last
    entry, which is the final norm's output. Pairs therefore match layer outputs below the last layer of each model,
    plus the two final (normed) states; a student layer whose original index the teacher lacks is skipped.
    """
    teacher_at = {orig: k for k, orig in enumerate(teacher_original)}
    pairs = []
    for j, orig in enumerate(student_original[:-1]):
        k = teacher_at.get(orig)
        if k is not None and k < len(teacher_original) - 1:
            pairs.append((j + 1, k + 1))
    pairs.append((len(student_original), len(teacher_original)))
    return pairs


def hidden_state_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                      pairs: list[tuple[int, int]], mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean over `pairs` of the per-position relative squared error ‖h_s − h_t‖² / ‖h_t‖², averaged (`mean`) or
    summed (`sum`) over the counted positions ([B, T] bool `mask`).

    Relative, so layers — and positions such as an attention sink — whose activations differ in scale by orders of
    magnitude weigh alike; per position, so the sum over a step's micro-batches is the step's sum, however it is split.
    0 when nothing counts.
    """
    if not mask.any():
        return student_hidden[-1].sum() * 0.0
    losses = []
    for s_idx, t_idx in pairs:
        s = student_hidden[s_idx][mask].float()
        t = teacher_hidden[t_idx][mask].detach().float()
        per_position = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)
        losses.append(per_position.sum() if reduction == "sum" else per_position.mean())
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------------------------
# Where the module calls them
# ---------------------------------------------------------------------------------------------------------------

class RecoveryObjective:
    """One recovery step's loss for the student on a (micro-)batch; the module calls it from `training_step`.

    `original_layers` gives the student's current layers as original indices (for the hidden-state pairs).
    Returns (loss, parts). `loss` is what to back-propagate: each term's *sum* over the batch's counted positions
    divided by the step normaliser the batch carries (`step_targets` for the cross-entropy and the KL, `step_tokens`
    for the hidden-state term: the mean count per micro-batch of its optimizer step over every micro-batch and rank,
    `gradual.sampler.StepItem`), so that after Lightning divides by `accumulate_grad_batches` and DDP averages over
    ranks, a step's gradient is the mean over *all* its positions however the step is split (the fix transformers
    made to its Trainer in 2024). Without those keys the normalisers are the batch's own counts: per-position means.
    `parts` holds each term's per-position mean on this batch (`sft`, `kd`, `hidden`) for logging; `mean(parts)` is
    their weighted sum, the batch's own per-position loss.
    """

    def __init__(self, settings: Recovery, teacher: Teacher | None) -> None:
        if settings.needs_teacher and teacher is None:
            raise ValueError(f"distillation loss {settings.loss!r} needs a teacher")
        self.settings, self.teacher = settings, teacher

    def __call__(self, student: torch.nn.Module, batch: dict[str, torch.Tensor],
                 original_layers: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.settings
        hidden = cfg.hidden_weight > 0
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        out = student(**inputs, output_hidden_states=hidden)
        mask = loss_mask(batch)
        tokens = batch.get("attention_mask", torch.ones_like(batch["input_ids"])) > 0
        teacher = self.teacher(batch, hidden_states=hidden) if self.teacher is not None and cfg.distils else None
        terms: dict[str, tuple[float, torch.Tensor, int, str]] = {}  # name: (weight, sum, count, normaliser key)
        if cfg.loss in ("sft", "kd+sft"):
            weight = 1.0 if cfg.loss == "sft" else cfg.sft_weight
            terms["sft"] = (weight, _cross_entropy(out.logits, batch, mask), int(mask.sum()), "step_targets")
        if cfg.loss in ("kd", "kd+sft"):
            kd = forward_kl(out.logits[:, :-1], teacher.logits[:, :-1], mask, cfg.temperature, cfg.chunk_size,
                            reduction="sum")
            terms["kd"] = (1.0, kd, int(mask.sum()), "step_targets")
        if hidden:
            pairs = layer_pairs(original_layers, self.teacher.original)
            total = hidden_state_loss(out.hidden_states, teacher.hidden_states, pairs, tokens, reduction="sum")
            terms["hidden"] = (cfg.hidden_weight, total, int(tokens.sum()), "step_tokens")
        loss = out.logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        for name, (weight, total, count, key) in terms.items():
            norm = float(batch[key]) if key in batch else float(count)
            loss = loss + weight * total / (norm if norm > 0 else 1.0)
            parts[name] = float(total.detach()) / max(count, 1)
        return loss, parts

    def mean(self, parts: dict[str, float]) -> float:
        """The weighted sum of `parts`: the batch's per-position loss (what `loss` is when the batch is its step)."""
        cfg = self.settings
        weights = {"sft": 1.0 if cfg.loss == "sft" else cfg.sft_weight, "kd": 1.0, "hidden": cfg.hidden_weight}
        return sum(weights[name] * value for name, value in parts.items())


def _cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the counted positions (HF's causal-LM loss on the same labels, times
    their number)."""
    labels = batch.get("labels", batch["input_ids"])[:, 1:]
    return F.cross_entropy(logits[:, :-1][mask].float(), labels[mask], reduction="sum")
