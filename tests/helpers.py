"""Views of library objects that only tests need (kept out of the library's API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradual.ranks import rank_world
from gradual.training_examples import Part, load_pairs


def pairs_of(datamodule: Any) -> list[dict[str, str]]:
    """The (prompt, response) pairs of every part of a `RecoveryDataModule`, in order (texts left out)."""
    return [e for part in datamodule.parts for e in part.examples if "prompt" in e]


def set_pairs(datamodule: Any, pairs: list[dict] | str | Path) -> None:
    """Replace a `RecoveryDataModule`'s data by one part of (prompt, response) pairs."""
    datamodule.set_parts([Part("pairs", 1.0, load_pairs(pairs))])


def batches_per_epoch(datamodule: Any) -> int:
    """Batches each rank of a `RecoveryDataModule` trains per stage: samples_per_epoch / (batch_size · world_size)."""
    return datamodule.samples_per_epoch // (datamodule.batch_size * rank_world()[1])
