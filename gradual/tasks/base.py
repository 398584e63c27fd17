"""Seeded problems with an evaluation split, a disjoint training split, and a selection split.

Each problem comes from a generator called with its own seed; evaluation, training and selection seeds come from
disjoint ranges. Seeds alone do not stop two seeds from producing the same question (a task with 1,000 possible
questions repeats itself quickly), so a problem also belongs to a side by a stable hash of its question text: the
evaluation side cannot share a question with the other, and `assert_disjoint` checks that on the actual text.

The selection split (`select`, the problems `selection.metric: task_ablation` scores to choose layers) draws from
the training side of the hash with its own seeds, leaving out the few-shot worked examples a prompt shows: it never
holds an evaluation problem. It can repeat a question the recovery data trains on (a small task has few distinct
questions); carving it out of the training side would have changed every recovery set measured so far.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gradual.errors import UsageError
from gradual.tasks.extract import KINDS, extract_answer, normalize_reference

SPLITS = ("eval", "train", "select")
_INTEGER = re.compile(r"-?\d+")  # numeric tasks score integers; the rare fractional word-problem answer is skipped
_SPLIT_BASE = {"eval": 0, "train": 1_000_000_000, "select": 2_000_000_000}
_SEEDS_PER_CALL = 1_000_000  # seed s of a split draws from [base + s * 1e6, base + (s + 1) * 1e6)
SELECTION_SHOTS = 5  # worked examples in a selection prompt; selection problems avoid them


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer and the classification choices built from it.

    `choices` holds the reference answer (at `label`) and distractors; `brackets` is the prefix a bracket problem
    must close (used to tell unbalanced replies apart from merely wrong ones).
    """

    question: str
    answer: str
    choices: tuple[str, ...]
    label: int
    seed: int
    brackets: str = ""


Generator = Callable[[random.Random], tuple[str, str]]
Distractors = Callable[[str, str, random.Random], list[str]]


