"""`StageSampler`: which examples each stage trains on, in which batches, on which rank.

One Lightning epoch is one pruning stage of exactly `samples_per_epoch` examples, whatever the dataset size: the
sampler walks an endless stream of seeded shuffled passes over each source, gives every source its weight's share
of each stage, continues each epoch where the previous one stopped, and groups similar lengths into batches to waste
little padding. It splits the data across DDP ranks itself, so the Trainer must be built with
`use_distributed_sampler=False` (otherwise Lightning wraps it in a `DistributedSampler` and every rank would see a
different, shorter epoch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from gradual.errors import UsageError
from gradual.ranks import rank_world


def check_weights(weights: Sequence[float]) -> None:
    """Mixture weights must be finite and >= 0, and not all 0 (UsageError)."""
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise UsageError(f"recovery source weight {bad[0]} is invalid; weights must be finite and >= 0")
    if not any(w > 0 for w in weights):
        raise UsageError("every recovery source has weight 0; give at least one a positive weight")


class StepItem(int):
    """An example index that also carries the loss normalisers of the optimizer step its micro-batch belongs to: the
    mean number of counted targets (`targets`, positions whose next token is a label) and of real tokens (`tokens`)
    per micro-batch of that step, over all its micro-batches and ranks. A micro-batch's loss is its *sum* over
    positions divided by these, so every token of a step weighs the same however the step is split
    (`gradual.distill.RecoveryObjective`). An `int`, so it indexes and compares as the plain index does."""

    targets: float
    tokens: float

    def __new__(cls, index: int, targets: float, tokens: float) -> StepItem:
        item = super().__new__(cls, index)
        item.targets, item.tokens = targets, tokens
        return item

    def __getnewargs__(self) -> tuple[int, float, float]:  # pickled to DataLoader workers
        return int(self), self.targets, self.tokens


class StageSampler(Sampler[StepItem]):
    """This rank's example indices for one epoch (= one pruning stage) of exactly `samples_per_epoch` examples.

    Examples belong to sources (`sources[i]`, default all 0) with `weights` (default [1]). The global order is an
    endless stream of positions; each position draws the next example of one source, chosen so that every prefix of
    the stream — hence every stage — holds each source in proportion to its weight, to within about one example
    (`mixture`). A source's draws are an endless series of passes over its examples, pass p a permutation seeded by
    (seed, p, source), so within a source every example is seen equally often: an example's rate is ∝ weight / source
    size. Epoch e takes stream positions [e·S, (e+1)·S), so consecutive stages continue where the last one stopped and
    a resumed run that calls `set_epoch(e)` sees exactly the same data. Within the epoch, mega-batches of
    `mega_batch_mult · batch_size · world_size` examples are sorted by length and cut into batches; each group of
    `world_size` neighbouring batches is one step (rank r takes the r-th), and the order of steps is shuffled by
    (seed, e). Everything depends only on (seed, epoch, sizes, weights), so every rank computes the same global order.
    Yields flat indices as `StepItem`s (each also carrying its step's loss normalisers): a DataLoader with the same
    `batch_size` re-forms the batches. An optimizer step is `accumulate` consecutive batches; `targets` (per example,
    counted targets; default: every token but the first) sizes the normalisers, which every rank computes alike from
    the global order, so no communication is needed.
    """

    def __init__(self, lengths: Sequence[int], samples_per_epoch: int, batch_size: int, seed: int = 0,
                 mega_batch_mult: int = 50, rank: int | None = None, world_size: int | None = None,
                 sources: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                 stage_samples: Sequence[int] | None = None, epoch: int = 0,
                 targets: Sequence[int] | None = None, accumulate: int = 1) -> None:
        if not lengths:
            raise UsageError("no recovery examples to sample from; give at least one (prompt, response) pair")
        dist_rank, dist_world = rank_world()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        per_step = batch_size * self.world_size
        for size in [samples_per_epoch, *(stage_samples or [])]:
            if size < per_step or size % per_step:
                raise UsageError(f"samples_per_epoch={size} is invalid; it must be a positive multiple of "
                                 f"batch_size × world_size = {batch_size} × {self.world_size}")
        if accumulate < 1:
            raise UsageError(f"accumulate_grad_batches={accumulate} is invalid; it must be >= 1")
        if mega_batch_mult < 1:
            raise UsageError(f"mega_batch_mult={mega_batch_mult} is invalid; it must be >= 1")
        self.lengths = np.asarray(lengths)
        self.targets = self.lengths - 1 if targets is None else np.asarray(targets)
        if len(self.targets) != len(self.lengths):
            raise ValueError(f"targets must give each of the {len(lengths)} examples a count")
        self.accumulate = accumulate
        self.samples_per_epoch, self.batch_size, self.seed = samples_per_epoch, batch_size, seed
        self.mega_batch_mult = mega_batch_mult
        self.weights = np.asarray([1.0] if weights is None else weights, dtype=np.float64)
        self.sources = np.zeros(len(lengths), dtype=np.int64) if sources is None else np.asarray(sources)
        check_weights(self.weights.tolist())
        if len(self.sources) != len(self.lengths) or not np.isin(self.sources, range(len(self.weights))).all():
            raise ValueError(f"sources must give each of the {len(lengths)} examples one of {len(self.weights)} "
                             "source indices")
        self.members = [np.flatnonzero(self.sources == k) for k in range(len(self.weights))]
        empty = [k for k, w in enumerate(self.weights) if w > 0 and not len(self.members[k])]
        if empty:
            raise UsageError(f"recovery source {empty[0]} has weight {self.weights[empty[0]]} but no examples")
        self.stage_samples = list(stage_samples) if stage_samples else None
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning's fit loop before every epoch (also after resuming from a checkpoint)."""
        self.epoch = epoch

    def bounds(self, epoch: int) -> tuple[int, int]:
        """(first stream position, examples) of `epoch`: `samples_per_epoch` each, or with `stage_samples` each
        stage its own count (the last one repeating), so stages of different lengths still take consecutive,
        non-overlapping slices of the stream and a run's examples do not depend on its longest stage."""
        if self.stage_samples is None:
            return epoch * self.samples_per_epoch, self.samples_per_epoch
        sizes = self.stage_samples + [self.stage_samples[-1]] * max(0, epoch + 1 - len(self.stage_samples))
        return sum(sizes[:epoch]), sizes[epoch]

    def __len__(self) -> int:
        return self.bounds(self.epoch)[1] // self.world_size

    def _pass(self, source: int, p: int) -> np.ndarray:
        key = [self.seed, 0, p] if source == 0 else [self.seed, 0, p, source]
        members = self.members[source]
        return members[np.random.default_rng(key).permutation(len(members))]

    def _draws(self, source: int, start: int, count: int) -> np.ndarray:
        """Draws [start, start + count) of the source's endless stream of passes, as example indices."""
        n = len(self.members[source])
        first, last = start // n, (start + count - 1) // n
        stream = np.concatenate([self._pass(source, p) for p in range(first, last + 1)])
        return stream[start - first * n: start - first * n + count]

    def mixture(self, end: int) -> np.ndarray:
        """The source of each of the first `end` stream positions.

        Source k's j-th draw falls due at (j + ½) / weight_k and positions take draws in order of due time (ties: the
        lower k) — Sainte-Laguë's sequential apportionment. Any prefix of n positions thus holds close to
        n · weight_k / Σ weights draws of source k, and a longer prefix never holds fewer, so stages are resumable."""
        total, k_max = self.weights.sum(), len(self.weights)
        due, source = [], []
        for k, w in enumerate(self.weights):
            if w > 0:  # at most n·w/Σw + k_max/2 + 1 draws of k are among the first n positions
                draws = np.arange(math.ceil(end * w / total) + k_max + 2)
                due.append((draws + 0.5) / w)
                source.append(np.full(len(draws), k))
        due_all, source_all = np.concatenate(due), np.concatenate(source)
        return source_all[np.lexsort((source_all, due_all))][:end]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's global stream slice, before length grouping and rank split."""
        start, size = self.bounds(epoch)
        mixture = self.mixture(start + size)
        order = np.empty(size, dtype=np.int64)
        for k in np.unique(mixture[start:]):
            here = np.flatnonzero(mixture[start:] == k)
            order[here] = self._draws(int(k), int((mixture[:start] == k).sum()), len(here))
        return order

    def _global_steps(self, epoch: int) -> list[np.ndarray]:
        """Every rank's examples of each step of `epoch` (`world_size` neighbouring batches), in training order."""
        order = self.epoch_order(epoch)
        mega = self.mega_batch_mult * self.batch_size * self.world_size
        steps = []
        for lo in range(0, len(order), mega):
            chunk = order[lo: lo + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            per_step = self.batch_size * self.world_size
            steps.extend(chunk[s: s + per_step] for s in range(0, len(chunk), per_step))
        shuffle = np.random.default_rng([self.seed, 1, epoch]).permutation(len(steps))
        return [steps[i] for i in shuffle]

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in training order."""
        return self._rank_batches(self._global_steps(epoch))

    def _rank_batches(self, steps: list[np.ndarray]) -> list[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [step[lo:hi].tolist() for step in steps]

    def normalizers(self, epoch: int) -> list[tuple[float, float]]:
        """(targets, tokens) per micro-batch of the optimizer step each of this rank's batches of `epoch` belongs to:
        the step's counted targets and real tokens over its `accumulate` batches on every rank, divided by
        `accumulate × world_size`. A step cut short at the epoch's end is divided alike, as Lightning divides its
        loss by `accumulate_grad_batches` whatever the group's size."""
        return self._normalizers(self._global_steps(epoch))

    def _normalizers(self, steps: list[np.ndarray]) -> list[tuple[float, float]]:
        a, per_batch = self.accumulate, self.accumulate * self.world_size
        out = []
        for j in range(0, len(steps), a):
            members = np.concatenate(steps[j: j + a])
            value = (float(self.targets[members].sum()) / per_batch, float(self.lengths[members].sum()) / per_batch)
            out.extend([value] * len(steps[j: j + a]))
        return out

    def __iter__(self) -> Iterator[StepItem]:
        steps = self._global_steps(self.epoch)  # the epoch's order, computed once for both
        for batch, (targets, tokens) in zip(self._rank_batches(steps), self._normalizers(steps), strict=True):
            yield from (StepItem(i, targets, tokens) for i in batch)
