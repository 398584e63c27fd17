"""Fully sharded training of the student for one stage at a time (FSDP2: PyTorch's `fully_shard`, arXiv 2304.11277).

`recovery.params: full` on a 7-8B model does not fit one GPU next to its teacher: the fp32 AdamW state alone is
8 bytes per weight. Under Lightning's `ModelParallelStrategy` (which sets up the process group and a device mesh
and leaves the wrapping to the module) every rank holds only its shard of the student's weights, gradients and
optimizer state while a stage trains, and runs the whole teacher on its own batch.

The loop changes the model's structure between stages, and scoring, evaluation and saving need the whole model.
So, like the DDP wrapper, the sharding lives for one stage: `shard` right before the stage's optimizer is
built (each decoder layer one unit, then the rest), `unshard` at its end gathers the full weights on every rank
into a plain model of the same architecture, which the callbacks score and save as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradual import surgery
from gradual.errors import UsageError


def data_parallel_mesh(strategy: Any) -> Any | None:
    """The device mesh a stage is sharded over: the data-parallel dimension of a `ModelParallelStrategy` (its
    tensor-parallel size is 1, checked by `gradual fit`); None for any other strategy (DDP, one device), which
    trains the plain model."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return strategy.device_mesh["data_parallel"] if isinstance(strategy, ModelParallelStrategy) else None


def check_params(params: str) -> None:
    """FSDP shards full-weight recovery; LoRA adapters are small and train under DDP.

    Raises:
        UsageError: `params` is `lora`.
    """
    if params == "lora":
        raise UsageError("recovery.params='lora' with trainer.strategy ModelParallelStrategy (FSDP) is not "
                         "supported; FSDP shards full-weight recovery (params: full or near_cut); train adapters "
                         "with strategy: ddp")


def shard(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard `model` in place over `mesh`: every decoder layer its own FSDP unit (gathered only around its own
    forward and backward), then the root (embeddings, final norm, head). Frozen weights are sharded too."""
    from torch.distributed.fsdp import fully_shard

    for layer in surgery.decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` holds FSDP-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def unshard(model: nn.Module) -> nn.Module:
    """A plain model of `model`'s architecture, config (kept-layer map included) and dtype, holding the full
    weights on every rank (a collective: every rank calls it); tied embeddings stay tied.

    Buffers (rotary tables) are not sharded: exactly those the rebuilt model declares take `model`'s tensors, each
    persistent or not as declared. A buffer `model` holds beyond them stays behind: copied over, it would join the
    state dict and be saved as a key that no reload of the config declares.

    Raises:
        RuntimeError: the rebuilt model and `model` disagree on a parameter, or it declares a buffer `model` lacks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    held = dict(model.named_buffers(remove_duplicate=False))
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    device = next(iter(state.values())).device
    dtype = model.get_input_embeddings().weight.dtype
    with torch.device("meta"):
        plain = cls(model.config)
    plain = plain.to(dtype).to_empty(device=device)
    loaded = plain.load_state_dict({k: v for k, v in state.items() if k not in held}, strict=False)
    declared = [name for name, _ in plain.named_buffers(remove_duplicate=False)]
    missing = [k for k in loaded.missing_keys if k not in declared] + [k for k in declared if k not in held]
    if missing or loaded.unexpected_keys:
        raise RuntimeError(f"unshard: the rebuilt {cls.__name__} and the sharded model disagree; missing: "
                           f"{', '.join(missing) or '-'}; unexpected: {', '.join(loaded.unexpected_keys) or '-'}")
    for name in declared:  # the name stays in (or out of) its owner's non-persistent set, as the rebuild declares
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = held[name]
    plain.tie_weights()
    plain.generation_config = model.generation_config
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain.train(model.training)
