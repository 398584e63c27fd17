"""Find, remove and temporarily skip the decoder layers of Hugging Face causal LMs.

Deleting a layer from the module list is not enough: attention modules index the KV cache by `layer_idx`, the
config says how many layers to run and which attention type (sliding or full) each one gets, and a stale config
makes `from_pretrained` silently re-create the missing layers with random weights. `remove_layers` keeps all of
that consistent and records, in the config, which original layers survive, so that a chain of removals (and a
saved model) always maps back to the unpruned model.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from numbers import Integral
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from gradual.errors import UsageError

# model_type -> attribute path of the decoder-layer ModuleList inside the *ForCausalLM model.
_LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
}

# model_type -> attribute path of the norm after the last decoder layer.
_FINAL_NORM_PATHS: dict[str, str] = {
    **{arch: "model.norm" for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")},
    "gpt_neox": "gpt_neox.final_layer_norm",
    "gpt2": "transformer.ln_f",
    "opt": "model.decoder.final_layer_norm",
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_LAYER_PATHS))
"""`config.model_type` values whose decoder layers this module can find and remove."""

ORIGINAL_LAYERS_KEY = "gradual_original_layers"
"""Config field holding the original indices of the kept layers (saved in config.json)."""


def base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper (`PeftModel` or a tuner such as `LoraModel`), else `model`."""
    tuner = _peft_tuner(model)
    return tuner.model if tuner is not None else model


