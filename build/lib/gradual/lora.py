"""LoRA / QLoRA adapters that heal a pruned model between removals (the optimizer is `GradualModule`'s).

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

import logging
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from gradual.errors import UsageError
from gradual.surgery import decoder_layers

if TYPE_CHECKING:
    from peft import PeftModel

_LINEAR_TYPES = (nn.Linear, Conv1D)  # bnb.nn.Linear4bit subclasses nn.Linear
_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward"  # bitsandbytes' start-up line on avx512_bf16 CPUs


def _drop_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_KERNEL_NOTICE)


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, imported on first use without its notice that the CPU kernel of the repacked inference
    layout is missing: `disable_cpu_repacking` keeps every 4-bit layer off that layout, so the notice is not the
    user's concern. Call it before anything that imports bitsandbytes (peft, transformers' 4-bit loader)."""
    if "bitsandbytes" not in sys.modules:
        logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
        logger.addFilter(_drop_kernel_notice)
        try:
            import bitsandbytes  # noqa: F401
        finally:
            logger.removeFilter(_drop_kernel_notice)
    return sys.modules["bitsandbytes"]


def _peft() -> ModuleType:
    """peft, imported on first use: it imports bitsandbytes, which float-only commands should not pay for."""
    import_bitsandbytes()
    import peft
    import peft.tuners.lora

    return peft


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes `Linear4bit`. Such a layer exists only once bitsandbytes is imported, so asking `sys.modules`
    answers without importing it (peft's LoRA wrapper of a 4-bit layer shares the class name but is not one)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def has_4bit(model: nn.Module) -> bool:
    """Whether any layer of `model` is a bitsandbytes `Linear4bit`."""
    return any(is_4bit(m) for m in model.modules())


@dataclass
class LoraSettings:
    """Adapter shape: fresh adapters every stage, merged into the weights at its end.

    Attributes:
        r: the adapters' rank (>= 1, default 16).
        alpha: the LoRA scaling numerator: an adapter's update is scaled by alpha / r (> 0, default 32).
        dropout: dropout on the adapters' input during training, in [0, 1) (default 0.05).
        target_modules: names of the decoder layers' linear modules to adapt, e.g. [q_proj, v_proj]; null (default)
            = every linear projection inside the decoder layers. Names are matched like peft does: a name matches a
            module whose path equals it or ends with "." + name (so "c_proj" hits both GPT-2 projections of that
            name). Modules outside the decoder layers (lm_head, embeddings) are never adapted.
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
    peft = _peft()
    if isinstance(model, peft.PeftModel):
        raise TypeError("attach_lora: the model already carries an adapter; merge_lora it first")
    settings = settings or LoraSettings()
    targets, outside, conv1d = _resolve_targets(model, settings.target_modules)
    disable_cpu_repacking(model)  # 4-bit layers gradual made are already pinned; this covers a caller's own
    config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=settings.r, lora_alpha=settings.alpha,
                             lora_dropout=settings.dropout, target_modules=targets, exclude_modules=outside or None,
                             fan_in_fan_out=conv1d, bias="none")
    return peft.get_peft_model(model, config)


def merge_lora(peft_model: PeftModel, requantize: bool = False, dtype: torch.dtype | None = None,
               ) -> PreTrainedModel:
    """Fold the adapter into the base weights and return the plain Hugging Face model (config kept as is).

    Float base: peft's exact `merge_and_unload`; weights keep their dtype unless `dtype` is given.
    4-bit base: each adapter delta is added to a de-quantised float32 copy of its NF4 weight, never re-rounded
    into NF4, one layer at a time (a delta is freed before the next is computed, so the peak is one layer's
    update, not a whole model's). The returned model has plain `nn.Linear`/`Conv1D` layers holding (de-quantised
    base + delta) in `dtype` (default: the dtype of the model's unquantised weights, e.g. the embeddings); that is
    the precision `save_pretrained` writes. `requantize=True` quantises those merged weights to NF4 again (a fresh
    rounding) for the next QLoRA stage; save a de-quantised model, not that one.
    Base parameters come back frozen (requires_grad False), as peft left them.
    """
    peft = _peft()
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError("merge_lora: expected a PeftModel from attach_lora")
    if not has_4bit(peft_model):
        model = peft_model.merge_and_unload()
        if dtype is not None:
            model.to(dtype)
        return quantize_nf4(model) if requantize else model
    base = peft_model.get_base_model()
    dtype = dtype or base.get_input_embeddings().weight.dtype
    disable_cpu_repacking(base)
    for name, module in list(base.named_modules()):
        if isinstance(module, peft.tuners.lora.LoraLayer) and is_4bit(module.get_base_layer()):
            base.set_submodule(name, _float_layer(module.get_base_layer(), dtype, lora=module))
    model = peft_model.merge_and_unload()  # adapters on float layers, if a caller made any, merge exactly
    dequantize(model, dtype)
    model.to(dtype)
    return quantize_nf4(model) if requantize else model


def disable_cpu_repacking(model: nn.Module) -> int:
    """Pin every `Linear4bit` of `model` to the layout and dtypes it was created with, so no forward changes it.

    Called right where 4-bit layers are created, before any forward (`quantize_nf4`, `models.load_model`).
    Otherwise bitsandbytes, on an avx512_bf16 CPU, repacks the weight during an eval-mode forward (block scales
    rounded to bfloat16, nested quantisation dropped, output outside autograd), and every forward casts a bias
    to the compute dtype in place. A layer already repacked (a caller's own, run before) is unpacked again so it
    trains and de-quantises; that undo cannot restore the scales exactly, hence pinning first. Returns the number
    of `Linear4bit` layers seen.
    """
    count = 0
    for module in model.modules():
        if not is_4bit(module):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            weight.data, weight.quant_state, module.quant_state = data, state, state
        bias, compute = module.bias, module.compute_dtype
        if bias is not None and compute is not None and bias.dtype != compute:
            bias.data = bias.data.to(compute)
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
    bnb = import_bitsandbytes()
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
    plain float checkpoint. One layer at a time, so peak memory is one float32 matrix beyond the model.
    """
    disable_cpu_repacking(model)
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            model.set_submodule(name, _float_layer(module, dtype))
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return model


def _float_layer(module: nn.Module, dtype: torch.dtype | None, lora: nn.Module | None = None) -> nn.Module:
    """The plain layer (`nn.Linear`, or the `Conv1D` it came from) of a `Linear4bit`: its de-quantised weight,
    plus the active adapters' deltas of `lora` added in float32 before the cast to `dtype` (default: the layer's
    compute dtype, float32 if unset). Each delta is dropped as soon as it is added."""
    from bitsandbytes.functional import dequantize_4bit

    target = dtype or module.compute_dtype or torch.float32
    weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if lora is not None:
        for adapter in lora.active_adapters:
            if adapter in lora.lora_A:
                weight += lora.get_delta_weight(adapter).to(weight.device, torch.float32)
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
    return plain
