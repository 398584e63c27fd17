"""95% intervals for scores, retention and differences between recipes, by bootstrap over the evaluated problems.

A task's score is the mean of its per-problem scores (0/1, or partial credit); its retention is that mean over the
baseline's mean on the *same* problems, so the bootstrap resamples problems jointly for the stage and the baseline
(paired). Resampling goes through torchmetrics' `BootStrapper` (multinomial, i.e. the classic bootstrap of Efron &
Tibshirani, percentile intervals). Replicates are kept per task so that a group's figure — the mean of per-task
retentions capped at 1, so that no task pays for another — gets its interval from the same replicates (tasks resampled
independently), and so does the paired difference between two recipes evaluated on the same problems.

Several training seeds of one recipe (`gradual compare`'s `compare.seeds`) are pooled: a task's score is the mean
of the seeds' means. Seeds and problems are crossed (every seed answers the same problems), so a replicate resamples
both independently — the seeds with replacement, and the problems once for every seed, arm and the baseline — and
scores the resampled cells: the two-way "pigeonhole" bootstrap of Owen (2007, Ann. Appl. Stat. 1(2)), mildly
conservative for crossed random effects, where resampling problems alone would leave the seed-to-seed spread out.
The seed draw is shared by every task and by every arm with as many seeds (paired by index: seed j of two arms
shares their data-order and adapter-init seed), so a seed that lifts or sinks every task moves the whole group and
the difference. With a handful of seeds the seed component is coarse (a bootstrap over S seeds sees (S − 1)/S of
their variance); with one seed every figure is exactly the single-run figure.

Everything is seeded (`seed`, and the task's key), so a figure is the same whenever it is recomputed.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torchmetrics import Metric
from torchmetrics.wrappers import BootStrapper

NUM_BOOTSTRAPS = 1000
LEVEL = 0.95
TIE = "tie"


class ColumnMeans(Metric):
    """The mean of each of `columns` paired per-problem series: update(a, b, ...) with [n] tensors, compute → [columns].
    The base metric the bootstrap resamples: one index set per replicate for all columns keeps them paired."""

    full_state_update = False

    def __init__(self, columns: int) -> None:
        super().__init__()
        self.add_state("sums", torch.zeros(columns, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, *series: torch.Tensor) -> None:
        self.sums += torch.stack([s.double().sum() for s in series])
        self.count += series[0].numel()

    def compute(self) -> torch.Tensor:
        return self.sums / self.count


@lru_cache(maxsize=8)
def _bootstrapper(columns: int, replicates: int) -> BootStrapper:
    """One `BootStrapper` per shape, reset between uses: building its `replicates` metric copies costs seconds."""
    return BootStrapper(ColumnMeans(columns), num_bootstraps=replicates, mean=False, std=False, raw=True,
                        sampling_strategy="multinomial")


def paired_replicates(series: Sequence[Sequence[float]], key: str = "", seed: int = 0,
                      replicates: int = NUM_BOOTSTRAPS) -> torch.Tensor:
    """[replicates, len(series)] bootstrap replicates of the means of paired per-problem series (all of one length n:
    problem i of every series is the same problem). Seeded by (`seed`, `key`).

    Raises:
        ValueError: series of different lengths, or empty.
    """
    n = {len(s) for s in series}
    if len(n) != 1 or 0 in n:
        raise ValueError(f"paired series must be non-empty and of one length; got lengths {[len(s) for s in series]}")
    boot = _bootstrapper(len(series), replicates)
    boot.reset()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
        boot.update(*(torch.as_tensor(list(s), dtype=torch.float64) for s in series))
        return boot.compute()["raw"]


def seed_weights(count: int, seed: int = 0, replicates: int = NUM_BOOTSTRAPS) -> torch.Tensor:
    """[replicates, count] weights that resample `count` training seeds with replacement: per replicate, how often
    each seed was drawn, over `count`. Seeded by (`seed`, `count`) only, never by task or arm, so every task and every
    arm with as many seeds shares the draw (Owen's pigeonhole bootstrap: one draw per factor). One seed: all ones."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:seeds:{count}".encode()))
    drawn = torch.randint(count, (replicates, count), generator=generator)
    return torch.nn.functional.one_hot(drawn, count).sum(1).double() / count


def _pooled(reps: torch.Tensor, seed: int) -> torch.Tensor:
    """[replicates] the seed-resampled mean of [replicates, seeds] per-seed problem-resampled means."""
    return (reps * seed_weights(reps.shape[1], seed, reps.shape[0])).sum(1)


def _mean_of_means(seed_items: Sequence[Sequence[float]]) -> float:
    return sum(sum(s) / len(s) for s in seed_items) / len(seed_items)


def percentile(values: torch.Tensor, level: float = LEVEL) -> tuple[float | None, float | None]:
    """The central `level` percentile interval of bootstrap replicates (nearest order statistics); an end that is
    not finite (replicates whose baseline mean was 0) is None, i.e. unbounded."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    inf = float("inf")  # torch's nan_to_num also maps ±inf to the largest finite floats unless told otherwise
    ends = torch.quantile(values.double().nan_to_num(nan=inf, posinf=inf, neginf=-inf), q, interpolation="nearest")
    return tuple(float(e) if torch.isfinite(e) else None for e in ends)  # type: ignore[return-value]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("inf")))


@dataclass
class TaskFigures:
    """One task at one stage: its score and retention with 95% intervals, and the retention replicates the group
    figures and paired differences are drawn from."""

    score: float
    score_ci: tuple[float | None, float | None]
    retention: float | None
    retention_ci: tuple[float | None, float | None]
    replicates: torch.Tensor  # [replicates] retention, inf where a replicate's baseline mean is 0

    def to_dict(self) -> dict[str, object]:
        return {"score": self.score, "score_ci": list(self.score_ci), "retention": self.retention,
                "retention_ci": list(self.retention_ci)}


def task_figures(items: Sequence[float], baseline_items: Sequence[float], key: str = "", seed: int = 0,
                 replicates: int = NUM_BOOTSTRAPS) -> TaskFigures:
    """Score and retention (stage mean / baseline mean on the same problems) with paired-bootstrap 95% intervals.
    Retention is None (undefined) when the baseline scores 0.

    Raises:
        ValueError: the two series differ in length (not the same problems).
    """
    reps = paired_replicates([items, baseline_items], key, seed, replicates)
    score, base = sum(items) / len(items), sum(baseline_items) / len(baseline_items)
    retention_reps = _ratio(reps[:, 0], reps[:, 1])
    defined = base > 0
    return TaskFigures(score=score, score_ci=percentile(reps[:, 0]), retention=score / base if defined else None,
                       retention_ci=percentile(retention_reps) if defined else (None, None),
                       replicates=retention_reps)


def pooled_task_figures(seed_items: Sequence[Sequence[float]], baseline_items: Sequence[float], key: str = "",
                        seed: int = 0, replicates: int = NUM_BOOTSTRAPS) -> TaskFigures:
    """`task_figures` of one recipe trained under several seeds, each seed's per-problem scores on the baseline's
    problems: the score is the mean of the seeds' means, and the intervals resample seeds and problems (the module's
    pigeonhole bootstrap), so they include the seed-to-seed spread. One seed gives exactly `task_figures`.

    Raises:
        ValueError: a seed's series differs in length from the baseline's (not the same problems), or no seed.
    """
    if not seed_items:
        raise ValueError("pooled figures need at least one seed's scores")
    count = len(seed_items)
    reps = paired_replicates([*seed_items, baseline_items], key, seed, replicates)
    pooled = _pooled(reps[:, :count], seed)
    score, base = _mean_of_means(seed_items), sum(baseline_items) / len(baseline_items)
    retention_reps = _ratio(pooled, reps[:, count])
    defined = base > 0
    return TaskFigures(score=score, score_ci=percentile(pooled), retention=score / base if defined else None,
                       retention_ci=percentile(retention_reps) if defined else (None, None),
                       replicates=retention_reps)


@dataclass
class GroupFigures:
    """A group of tasks: the mean of per-task retentions capped at 1 with its 95% interval, and the worst task."""

    mean: float
    mean_ci: tuple[float | None, float | None]
    worst: float
    worst_task: str
    worst_ci: tuple[float | None, float | None]
    tasks: int

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "mean_ci": list(self.mean_ci), "worst": self.worst, "worst_task": self.worst_task,
                "worst_ci": list(self.worst_ci), "tasks": self.tasks}


def capped_mean(replicates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per replicate, the mean over tasks of min(1, retention): a task above its baseline counts as 1."""
    return torch.stack([r.clamp(max=1.0) for r in replicates]).mean(0)


