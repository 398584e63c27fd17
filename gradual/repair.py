"""Repair a layer cut without training: ReplaceMe's least-squares map folded into a down projection.

ReplaceMe (Shopkhoev et al., arXiv 2505.02819). For a cut after block i (the removed span i+1..j, current
positions), over the non-padding calibration tokens (N of them, hidden size d):

- M: block i's MLP output, i.e. its `mlp.down_proj` output (N×d);
- Y: block i's attention-side residual, the hidden state the MLP output is added to (N×d);
- L: the hidden state after the cut in the unpruned model (the model as given, before this removal), i.e. block
  j's output (N×d), the input of the next kept block (the last layer's output, before the final norm, when the
  span runs to the end).

T = argmin_T ||M T − (L − Y)||² + λ||T − I||² is solved in float64 from MᵀM and Mᵀ(L − Y), accumulated over the
batches (d×d each: the tokens are never held together). The ridge pulls T towards I, which is plain removal. λ =
ridge · tr(MᵀM) / d (ridge relative to the mean eigenvalue) is chosen by cross-validation: T has d² entries and
calibration sets are small, so an almost unregularised fit reproduces the calibration data and moves unseen text
further from the unpruned model than plain removal does. Measured on SmolLM2-135M without layers 14-17, fitted on
32 built-in prompts (954 tokens, d = 576): ridge 1e-6 took the perplexity of the other 32 prompts from 29.7 (plain
removal) to 43.9, the cross-validated ridge (3) to 23.8 (unpruned: 17.8). The calibration sequences are dealt
round-robin into `FOLDS` folds (the statistics are kept per fold, d×d each), every ridge of `RIDGES` is fitted
without each fold and scored on it, and the best one is refitted on all tokens (the folds cost FOLDS × 2 d² float64
on the model's device, 1 GiB for d = 4096). Unless its held-out error is at least `MIN_CV_GAIN` (0.1%) below that
of T = I, the repair is not kept: with nothing linear to learn the best ridge is the largest and its map is I plus
noise, whose gain or loss is within the noise of the estimate.

T is folded into the down projection: HF keeps a Linear weight as [out, in] and computes y = x Wᵀ + b, so
(x Wᵀ + b) T = x (Tᵀ W)ᵀ + b T, i.e. W ← Tᵀ W and b ← b T. No parameter is added: the repaired model is a plain
model of its architecture and saves and loads as one.

Gemma2/Gemma3 add `post_feedforward_layernorm(M)` rather than M, which is not linear in the fold. The norm is an
RMSNorm, blind to scale, so T is fitted to send M to (L − Y) / g per token, g the norm's gain, rescaled to M's
own root mean square: the direction the normed output needs, at the size the norm was fed.

Every architecture keeps its guarantee by measurement rather than by algebra: with the folded weight, in the
weight's own dtype, the hidden state after the cut is computed exactly as the pruned model computes it and
compared with the unpruned model's, next to plain removal. The repair is kept only when it is not further away
on the calibration data and cross-validation found it better than plain removal (`status` "kept"); otherwise the
weight stays as it was ("reverted", with the reason in `note`). A span starting at position 0 has no block
before it and is removed without repair ("skipped", logged).

Several spans (one stage may remove non-contiguous layers) are handled shallow to deep, each on the model as it
will be: the earlier spans skipped in place (`surgery.skip_layers`, the same as removing them) with their kept
repairs applied, against the unpruned model's hidden state after the span. The weights change only in
`apply_repairs`, after all spans are planned, and positions stay valid for `surgery.remove_layers` afterwards.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from gradual import models, surgery, tiny
from gradual.errors import UsageError
from gradual.importance import eval_mode, layer_output

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("lstsq",)
"""Values of `GradualModule(repair=...)` besides null."""

# model_type -> the norm whose input is the attention-side residual (what the MLP output is added to).
_PRE_MLP_NORM: dict[str, str] = {
    "llama": "post_attention_layernorm",
    "mistral": "post_attention_layernorm",
    "qwen2": "post_attention_layernorm",
    "qwen3": "post_attention_layernorm",
    "phi3": "post_attention_layernorm",
    "gemma2": "pre_feedforward_layernorm",
    "gemma3_text": "pre_feedforward_layernorm",
}
# model_type -> the norm applied to the MLP output before the residual add (Gemma's sandwich norm).
_POST_MLP_NORM: dict[str, str] = {"gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm"}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_PRE_MLP_NORM))
"""`config.model_type` values with a gated MLP ending in `mlp.down_proj`, where the fold applies."""

FOLDS = 4
RIDGES: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
"""Ridges (relative to the mean eigenvalue of MᵀM) that cross-validation chooses from."""
MIN_CV_GAIN = 1e-3
"""Relative reduction of the held-out squared error, against plain removal, that a map must reach to be kept."""
FALLBACK_RIDGE = 1.0
"""The ridge used when there are too few calibration sequences to cross-validate (fewer than two)."""

Batch = dict[str, torch.Tensor]
Status = Literal["kept", "reverted", "skipped"]


@dataclass
class SpanRepair:
    """What the repair did for one contiguous span of removed layers.

    `span` and `block` are current positions (valid until the span is removed); `removed` and `block_original`
    are original indices. Distances are relative: ||state − unpruned||_F / ||unpruned||_F of the hidden state
    after the cut over the non-padding calibration tokens, with plain removal and with the repair (whether or
    not it was kept), both computed in the model's dtype. `ridge` is the ridge used (relative to the mean
    eigenvalue of MᵀM); `distance_cv` is the cross-validated relative error of the fit, ||M T − target||_F /
    ||unpruned||_F on held-out folds, and `distance_cv_plain` the same for T = I, both in float64 and in the fit's
    own space (the hidden state after the cut, except for Gemma's pre-norm target); None when not cross-validated.
    `transform` is T (d×d, float64, CPU); `weight`/`bias` the folded down_proj parameters in their own dtype
    (CPU), present only when kept.
    """

    span: list[int]
    removed: list[int]
    block: int | None
    block_original: int | None
    status: Status
    tokens: int = 0
    distance_plain: float | None = None
    distance_repaired: float | None = None
    seconds: float = 0.0
    ridge: float | None = None
    distance_cv: float | None = None
    distance_cv_plain: float | None = None
    note: str = ""
    transform: torch.Tensor | None = field(default=None, repr=False)
    weight: torch.Tensor | None = field(default=None, repr=False)
    bias: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors), as recorded in a stage's results."""
        return {"removed": self.removed, "block": self.block_original, "status": self.status,
                "tokens": self.tokens, "distance_plain": self.distance_plain,
                "distance_repaired": self.distance_repaired, "ridge": self.ridge, "distance_cv": self.distance_cv,
                "distance_cv_plain": self.distance_cv_plain, "note": self.note, "seconds": round(self.seconds, 4)}


# ---------------------------------------------------------------------------------------------------------------
# Checks that need no weights


def check_architecture(arch: str) -> None:
    """Refuse, in one line, an architecture whose MLP is not a gated MLP ending in `down_proj`."""
    if arch not in _PRE_MLP_NORM:
        raise UsageError(f"repair 'lstsq' does not support architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def config_architecture(name: str, trust_remote_code: bool = False) -> str:
    """`config.model_type` of a model name (as `models.load_model` takes it), from its config alone."""
    if name.startswith(tiny.TINY_PREFIX):
        return tiny.tiny_config(tiny.parse_tiny(name)[0], 1).model_type
    if name == models.SMOLLM2_ALIAS:
        return "llama"  # SmolLM2 is a Llama; its config.json exists only after the one-minute GGUF conversion
    return AutoConfig.from_pretrained(models.resolve_model(name), trust_remote_code=trust_remote_code).model_type


def check_settings(method: str | None, model: str, quantize: str | None, trust_remote_code: bool = False) -> None:
    """Validate `repair` for a run before anything heavy: the method, the quantisation and the architecture."""
    if method is None:
        return
    check_method(method, quantize)
    check_architecture(config_architecture(model, trust_remote_code=trust_remote_code))


def check_method(method: str | None, quantize: str | None) -> None:
    """`repair` against the known methods and the quantisation, reading no model (what `gradual plan` checks).

    Raises:
        UsageError: an unknown method, or a repair of a quantised model.
    """
    if method is None:
        return
    if method not in METHODS:
        raise UsageError(f"repair={method!r} is unknown; allowed: {', '.join(METHODS)} or null")
    if quantize is not None:
        raise UsageError(f"repair={method!r} folds a map into float down_proj weights and cannot be used with "
                         f"quantize={quantize!r}; set one of them to null")


def spans(positions: Sequence[int]) -> list[list[int]]:
    """Sorted positions as contiguous runs: [1, 2, 5] → [[1, 2], [5]]."""
    runs: list[list[int]] = []
    for p in sorted(positions):
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


# ---------------------------------------------------------------------------------------------------------------
# Plan, apply


def lstsq_repair(model: nn.Module, positions: Sequence[int], batches: Sequence[Batch],
                 ridge: float | None = None) -> list[SpanRepair]:
    """Repair, in place, the cuts that removing `positions` (current) will make; the layers are NOT removed.

    Equals `apply_repairs(model, plan_repairs(...))`. Call `surgery.remove_layers(model, positions)` next.
    """
    repairs = plan_repairs(model, positions, batches, ridge=ridge)
    apply_repairs(model, repairs)
    return repairs


def plan_repairs(model: nn.Module, positions: Sequence[int], batches: Sequence[Batch],
                 ridge: float | None = None) -> list[SpanRepair]:
    """Fit and check one map per contiguous span of `positions` (current positions); the model is not changed.

    `batches` hold `input_ids` and `attention_mask` ([batch, seq]); tokens whose mask is 0 are ignored. Returns one
    `SpanRepair` per span, shallow to deep (see the module docstring). `ridge` (relative to the mean eigenvalue of
    MᵀM) fixes the ridge instead of choosing it by cross-validation; 0 gives the minimum-norm least squares.
    Raises `UsageError` for an unsupported architecture, a down projection that is not a float `nn.Linear` (4-bit
    base, unmerged adapters), invalid positions, or batches without a real token.
    """
    arch = surgery.architecture(model)
    check_architecture(arch)
    layers = surgery.decoder_layers(model)
    chosen = surgery.check_indices(list(positions), len(layers))
    original = surgery.original_indices(model)
    batches = list(batches)
    if not batches or not any(bool(b["attention_mask"].any()) for b in batches):
        raise UsageError("repair 'lstsq' needs calibration batches with at least one real token")
    if ridge is not None and not 0 <= ridge < math.inf:
        raise UsageError(f"ridge={ridge} is invalid; allowed: a number >= 0, or None to cross-validate")
    runner = _Runner(model, layers, arch)
    repairs: list[SpanRepair] = []
    with eval_mode(model), torch.inference_mode():
        for span in spans(chosen):
            start = time.perf_counter()
            removed = [original[p] for p in span]
            if span[0] == 0:
                log.info("repair: span %s starts at the first layer; nothing before it takes a map, removed "
                         "without repair", removed)
                repair = SpanRepair(span, removed, None, None, "skipped", note="no block before the first layer")
            else:
                repair = _repair_span(runner, span, original, batches, repairs, ridge)
            repair.seconds = time.perf_counter() - start
            repairs.append(repair)
    for repair in repairs:  # plain tensors again (inference tensors refuse some later uses)
        for name in ("transform", "weight", "bias"):
            if getattr(repair, name) is not None:
                setattr(repair, name, getattr(repair, name).clone())
    return repairs


def apply_repairs(model: nn.Module, repairs: Sequence[SpanRepair]) -> None:
    """Write the kept repairs' down_proj weights into the model (before the spans are removed)."""
    layers = surgery.decoder_layers(model)
    with torch.no_grad():
        for repair in repairs:
            if repair.status != "kept":
                continue
            down = _down_proj(layers[repair.block], repair.block_original)
            down.weight.copy_(repair.weight)
            if repair.bias is not None:
                down.bias.copy_(repair.bias)


def fold_transform(model: nn.Module, block: int, transform: torch.Tensor) -> None:
    """Fold T (d×d) into the down projection of the layer at current position `block`: W ← Tᵀ W, b ← b T."""
    layer = surgery.decoder_layers(model)[block]
    down = _down_proj(layer, surgery.original_indices(model)[block])
    weight, bias = _folded(down, transform.to(down.weight.device))
    with torch.no_grad():
        down.weight.copy_(weight)
        if bias is not None:
            down.bias.copy_(bias)


# ---------------------------------------------------------------------------------------------------------------
# One span


class _Stop(Exception):
    """Raised by a hook to end a forward pass once everything needed was captured."""


@dataclass
class _Captured:
    """One batch's real-token rows at block i: residual y, down_proj input x and output m; reference L."""

    y: torch.Tensor
    x: torch.Tensor
    m: torch.Tensor
    reference: torch.Tensor


class _Runner:
    """Truncated forward passes that capture block i's MLP side and the unpruned hidden state after a cut."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, arch: str) -> None:
        self.model = model
        self.layers = layers
        self.arch = arch
        self.device = model.get_input_embeddings().weight.device

    def capture(self, batch: Batch, block: int, last: int, earlier: Sequence[int],
                overrides: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> _Captured:
        """Run the batch: the reference from the unpruned model, block `block`'s values from the model with the
        `earlier` positions skipped and `overrides` (position → down_proj weight, bias) in place (one pass when
        there is nothing earlier)."""
        mask = batch["attention_mask"].bool()
        got: dict[str, torch.Tensor] = {}
        layer = self.layers[block]
        home = layer.mlp.down_proj.weight.device  # everything is returned here (a model may span devices)

        def real(t: torch.Tensor) -> torch.Tensor:
            return t[mask.to(t.device)].to(home)

        def residual(module: nn.Module, args: tuple) -> None:
            got["y"] = real(args[0])

        def mlp(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            got["x"], got["m"] = real(args[0]), real(output)

        def reference(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            got["reference"] = real(layer_output(output))
            raise _Stop

        def stop(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            raise _Stop

        handles = [self.layers[last].register_forward_hook(reference, with_kwargs=True)]
        try:
            if earlier or overrides:
                self._forward(batch)
                handles.pop().remove()
                handles.append(layer.register_forward_hook(stop, with_kwargs=True))
            handles.append(getattr(layer, _PRE_MLP_NORM[self.arch]).register_forward_pre_hook(residual))
            handles.append(layer.mlp.down_proj.register_forward_hook(mlp))
            for position, (weight, bias) in overrides.items():
                handles.append(self.layers[position].mlp.down_proj.register_forward_hook(_replace_output(weight, bias)))
            with surgery.skip_layers(self.model, earlier):
                self._forward(batch)
        finally:
            for handle in handles:
                handle.remove()
        return _Captured(got["y"], got["x"], got["m"], got["reference"])

    def _forward(self, batch: Batch) -> None:
        try:
            self.model(input_ids=batch["input_ids"].to(self.device),
                       attention_mask=batch["attention_mask"].to(self.device), use_cache=False)
        except _Stop:
            return
        raise RuntimeError("the forward pass never reached the layer it was to stop at")

    def after_cut(self, block: int, y: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        """The hidden state block `block` outputs for residual `y` and down_proj output `mlp_out`, as the model
        computes it (same ops, same dtype): after the cut it is the input of the next kept block."""
        post = _POST_MLP_NORM.get(self.arch)
        if post is not None:
            mlp_out = getattr(self.layers[block], post)(mlp_out)
        return y + mlp_out

    def post_norm_gain(self, block: int) -> torch.Tensor | None:
        """The gain g of the post-MLP RMSNorm (Gemma), read as norm(1) · sqrt(1 + eps) ≈ norm(1); else None."""
        post = _POST_MLP_NORM.get(self.arch)
        if post is None:
            return None
        down = self.layers[block].mlp.down_proj
        ones = torch.ones(1, down.out_features, device=down.weight.device, dtype=down.weight.dtype)
        return getattr(self.layers[block], post)(ones)[0].double()


def _repair_span(runner: _Runner, span: list[int], original: list[int], batches: list[Batch],
                 done: list[SpanRepair], ridge: float | None) -> SpanRepair:
    """Fit T for one span, fold it into a candidate weight, and keep it only if cross-validation prefers it to
    plain removal and it does not move the hidden state after the cut further from the unpruned model's."""
    block, last = span[0] - 1, span[-1]
    down = _down_proj(runner.layers[block], original[block])
    earlier = [p for r in done for p in r.span]
    overrides = {r.block: _on(runner.layers[r.block], r.weight, r.bias) for r in done if r.status == "kept"}
    gain = runner.post_norm_gain(block)
    d = down.out_features
    device = down.weight.device
    gram = torch.zeros(FOLDS, d, d, dtype=torch.float64, device=device)  # per fold: MᵀM, MᵀD, ||D||², N
    cross = torch.zeros_like(gram)
    target_sq = torch.zeros(FOLDS, dtype=torch.float64, device=device)
    counts = [0] * FOLDS
    sequences = 0
    for batch in batches:
        c = runner.capture(batch, block, last, earlier, overrides)
        m = c.m.double()
        target = _fit_target(m, c.reference.double() - c.y.double(), gain)
        folds, sequences = _folds(batch["attention_mask"], sequences)
        folds = folds.to(device)
        for k in range(FOLDS):
            rows = folds == k
            m_k, target_k = m[rows], target[rows]
            gram[k] += m_k.T @ m_k
            cross[k] += m_k.T @ target_k
            target_sq[k] += target_k.pow(2).sum()
            counts[k] += int(rows.sum())
    cv_sq = identity_sq = None
    if ridge is None:
        ridge, cv_sq, identity_sq = _cross_validate(gram, cross, target_sq, counts)
    transform = _solve(gram.sum(0), cross.sum(0), ridge)
    weight, bias = _folded(down, transform)
    plain_sq = repaired_sq = reference_sq = 0.0
    for batch in batches:
        c = runner.capture(batch, block, last, earlier, overrides)
        reference = c.reference.double()
        plain = runner.after_cut(block, c.y, c.m).double()
        repaired = runner.after_cut(block, c.y, F.linear(c.x, weight, bias)).double()
        plain_sq += float(((plain - reference) ** 2).sum())
        repaired_sq += float(((repaired - reference) ** 2).sum())
        reference_sq += float((reference**2).sum())
    generalises = cv_sq is None or cv_sq <= (1 - MIN_CV_GAIN) * identity_sq
    kept = generalises and repaired_sq <= plain_sq
    note = "" if kept else ("cross-validation: no better than plain removal" if not generalises
                            else "calibration: further than plain removal")
    scale = math.sqrt(reference_sq) or 1.0
    repair = SpanRepair(span, [original[p] for p in span], block, original[block], "kept" if kept else "reverted",
                        tokens=sum(counts), distance_plain=math.sqrt(plain_sq) / scale,
                        distance_repaired=math.sqrt(repaired_sq) / scale, ridge=ridge,
                        distance_cv=_relative(cv_sq, scale), distance_cv_plain=_relative(identity_sq, scale),
                        note=note, transform=transform.cpu())
    if kept:
        repair.weight = weight.cpu()
        repair.bias = None if bias is None else bias.cpu()
    log.info("repair: span %s after block %d: distance %.4g plain, %.4g repaired, ridge %g (%s%s)", repair.removed,
             repair.block_original, repair.distance_plain, repair.distance_repaired, ridge, repair.status,
             f": {note}" if note else "")
    return repair


def _relative(squared: float | None, scale: float) -> float | None:
    return None if squared is None else math.sqrt(max(squared, 0.0)) / scale


def _folds(attention_mask: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
    """Fold of every real token (row-major, like `h[mask]`): sequences are dealt round-robin, counting only
    sequences with a real token, so padding rows or columns never move a token to another fold. Returns the
    folds and the running count of sequences."""
    mask = attention_mask.bool()
    real = mask.any(dim=1)
    order = torch.cumsum(real.long(), dim=0) - 1 + seen
    return (order % FOLDS)[:, None].expand_as(mask)[mask], seen + int(real.sum())


def _cross_validate(gram: torch.Tensor, cross: torch.Tensor, target_sq: torch.Tensor,
                    counts: list[int]) -> tuple[float, float | None, float | None]:
    """The ridge of `RIDGES` whose fits without each fold predict that fold best, its summed held-out squared
    error, and the error of T = I (plain removal, nothing fitted). Fewer than two non-empty folds: the fallback
    ridge and no errors."""
    used = [k for k, n in enumerate(counts) if n > 0]
    if len(used) < 2:
        log.info("repair: fewer than two calibration sequences, no cross-validation; ridge %g", FALLBACK_RIDGE)
        return FALLBACK_RIDGE, None, None
    total_gram, total_cross = gram.sum(0), cross.sum(0)
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    identity = _error(eye, total_gram, total_cross, float(target_sq.sum()))
    errors = {r: sum(_error(_solve(total_gram - gram[k], total_cross - cross[k], r), gram[k], cross[k],
                            float(target_sq[k])) for k in used) for r in RIDGES}
    best = min(RIDGES, key=lambda r: errors[r])
    return best, errors[best], identity


def _error(transform: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, target_sq: float) -> float:
    """||M T − D||² from MᵀM, MᵀD and ||D||²: tr(Tᵀ MᵀM T) − 2 tr(Tᵀ MᵀD) + ||D||²."""
    return float(((gram @ transform) * transform).sum() - 2 * (cross * transform).sum()) + target_sq


def _fit_target(m: torch.Tensor, delta: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """What M T should equal: L − Y, or for a post-MLP RMSNorm the pre-norm direction (L − Y) / g at M's size."""
    if gain is None:
        return delta
    scale = gain.abs().max()
    usable = gain.abs() > 1e-6 * scale
    target = torch.where(usable, delta / torch.where(usable, gain, torch.ones_like(gain)), torch.zeros_like(delta))
    size = target.pow(2).mean(dim=-1, keepdim=True).sqrt()
    wanted = m.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return torch.where(size > 0, target * wanted / torch.where(size > 0, size, torch.ones_like(size)), target)


def _solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_T ||M T − D||² + λ||T − I||² from MᵀM and MᵀD: (MᵀM + λI) T = MᵀD + λI, λ = ridge · tr(MᵀM) / d."""
    d = gram.shape[0]
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    lam = ridge * float(torch.trace(gram)) / d
    if lam > 0:
        return torch.linalg.solve(gram + lam * eye, cross + lam * eye)
    return torch.linalg.lstsq(gram.cpu(), cross.cpu(), driver="gelsd").solution.to(gram.device)


def _folded(down: nn.Linear, transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tᵀ W and b T in float64, returned in the weight's dtype: the down projection that outputs (x Wᵀ + b) T."""
    weight = (transform.T @ down.weight.double()).to(down.weight.dtype)
    bias = None if down.bias is None else (down.bias.double() @ transform).to(down.bias.dtype)
    return weight, bias


def _down_proj(layer: nn.Module, original_index: int | None) -> nn.Linear:
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear) or not down.weight.is_floating_point():
        kind = "nothing" if down is None else f"{type(down).__name__} ({down.weight.dtype})"
        raise UsageError(f"repair 'lstsq' needs a float nn.Linear mlp.down_proj; layer {original_index} has {kind} "
                         "(a 4-bit base or unmerged adapters cannot take the fold)")
    return down


def _on(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A planned (CPU) down_proj weight and bias on the device of the layer's down projection."""
    device = layer.mlp.down_proj.weight.device
    return weight.to(device), None if bias is None else bias.to(device)


def _replace_output(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    """Forward hook: a Linear computes with other weights, exactly as if they had been written into it."""
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return F.linear(args[0], weight, bias)
    return hook


