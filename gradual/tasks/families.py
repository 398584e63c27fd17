"""Capability families of the tasks, and the measured few-shot baselines `gradual tasks` prints.

Recovery data teach the tasks they are drawn from, so retention is read in three groups (`gradual.retention`):
in-data tasks, *near held-out* tasks (never in the data, but a task of their family was: does a taught skill carry
to a related task?) and *far held-out* tasks (nothing of their family was: does capability come back untaught?).
A family is a set of tasks that exercise one skill; the table below is the only place a task's family is set.

Reasoning-gym candidates were kept only where SmolLM2-135M-Instruct scores clearly above its floor at `small`
(docs/baselines.md lists the rejected ones and why): no counting generator qualified, so there is no counting family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FAMILIES: dict[str, tuple[str, ...]] = {
    "arithmetic": ("chain_sum", "products", "basic_arithmetic", "gsm_symbolic"),
    "number_sense": ("successor",),
    "strings_lists": ("copy", "uppercase", "word_sequence_reversal"),
    "knowledge": ("category",),
    "retrieval": ("needle_haystack",),
    "code": ("brackets", "humaneval"),
}
"""Family → its tasks: every built-in task, and the code task humaneval. Brackets (closing a nested sequence) is
the syntax half of code. A task not named here (an lm-eval task) is a family of its own."""

FAMILY_OF: dict[str, str] = {task: family for family, tasks in FAMILIES.items() for task in tasks}


def family_of(task: str) -> str | None:
    """The family of a task; None for a task outside the table, which shares a family with no other task."""
    return FAMILY_OF.get(task)


@dataclass(frozen=True)
class Baseline:
    """A measured few-shot generative score of SmolLM2-135M-Instruct at `small` (fp32, greedy, 5 worked examples,
    the first `n` problems of the evaluation split, seed 0) and the task's floor: the share of the most frequent
    reference answer among those problems, what a model repeating one answer scores."""

    score: float
    n: int
    floor: float

    @property
    def stderr(self) -> float:
        """Binomial standard error, sqrt(p(1-p)/n)."""
        return math.sqrt(self.score * (1 - self.score) / self.n)


BASELINES: dict[str, Baseline] = {  # docs/baselines.md: the tables and how they were measured
    "successor": Baseline(0.71, 100, 0.01),
    "copy": Baseline(0.84, 100, 0.01),
    "uppercase": Baseline(0.43, 100, 0.01),
    "category": Baseline(0.61, 100, 0.17),
    "chain_sum": Baseline(0.22, 100, 0.07),
    "products": Baseline(0.35, 100, 0.12),
    "basic_arithmetic": Baseline(0.16, 100, 0.07),
    "gsm_symbolic": Baseline(0.02, 100, 0.04),
    "brackets": Baseline(0.12, 100, 0.10),
    "word_sequence_reversal": Baseline(31 / 64, 64, 1 / 64),
    "needle_haystack": Baseline(19 / 64, 64, 1 / 64),
}

GEMMA3_BASELINES: dict[str, Baseline] = {  # docs/baselines.md, "Gemma 3 270M": the first 64 problems of every task
    "successor": Baseline(0 / 64, 64, 1 / 64),
    "copy": Baseline(64 / 64, 64, 1 / 64),
    "uppercase": Baseline(42 / 64, 64, 1 / 64),
    "category": Baseline(54 / 64, 64, 12 / 64),
    "chain_sum": Baseline(1 / 64, 64, 6 / 64),
    "products": Baseline(0 / 64, 64, 10 / 64),
    "basic_arithmetic": Baseline(6 / 64, 64, 7 / 64),
    "gsm_symbolic": Baseline(1 / 64, 64, 3 / 64),
    "brackets": Baseline(14 / 64, 64, 9 / 64),
    "word_sequence_reversal": Baseline(4 / 64, 64, 1 / 64),
    "needle_haystack": Baseline(22 / 64, 64, 1 / 64),
}
"""The pretrained base Gemma 3 270M (`gemma3-270m`, its Q4_K_M weights de-quantised) under the same protocol: a
second family's starting point, which decides what a Gemma recovery can train on and what it can monitor."""

MODEL_BASELINES: dict[str, dict[str, Baseline]] = {"SmolLM2-135M": BASELINES, "Gemma3-270M": GEMMA3_BASELINES}
"""The offline aliases' measured baselines, in the columns `gradual tasks` prints."""