@dataclass
class Task:
    """A built-in task: how to make a problem, how to check a reply, and how to prompt for it.

    `generate(rng) -> (question, answer)` makes one problem; `distractors(question, answer, rng)` proposes wrong
    answers for the classification form; `kind` picks the answer extractor; `instruction` is appended to the
    question in the chat format so the model knows what to answer with.
    """

    name: str
    kind: str
    generate: Generator
    distractors: Distractors
    instruction: str
    labels: tuple[str, ...] = ()
    num_choices: int = 4
    fewshot_tokens: int = 24
    chat_tokens: int = 64
    batch_generator: Callable[[int, int], Sequence[tuple[str, str]]] | None = None
    description: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task kind {self.kind!r} is unknown; allowed: {', '.join(KINDS)}")

    @property
    def has_classification(self) -> bool:
        """Every built-in task has a classification form (its problems carry distractors)."""
        return self.num_choices > 1

    def in_split(self, question: str, split: str) -> bool:
        """Stable hash partition of the question text: even bucket -> eval, odd -> train and select."""
        digest = hashlib.sha256(f"{self.name}\x00{question}".encode()).digest()
        return (digest[0] % 2 == 0) == (split == "eval")

    def answerable(self, answer: str) -> bool:
        """Whether the task's own extractor scores this reference answer, written as the reply, correct. A generator's
        rare answer out of the extractor's reach (a fraction for a number task, a word with a digit for a list task)
        is skipped: no reply could ever be scored right on it."""
        if self.kind == "number":
            return bool(_INTEGER.fullmatch(answer))
        return extract_answer(self.kind, answer, self.labels) == normalize_reference(self.kind, answer)

    def _candidates(self, base: int, count: int) -> Sequence[tuple[str, str]]:
        """`count` raw (question, answer) pairs from seeds base, base+1, ..."""
        if self.batch_generator is not None:
            return self.batch_generator(base, count)
        return [self.generate(random.Random(base + i)) for i in range(count)]

    def problems(self, split: str = "eval", n: int = 100, seed: int = 0) -> list[Problem]:
        """`n` problems of a split; distinct while the split has enough distinct questions, then repeated in order."""
        if split not in SPLITS:
            raise UsageError(f"split {split!r} is unknown; allowed: {', '.join(SPLITS)}")
        if n < 1:
            raise UsageError(f"n={n} is invalid; it must be >= 1")
        if seed < 0:
            raise UsageError(f"seed={seed} is invalid; it must be >= 0")
        key = (split, n, seed)
        if key not in self._cache:
            self._cache[key] = self._make_problems(split, n, seed)
        return list(self._cache[key])

    def _make_problems(self, split: str, n: int, seed: int) -> list[Problem]:
        base = _SPLIT_BASE[split] + seed * _SEEDS_PER_CALL
        seen: set[str] = {p.question for p in fewshot_examples(self, SELECTION_SHOTS)} if split == "select" else set()
        out: list[Problem] = []
        offset, batch = 0, max(4 * n, 64)
        while len(out) < n and offset < _SEEDS_PER_CALL and offset < 50 * n + 2000:
            for i, (q, a) in enumerate(self._candidates(base + offset, batch)):
                if q in seen or not self.in_split(q, split) or not self.answerable(a):
                    continue
                seen.add(q)
                out.append(self._problem(q, a, base + offset + i))
                if len(out) == n:
                    break
            offset += batch
        if not out:
            raise RuntimeError(f"task {self.name} produced no {split} problems")
        return [out[i % len(out)] for i in range(n)]

    def _problem(self, question: str, answer: str, seed: int) -> Problem:
        rng = random.Random(f"{self.name}:choices:{seed}")
        wrong: list[str] = []
        for d in self.distractors(question, answer, rng):
            if d != answer and d not in wrong:
                wrong.append(d)
            if len(wrong) == self.num_choices - 1:
                break
        choices = [answer, *wrong]
        rng.shuffle(choices)
        brackets = "".join(c for c in question if c in "()[]{}<>") if self.kind == "brackets" else ""
        return Problem(question, answer, tuple(choices), choices.index(answer), seed, brackets)

    def chat_message(self, problem: Problem) -> str:
        """The 0-shot user message for the chat format: the question plus the answer-format instruction."""
        return f"{problem.question} {self.instruction}".strip()

    def train_prompts(self, n: int, seed: int = 0) -> list[tuple[str, str]]:
        """(chat user message, reference answer) pairs from the training split, for recovery data."""
        return [(self.chat_message(p), p.answer) for p in self.problems("train", n, seed)]


def assert_disjoint(task: Task, n_train: int, n_eval: int, seed: int = 0, n_select: int = 0) -> None:
    """Refuse (UsageError) when the first n_train training problems, or the first n_select selection problems, share a
    question text with the first n_eval evaluation problems, so neither recovery data nor the layer choice ever sees
    an evaluation item."""
    evaluation = {p.question for p in task.problems("eval", n_eval, seed)}
    for split, n, name in (("train", n_train, "training"), ("select", n_select, "selection")):
        shared = sorted({p.question for p in task.problems(split, n, seed)} & evaluation) if n else []
        if shared:
            raise UsageError(f"task {task.name}: {len(shared)} {name} questions also appear in the evaluation split, "
                             f"e.g. {shared[0]!r}; the splits must be disjoint")


def fewshot_examples(task: Task, k: int = 5) -> list[Problem]:
    """Worked examples for the few-shot prompt, from the training split so they never leak evaluation items.

    Examples with distinct answers are preferred: a small model copies the answers it has just seen, so five
    examples showing two labels would bias a label task towards them.
    """
    if k < 1:
        return []
    pool = task.problems("train", max(10 * k, 50), seed=999)
    chosen: list[Problem] = []
    for p in pool:
        if p.answer not in {c.answer for c in chosen}:
            chosen.append(p)
        if len(chosen) == k:
            return chosen
    return (chosen + [p for p in pool if p not in chosen])[:k]
