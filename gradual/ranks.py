"""Process-group helpers: which rank this is, and decisions taken once on rank 0 and shared with every rank.

Under DDP every rank runs the same loop on its own share of the data. Anything the ranks must agree on exactly
(which layers go, whether to stop) is decided on rank 0 and broadcast: two ranks computing the "same" scores can
differ in the last bits (another device, kernel or reduction order), and a near-tie would then remove different
layers on different ranks — after which their weights no longer match and DDP silently trains two models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
