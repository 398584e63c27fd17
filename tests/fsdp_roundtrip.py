"""Run by test_fsdp.py on two gloo ranks (torch.distributed.run): shard a pruned tiny model, gather it back with
`gradual.sharding.unshard`, and write what the plain model holds (rank<k>.json in argv[1])."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from gradual import sharding, surgery, tiny

dist.init_process_group("gloo")
config = tiny.tiny_config("llama", num_layers=5)
config.tie_word_embeddings = True
torch.manual_seed(0)  # the same weights on every rank, as a loaded model has
model = type(tiny.tiny_model("llama", num_layers=5))(config)
surgery.remove_layers(model, [2])
ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    before = model(input_ids=ids).logits
sharded = sharding.shard(model, init_device_mesh("cpu", (dist.get_world_size(),)))
was_sharded = sharding.is_sharded(sharded)
plain = sharding.unshard(sharded)
with torch.no_grad():
    after = plain(input_ids=ids).logits
out = {"was_sharded": was_sharded, "is_sharded": sharding.is_sharded(plain), "class": type(plain).__name__,
       "tied": plain.lm_head.weight is plain.get_input_embeddings().weight,
       "kept": surgery.original_indices(plain), "max_diff": float((after - before).abs().max()),
       "buffers": sorted(n for n, _ in plain.named_buffers()),
       "meta": any(t.is_meta for t in plain.state_dict().values())}
Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
dist.destroy_process_group()