def group_figures(tasks: Mapping[str, TaskFigures]) -> GroupFigures | None:
    """Capped mean and worst task over the tasks with a defined retention (None when there is none). The mean's
    interval comes from the per-task replicates, tasks resampled independently; the worst task's interval is its
    own retention's."""
    defined = {k: t for k, t in tasks.items() if t.retention is not None}
    if not defined:
        return None
    worst = min(defined, key=lambda k: defined[k].retention)
    return GroupFigures(mean=sum(min(1.0, t.retention) for t in defined.values()) / len(defined),
                        mean_ci=percentile(capped_mean([t.replicates for t in defined.values()])),
                        worst=defined[worst].retention, worst_task=worst, worst_ci=defined[worst].retention_ci,
                        tasks=len(defined))


@dataclass
class Difference:
    """A paired difference between two recipes' group figures (a − b) with its 95% interval and verdict: `ahead` (the
    interval is above 0), `behind` (below 0) or `tie` (it contains 0: the difference is inside the noise)."""

    value: float
    ci: tuple[float | None, float | None]
    verdict: str

    def to_dict(self) -> dict[str, object]:
        return {"value": self.value, "ci": list(self.ci), "verdict": self.verdict}


def verdict(ci: tuple[float | None, float | None]) -> str:
    lo, hi = ci
    if lo is not None and lo > 0:
        return "ahead"
    if hi is not None and hi < 0:
        return "behind"
    return TIE