def architecture(model: nn.Module) -> str:
    """The model's `config.model_type`, refusing anything this module does not support."""
    hf_model = base_model(model)
    config = getattr(hf_model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise UsageError(
            f"{type(hf_model).__name__} is not a transformers model; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.model_type not in _LAYER_PATHS:
        raise UsageError(
            f"unsupported architecture {config.model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config.model_type


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (the same object the model runs, so edits act in place)."""
    arch = architecture(model)
    module: Any = base_model(model)
    for name in _LAYER_PATHS[arch].split("."):
        module = getattr(module, name)
    return module


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (trained with the layers it normalises)."""
    module: Any = base_model(model)
    for name in _FINAL_NORM_PATHS[architecture(model)].split("."):
        module = getattr(module, name)
    return module


def near_cuts(original: Sequence[int], k: int, depth: int | None = None) -> list[int]:
    """Current positions of the `k` kept layers on each side of every cut, sorted.

    A cut lies between neighbouring kept layers whose original indices are not consecutive (layers were removed
    between them); a cut at the very start (original layer 0 gone) or at the end (the original model's last
    layers gone; known only with its `depth`) has kept layers on one side only.
    Example: original [0, 1, 4, 5, 6], k=1 → positions [1, 2] (layers 1 and 4 border the cut of layers 2-3).
    """
    cuts = [p for p in range(1, len(original)) if original[p] != original[p - 1] + 1]
    if original and original[0] != 0:
        cuts.append(0)
    if original and depth is not None and original[-1] != depth - 1:
        cuts.append(len(original))
    chosen = {q for c in cuts for q in range(c - k, c + k) if 0 <= q < len(original)}
    return sorted(chosen)


def num_layers(model: nn.Module) -> int:
    """How many decoder layers the model has now."""
    return len(decoder_layers(model))


def original_indices(model_or_config: nn.Module | PretrainedConfig) -> list[int]:
    """Original indices of the current layers; `range(n)` for a model that was never pruned."""
    if isinstance(model_or_config, PretrainedConfig):
        config = model_or_config
    else:
        architecture(model_or_config)
        config = base_model(model_or_config).config
    recorded = getattr(config, ORIGINAL_LAYERS_KEY, None)
    if recorded is None:
        return list(range(config.num_hidden_layers))
    return [int(i) for i in recorded]


def remove_layers(model: nn.Module, indices: Iterable[int] | int) -> list[int]:
    """Remove the layers at `indices` (current positions) in place; return their original indices.

    Works on plain transformers models and through peft wrappers: LoRA adapters live inside the layers, so they
    leave with a removed layer and follow a kept one to its new position (state-dict keys renumber with the list).
    """
    hf_model = base_model(model)
    arch = architecture(hf_model)
    _refuse_unprunable(hf_model, arch)
    layers = decoder_layers(hf_model)
    n = len(layers)
    removed = _checked_indices(indices, n, allow_all=False)
    if not removed:
        return []
    original = original_indices(hf_model.config)
    if len(original) != n:
        raise UsageError(f"config {ORIGINAL_LAYERS_KEY} lists {len(original)} layers but the model has {n}")
    removed_set = set(removed)
    kept = [i for i in range(n) if i not in removed_set]

    for i in reversed(removed):
        del layers[i]
    for new_index, layer in enumerate(layers):
        _renumber(layer, new_index)
    for config in _configs(hf_model):
        _prune_config(config, kept, n, [original[i] for i in kept])
    _refresh_cached_flags(hf_model)
    _drop_undeclared_buffers(hf_model)
    tuner = _peft_tuner(model)
    if tuner is not None:
        _update_peft_bookkeeping(tuner, _LAYER_PATHS[arch] + ".", {old: new for new, old in enumerate(kept)})
    return [original[i] for i in removed]


@contextmanager
def skip_layers(model: nn.Module, indices: Iterable[int] | int) -> Iterator[None]:
    """Within the block, the layers at `indices` (current positions) pass their input through unchanged.

    Done in place with forward hooks (no model copy), restored on exit. A skipped layer still runs and its output
    is discarded, so it keeps writing its own KV-cache entry and cache lengths stay right; the result equals the
    model with those layers removed. Meant for no-cache forwards (importance scoring, tests); with a cache the
    skipped layer's entry is computed but never read by the output. Hooks registered later see the identity output.
    """
    layers = decoder_layers(model)
    chosen = _checked_indices(indices, len(layers), allow_all=True)
    handles = []
    try:
        for i in chosen:
            handles.append(layers[i].register_forward_hook(_pass_input_through, with_kwargs=True, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pass_input_through(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook: replace a decoder layer's hidden-state output by its input, keeping the return convention."""
    hidden_states = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, torch.Tensor):
        return hidden_states
    if isinstance(output, tuple):
        return (hidden_states, *output[1:])
    raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; expected a tensor or a tuple")


def check_indices(indices: Iterable[int] | int, n: int) -> list[int]:
    """Validate layer indices for a model of `n` layers before loading it (the CLI's early check); sorted."""
    return _checked_indices(indices, n, allow_all=False)


def current_positions(indices: Iterable[int] | int, original: Sequence[int]) -> list[int]:
    """Current positions of the layers named by their *original* indices, checked before any model loads.

    `original` lists the original indices a model still has (`original_indices`, or `models.original_layers` from a
    config alone). An index the model never had, or no longer has (removed earlier), is refused in one line, as are
    repeats and a list that would leave no layer. Returns positions sorted like the indices.
    """
    if isinstance(indices, Integral):
        indices = [indices]
    positions = {int(i): p for p, i in enumerate(original)}
    seen: set[int] = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise UsageError(f"layer index {i!r} is not an integer; allowed (original indices): {_span(original)}")
        if int(i) not in positions:
            gone = " (removed earlier)" if 0 <= i <= max(original, default=-1) else ""
            raise UsageError(f"layer index {i} is out of range{gone}; this model keeps original layers "
                             f"{_span(original)}")
        if int(i) in seen:
            raise UsageError(f"layer index {i} is given more than once")
        seen.add(int(i))
    if len(seen) >= len(original):
        raise UsageError(f"removing {len(seen)} of {len(original)} layers would leave none; at least one layer "
                         "must stay")
    return sorted(positions[i] for i in seen)


def _span(indices: Sequence[int]) -> str:
    """`[0, 1, 2, 5, 7, 8]` → "0-2, 5, 7-8": a short way to show which original layers a model keeps."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _checked_indices(indices: Iterable[int] | int, n: int, allow_all: bool) -> list[int]:
    """Validate user-given current layer indices; return them sorted."""
    if isinstance(indices, Integral):
        indices = [indices]
    seen: set[int] = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise UsageError(f"layer index {i!r} is not an integer; allowed: 0..{n - 1}")
        if not 0 <= i < n:
            raise UsageError(f"layer index {i} is out of range; this model has {n} layers, allowed: 0..{n - 1}")
        if int(i) in seen:
            raise UsageError(f"layer index {i} is given more than once")
        seen.add(int(i))
    if not allow_all and len(seen) >= n:
        raise UsageError(f"removing {len(seen)} of {n} layers would leave none; at least one layer must stay")
    return sorted(seen)


def _refuse_unprunable(hf_model: nn.Module, arch: str) -> None:
    """Refuse configurations whose per-layer behaviour cannot be carried over to a renumbered model."""
    config = hf_model.config
    if getattr(config, "is_heterogeneous", False):
        raise UsageError("models with a heterogeneous per_layer_config cannot be pruned by gradual")
    if arch == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UsageError(
            "gpt2 with scale_attn_by_inverse_layer_idx=True cannot be pruned: the attention scale depends on the "
            "layer index and would change on reload"
        )


def _renumber(layer: nn.Module, new_index: int) -> None:
    """Set every `layer_idx` inside a decoder layer (the layer's own, attention, cross-attention) to its position.

    Attention modules use it to address their KV-cache slot, so stale values would collide or overflow.
    """
    for module in layer.modules():
        current = module.__dict__.get("layer_idx")
        if isinstance(current, int) and not isinstance(current, bool):
            module.layer_idx = new_index


def _configs(hf_model: nn.Module) -> list[PretrainedConfig]:
    """Every distinct config object the model's modules hold (normally one, shared)."""
    found: dict[int, PretrainedConfig] = {}
    for module in hf_model.modules():
        config = module.__dict__.get("config")
        if isinstance(config, PretrainedConfig):
            found.setdefault(id(config), config)
    return list(found.values())


def _prune_config(config: PretrainedConfig, kept: list[int], n: int, original_kept: list[int]) -> None:
    """Make every depth-dependent config field describe the kept layers only."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != n:
        raise UsageError(f"config.layer_types has {len(layer_types)} entries but the model has {n} layers")
    max_window_layers = getattr(config, "max_window_layers", None)
    config.num_hidden_layers = len(kept)
    if layer_types is not None:
        # The kept layers' own types: attention masks and rotary tables are chosen per entry.
        config.layer_types = [layer_types[i] for i in kept]
    if isinstance(max_window_layers, int):
        # Qwen2/Qwen3 derive layer_types from it (layers at or past it slide); keep the two in agreement.
        config.max_window_layers = sum(1 for i in kept if i < max_window_layers)
    setattr(config, ORIGINAL_LAYERS_KEY, list(original_kept))


def _refresh_cached_flags(hf_model: nn.Module) -> None:
    """Recompute flags a model caches from the config at construction (Qwen2/Qwen3 `has_sliding_layers`)."""
    layer_types = getattr(hf_model.config, "layer_types", None)
    if layer_types is None:
        return
    for module in hf_model.modules():
        if "has_sliding_layers" in module.__dict__:
            module.has_sliding_layers = "sliding_attention" in layer_types


def _drop_undeclared_buffers(hf_model: nn.Module) -> None:
    """Drop the buffers that a model built from the pruned config no longer declares, with the lists that name them.

    Gemma3's rotary module holds one inverse-frequency table per layer type (and `layer_types`, `rope_type` listing
    them); once no kept layer has a type, its tables are state a reload of the saved model would not have. They are
    non-persistent, so saving this model skips them, but code that copies buffers by name into a model rebuilt from
    the config (FSDP's unshard did) turns them into saved, unexpected keys. The rebuild is on the meta device (no
    memory, about 0.1 s for a 7B config); modules absent from it (LoRA adapters) are left alone.
    """
    with torch.device("meta"):
        rebuilt = type(hf_model)(copy.deepcopy(hf_model.config))
    twins = dict(rebuilt.named_modules())
    for name, module in hf_model.named_modules():
        twin = twins.get(name)
        if type(twin) is not type(module):
            continue
        stale = [leaf for leaf in module._buffers if leaf not in twin._buffers]
        for leaf in stale:
            del module._buffers[leaf]
            module._non_persistent_buffers_set.discard(leaf)
        if stale:
            for attr, value in vars(twin).items():
                if not attr.startswith("_") and attr in vars(module) and isinstance(value, list | tuple | dict | set):
                    setattr(module, attr, copy.copy(value))


def _peft_tuner(model: nn.Module) -> nn.Module | None:
    """The peft tuner (e.g. `LoraModel`) of a peft-wrapped model, or None.

    A peft object can only exist once peft was imported, so looking it up in `sys.modules` avoids paying peft's
    import time for plain models.
    """
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    if isinstance(model, peft.PeftModel):
        return model.base_model
    if isinstance(model, peft.tuners.tuners_utils.BaseTuner):
        return model
    return None


def _update_peft_bookkeeping(tuner: nn.Module, prefix: str, new_of_old: dict[int, int]) -> None:
    """Renumber the layer positions peft remembers by name or index, so its records match the pruned model."""
    renamed = (_renumbered_name(name, prefix, new_of_old) for name in tuner.targeted_module_names)
    tuner.targeted_module_names = [name for name in renamed if name is not None]
    for peft_config in tuner.peft_config.values():
        layers_to_transform = getattr(peft_config, "layers_to_transform", None)
        if layers_to_transform is None:
            continue
        if isinstance(layers_to_transform, int):
            layers_to_transform = [layers_to_transform]
        peft_config.layers_to_transform = [new_of_old[i] for i in layers_to_transform if i in new_of_old]


def _renumbered_name(name: str, prefix: str, new_of_old: dict[int, int]) -> str | None:
    """`prefix.<old>.rest` -> `prefix.<new>.rest`; None when that layer was removed; other names unchanged."""
    if not name.startswith(prefix):
        return name
    index, dot, rest = name[len(prefix) :].partition(".")
    if not index.isdigit():
        return name
    new_index = new_of_old.get(int(index))
    if new_index is None:
        return None
    return f"{prefix}{new_index}{dot}{rest}"
