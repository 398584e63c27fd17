"""LoRA / QLoRA adapters that heal a pruned model between removals, and the optimizer that trains them.

One stage is: `attach_lora` → train → `merge_lora` → remove a layer → `attach_lora` again. Merging folds the
adapter into the base weights so every stage starts from a plain Hugging Face model (no peft wrappers), which
surgery, scoring and `save_pretrained` handle like any other model.

QLoRA (a bitsandbytes NF4 base) needs two precautions that this module takes for the caller:
- bitsandbytes 0.50 on a CPU with avx512_bf16 repacks a `Linear4bit` weight during any eval-mode forward, after
  which the layer's output is cut from autograd and LoRA gradients silently become None. `attach_lora` and
  `quantize_nf4` switch that repacking off (`disable_cpu_repacking`) and undo it where it already happened.
- Merging into a 4-bit weight re-rounds base + delta to NF4 and loses most of the small LoRA update. `merge_lora`
  instead merges into a de-quantised copy in float32 and returns plain float weights; pass `requantize=True` to
  quantise the merged model again for the next stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, dequantize_4bit
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from gradual.errors import UsageError
from gradual.surgery import decoder_layers

_LINEAR_TYPES = (nn.Linear, Conv1D)  # bnb.nn.Linear4bit subclasses nn.Linear


@dataclass
class LoraSettings:
    """Adapter shape. `target_modules=None` targets every linear projection inside the decoder layers.

    Names are matched like peft does: a name matches a module whose path equals it or ends with "." + name
    (so "c_proj" hits both GPT-2 projections of that name). Modules outside the decoder layers (lm_head,
    embeddings) are never adapted.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UsageError(f"lora r={self.r} is invalid; it must be an integer >= 1")
        if self.alpha <= 0:
            raise UsageError(f"lora alpha={self.alpha} is invalid; it must be > 0")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"lora dropout={self.dropout} is invalid; it must be in [0, 1)")
        if self.target_modules is not None and not self.target_modules:
            raise UsageError("lora target_modules=[] is invalid; give module names or null for every projection")


@dataclass
class OptimizerSettings:
    """AdamW with linear warm-up then a constant rate: the seed paper's recovery recipe.

    `clip` is the gradient-norm clip the trainer should apply (None: no clipping); it is carried here so one
    config block describes the whole optimisation.
    """

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    clip: float | None = 1.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # configs give lists
        if self.lr <= 0:
            raise UsageError(f"optimizer lr={self.lr} is invalid; it must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UsageError(f"optimizer betas={list(self.betas)} is invalid; need two values in [0, 1)")
        if self.weight_decay < 0:
            raise UsageError(f"optimizer weight_decay={self.weight_decay} is invalid; it must be >= 0")
        if self.warmup_steps < 0:
            raise UsageError(f"optimizer warmup_steps={self.warmup_steps} is invalid; it must be >= 0")
        if self.clip is not None and self.clip <= 0:
            raise UsageError(f"optimizer clip={self.clip} is invalid; it must be > 0 (or null for no clipping)")


class WarmupConstant:
    """LR multiplier: linear warm-up over `warmup_steps` scheduler steps, then 1. A class so it pickles."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return 1.0 if step >= self.warmup_steps else (step + 1) / self.warmup_steps


def build_optimizer(params: Iterable[nn.Parameter] | nn.Module, settings: OptimizerSettings | None = None,
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the parameters that currently require grad, and its warm-up-then-constant schedule.

    A pure function of the current trainable parameters, so it can be called again after pruning and a new
    `attach_lora` (the old optimizer holds tensors of the removed adapters). Step the scheduler once per
    optimizer step (Lightning: `interval: "step"`); a rebuilt optimizer warms up again, which suits the fresh,
    zero-initialised adapter of a new stage.
    """
    settings = settings or OptimizerSettings()
    if isinstance(params, nn.Module):
        params = params.parameters()
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("build_optimizer: no parameter requires grad; attach an adapter first")
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=settings.betas,
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupConstant(settings.warmup_steps))
    return optimizer, scheduler


