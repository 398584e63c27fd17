"""Decisions under DDP are taken on rank 0 and shared: two gloo ranks whose own scores would choose differently."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradual import pipeline, ranks
from gradual.module import GradualModule
from gradual.stages import Schedule, Selection


def _silence_layer(module: GradualModule, index: int) -> None:
    """Zero a layer's two output projections: its output equals its input, so block influence ranks it first."""
    layer = module.model.model.layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def _rank_main(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        module = GradualModule(model="tiny:llama:6", schedule=Schedule(max_layers=2),
                               selection=Selection(num_calibration=4, calibration_max_length=32))
        module.configure_model()
        _silence_layer(module, 2 + rank)  # rank 0 would remove layer 2, rank 1 layer 3
        chooser = pipeline.LayerChooser(module.selection, module.tokenizer, module.seed, None)
        own, _ = pipeline.score_and_choose(module.model, 1, module.selection, lambda: chooser.calibration("cpu"),
                                           module.seed)
        shared, scores = module.choose_layers(1)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"own": own, "shared": shared, "scores": scores}))
    finally:
        dist.destroy_process_group()


def test_layers_are_chosen_on_rank0_even_when_ranks_score_differently(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["own"], r1["own"]) == ([2], [3]), "precondition: each rank alone would remove another layer"
    assert r0["shared"] == r1["shared"] == [2]
    assert r0["scores"] == r1["scores"]


def test_without_a_process_group_the_decision_is_local() -> None:
    assert ranks.rank_world() == (0, 1)
    assert ranks.decide_on_rank0(lambda: [7]) == [7]
    assert ranks.broadcast_from_rank0({"a": 1}) == {"a": 1}
