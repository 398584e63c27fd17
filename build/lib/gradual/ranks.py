"""Process-group helpers: which rank this is, decisions taken once on rank 0 and shared with every rank, and work
split across ranks and gathered back in order.

Under DDP every rank runs the same loop on its own share of the data. Anything the ranks must agree on exactly
(which layers go, whether to stop) is decided on rank 0 and broadcast: two ranks computing the "same" scores can
differ in the last bits (another device, kernel or reduction order), and a near-tie would then remove different
layers on different ranks — after which their weights no longer match and DDP silently trains two models.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def local_rank() -> int:
    """This process's rank on its node as the launcher set it (`LOCAL_RANK`, 0 without a launcher): the GPU it
    uses, known before any process group exists."""
    return int(os.environ.get("LOCAL_RANK", 0))


def broadcast_from_rank0(obj: T) -> T:
    """Rank 0's `obj` on every rank (any picklable object); `obj` itself without a process group."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def decide_on_rank0(decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 only and return its result on every rank (the other ranks wait for it)."""
    rank, world = rank_world()
    if world == 1:
        return decide()
    return broadcast_from_rank0(decide() if rank == 0 else None)


def split_for_rank(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's share: items rank, rank + world, ... (balanced to within one item)."""
    return list(items[rank::world])


def merge_shards(shards: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of `split_for_rank` over all ranks: the full list in its original order."""
    world, n = len(shards), sum(len(s) for s in shards)
    out: list[Any] = [None] * n
    for rank, part in enumerate(shards):
        if len(part) != len(range(rank, n, world)):
            raise ValueError(f"shard {rank} has {len(part)} items; a strided split of {n} over {world} ranks "
                             f"gives it {len(range(rank, n, world))}")
        out[rank::world] = part
    return out


def gather_in_order(local: Sequence[T]) -> list[T]:
    """All ranks' shards (from `split_for_rank`) merged in the original order, on every rank; `local` as-is without
    DDP."""
    _, world = rank_world()
    if world == 1:
        return list(local)
    shards: list[Any] = [None] * world
    torch.distributed.all_gather_object(shards, list(local))
    return merge_shards(shards)