def paired_difference(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
                      baseline: Mapping[str, Sequence[float]], seed: int = 0,
                      replicates: int = NUM_BOOTSTRAPS) -> Difference | None:
    """Capped mean retention of recipe `a` minus recipe `b` over the tasks both evaluated, each task's problems
    resampled jointly for a, b and the baseline (the same problems); None without a task whose baseline is > 0.

    Args:
        a, b, baseline: per task key, per-problem scores in one problem order.
    """
    return pooled_paired_difference({k: [v] for k, v in a.items()}, {k: [v] for k, v in b.items()}, baseline, seed,
                                    replicates)


def pooled_paired_difference(a: Mapping[str, Sequence[Sequence[float]]], b: Mapping[str, Sequence[Sequence[float]]],
                             baseline: Mapping[str, Sequence[float]], seed: int = 0,
                             replicates: int = NUM_BOOTSTRAPS) -> Difference | None:
    """`paired_difference` of two recipes each trained under one or more seeds: each recipe's score per task is the
    mean of its seeds' means, and every replicate resamples the problems once for both recipes and the baseline and
    the seeds of each recipe (the same draw for two recipes with as many seeds: seed j pairs with seed j), so the
    interval includes the seed-to-seed spread. One seed each gives exactly `paired_difference`'s figures.

    Args:
        a, b: per task key, one list of per-problem scores per seed (seeds in the same order for both).
        baseline: per task key, the baseline's per-problem scores in the same problem order.
    """
    keys = [k for k in a if k in b and k in baseline and sum(baseline[k]) > 0]
    if not keys:
        return None
    diffs, value = [], 0.0
    for k in keys:
        na, nb = len(a[k]), len(b[k])
        reps = paired_replicates([*a[k], *b[k], baseline[k]], k, seed, replicates)
        pooled_a, pooled_b = _pooled(reps[:, :na], seed), _pooled(reps[:, na:na + nb], seed)
        diffs.append(_ratio(pooled_a, reps[:, -1]).clamp(max=1.0) - _ratio(pooled_b, reps[:, -1]).clamp(max=1.0))
        base = sum(baseline[k]) / len(baseline[k])
        value += min(1.0, _mean_of_means(a[k]) / base) - min(1.0, _mean_of_means(b[k]) / base)
    ci = percentile(torch.stack(diffs).mean(0))
    return Difference(value=value / len(keys), ci=ci, verdict=verdict(ci))