def _layer_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path inside its decoder layer, module) for every linear-like module of every decoder layer."""
    found = []
    for layer in decoder_layers(model):
        found.extend((name, m) for name, m in layer.named_modules() if isinstance(m, _LINEAR_TYPES))
    return found


def _matches(path: str, key: str) -> bool:
    return path == key or path.endswith("." + key)


def default_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of every linear projection in the decoder layers, e.g. q_proj..down_proj (Llama),
    c_attn/c_proj/c_fc (GPT-2 Conv1D), query_key_value/dense/dense_h_to_4h/dense_4h_to_h (GPT-NeoX)."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _layer_linears(model)})


def _resolve_targets(model: nn.Module, requested: list[str] | None) -> tuple[list[str], list[str], bool]:
    """(target names, full paths outside the decoder layers that those names would also hit, any Conv1D?)."""
    linears = _layer_linears(model)
    targets = list(requested) if requested else default_target_modules(model)
    available = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
    for key in targets:
        if not any(_matches(name, key) for name, _ in linears):
            raise UsageError(f"lora target_modules entry {key!r} matches no linear module of the decoder layers; "
                             f"available: {', '.join(available)}")
    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    outside = [name for name, m in model.named_modules()
               if id(m) not in inside and isinstance(m, _LINEAR_TYPES) and any(_matches(name, k) for k in targets)]
    conv1d = any(isinstance(m, Conv1D) for name, m in linears if any(_matches(name, k) for k in targets))
    return targets, outside, conv1d


def attach_lora(model: PreTrainedModel, settings: LoraSettings | None = None) -> PeftModel:
    """Wrap `model` (modified in place) with a fresh LoRA adapter; only the adapter's parameters train.

    Works on float bases and on bitsandbytes 4-bit bases (QLoRA). Call `merge_lora` before the next surgery.
    """
    if isinstance(model, PeftModel):
        raise TypeError("attach_lora: the model already carries an adapter; merge_lora it first")
    settings = settings or LoraSettings()
    targets, outside, conv1d = _resolve_targets(model, settings.target_modules)
    disable_cpu_repacking(model)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.r, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout, target_modules=targets, exclude_modules=outside or None,
                        fan_in_fan_out=conv1d, bias="none")
    return get_peft_model(model, config)


def merge_lora(peft_model: PeftModel, requantize: bool = False, dtype: torch.dtype | None = None,
               ) -> PreTrainedModel:
    """Fold the adapter into the base weights and return the plain Hugging Face model (config kept as is).

    Float base: peft's exact `merge_and_unload`; weights keep their dtype unless `dtype` is given.
    4-bit base: the adapter deltas are added to a de-quantised float32 copy of each NF4 weight, never re-rounded
    into NF4. The returned model has plain `nn.Linear`/`Conv1D` layers holding (de-quantised base + delta) in
    `dtype` (default: the dtype of the model's unquantised weights, i.e. the compute dtype `load_model` sets);
    that is the precision `save_pretrained` writes. `requantize=True` quantises those merged weights to NF4
    again (a fresh rounding) for the next QLoRA stage; save a de-quantised model, not that one.
    Base parameters come back frozen (requires_grad False), as peft left them.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError("merge_lora: expected a PeftModel from attach_lora")
    if not _has_4bit(peft_model):
        model = peft_model.merge_and_unload()
        if dtype is not None:
            model.to(dtype)
        return quantize_nf4(model) if requantize else model
    deltas = {}
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                deltas[name] = sum(module.get_delta_weight(a).float() for a in adapters)
    model = peft_model.unload()
    dtype = dtype or model.get_input_embeddings().weight.dtype
    _replace_4bit(model, dtype, deltas)
    model.to(dtype)
    return quantize_nf4(model) if requantize else model


def _has_4bit(model: nn.Module) -> bool:
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def disable_cpu_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for avx512_bf16 CPU inference, and undo past repacks.

    Needed before training a QLoRA model on such a CPU: a repacked layer computes outside autograd, so LoRA
    gradients upstream of it become None. Harmless elsewhere (the flag is only read on CPU). Returns the number
    of `Linear4bit` layers seen.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
                weight.data, weight.quant_state, module.quant_state = data, state, state
            count += 1
    return count


def quantize_nf4(model: PreTrainedModel, compute_dtype: torch.dtype | None = None,
                 double_quant: bool = True) -> PreTrainedModel:
    """Replace the linear projections of the decoder layers by NF4 `Linear4bit` layers, in place.

    For re-quantising an in-memory float model between QLoRA stages (`load_model(quantize="nf4")` quantises at
    load). lm_head and embeddings stay in float, as with transformers' loader. GPT-2 `Conv1D` weights are
    transposed first and remembered in `source_cls` (transformers' convention) so `dequantize` restores them.
    `compute_dtype` defaults to the layer's current weight dtype.
    """
    for layer in decoder_layers(model):
        for name, module in list(layer.named_modules()):
            if type(module) not in (nn.Linear, Conv1D):
                continue
            weight = module.weight.detach()
            if isinstance(module, Conv1D):
                weight = weight.T
            out_features, in_features = weight.shape
            q = bnb.nn.Linear4bit(in_features, out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(weight.contiguous().clone(), requires_grad=False,
                                         compress_statistics=double_quant, quant_type="nf4", module=q)
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            q.source_cls = type(module)
            q = q.to(weight.device)  # Params4bit quantises when moved to a device
            layer.set_submodule(name, q)
    disable_cpu_repacking(model)
    model.is_loaded_in_4bit = True  # peft reads this flag to wrap Linear4bit with its 4-bit LoRA layer
    return model


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `Linear4bit` by a float `nn.Linear` (or the `Conv1D` it came from), in place.

    The weights are bitsandbytes' de-quantisation of the NF4 codes, cast to `dtype` (default: the layer's
    compute dtype, float32 if unset). Drops the transformers quantisation marks so `save_pretrained` writes a
    plain float checkpoint.
    """
    return _replace_4bit(model, dtype, {})


def _replace_4bit(model: nn.Module, dtype: torch.dtype | None, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """`dequantize`, adding `deltas[name]` (in the 4-bit layer's [out, in] layout) in float32 before the cast.

    One layer at a time, so peak memory is one float32 matrix beyond the model.
    """
    disable_cpu_repacking(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        target = dtype or module.compute_dtype or torch.float32
        weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        if name in deltas:
            weight += deltas[name].to(weight.device)
        weight = weight.to(target)
        bias = None if module.bias is None else module.bias.detach().to(target)
        with torch.device("meta"):  # skip a random init that is overwritten next
            if issubclass(getattr(module, "source_cls", nn.Linear), Conv1D):
                plain: nn.Module = Conv1D(weight.shape[0], weight.shape[1])
                weight = weight.T
            else:
                plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        plain.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if bias is not None:
            plain.bias = nn.Parameter(bias, requires_grad=False)
        model.set_submodule(name, plain)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return model
