"""Run by test_fsdp.py on two gloo ranks (torch.distributed.run): for each case in argv[2] (JSON: name -> [arch,
layers, removed positions, stale]), prune a tiny model in place and prune the same model then shard → unshard it;
rank 0 saves both (argv[1]/<name>/single, /fsdp), and every rank writes which buffers each model holds.

`stale` re-registers the rotary buffers of Gemma3's emptied full-attention type on the model before sharding, one
persistent, and makes a declared one persistent (what surgery and unshard used to leave after a stage), so `unshard`
alone must drop what the rebuilt model does not declare and keep what it does as declared."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from gradual import models, sharding, surgery, tiny


def buffers(model: nn.Module) -> dict[str, bool]:
    """Every buffer of `model` by name, with whether it is persistent (saved in the state dict)."""
    return {f"{owner}.{leaf}" if owner else leaf: leaf not in module._non_persistent_buffers_set
            for owner, module in model.named_modules() for leaf in module._buffers}


def pruned(arch: str, layers: int, removed: list[int]) -> nn.Module:
    model = tiny.tiny_model(arch, layers)  # seeded: the same weights on every rank, as a loaded model has
    surgery.remove_layers(model, removed)
    return model


dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
out = Path(sys.argv[1])
for name, (arch, layers, removed, stale) in json.loads(sys.argv[2]).items():
    single = pruned(arch, layers, removed)
    model = pruned(arch, layers, removed)
    if stale:  # as the old surgery and unshard left them, after one stage under FSDP
        rotary = model.model.rotary_emb
        for leaf, persistent in (("full_attention_inv_freq", True), ("full_attention_original_inv_freq", False)):
            rotary.register_buffer(leaf, rotary.sliding_attention_inv_freq.clone(), persistent=persistent)
        rotary._non_persistent_buffers_set.discard("sliding_attention_inv_freq")
    (out / name).mkdir(parents=True, exist_ok=True)
    report_file = out / name / f"rank{dist.get_rank()}.json"
    try:  # both ranks fail alike (the same model), so the next case's collectives still pair up
        plain = sharding.unshard(sharding.shard(model, mesh))
    except RuntimeError as err:
        report_file.write_text(json.dumps({"error": str(err)}))
        continue
    with torch.device("meta"):
        rebuilt = type(plain)(plain.config)
    held = dict(single.named_buffers())
    report_file.write_text(json.dumps({
        "single": buffers(single), "fsdp": buffers(plain), "rebuilt": buffers(rebuilt),
        "unequal": [n for n, b in plain.named_buffers() if n not in held or not torch.equal(b, held[n])]}))
    if dist.get_rank() == 0:
        models.save_model(single, None, out / name / "single")
        models.save_model(plain, None, out / name / "fsdp")
    dist.barrier()
dist.destroy_process_group()
