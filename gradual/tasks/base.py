"""Seeded problems in three disjoint splits: evaluation (`eval`), training (`train`: recovery data and few-shot
examples) and layer selection (`select`: the problems `selection.metric: task_ablation` scores to choose layers).

Each problem comes from a generator called with its own seed; each split's seeds come from its own range. Seeds
alone do not stop two seeds from producing the same question (a task with 1,000 possible questions repeats itself
quickly), so a problem also belongs to a split by a stable hash of its question text: the splits cannot share a
question, and `assert_disjoint` checks that on the actual text. The evaluation half of the hash is what it was
before `select` existed, and so are the few-shot worked examples (`fewshot_examples`, drawn from the former training
half), so every evaluation prompt and `docs/baselines.md` stay as measured; `select` takes a quarter of the former
training half, less the worked examples a few-shot prompt shows, so a selection prompt never shows its own answer.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gradual.errors import UsageError
from gradual.tasks.extract import KINDS

SPLITS = ("eval", "train", "select")
_INTEGER = re.compile(r"-?\d+")  # numeric tasks score integers; the rare fractional word-problem answer is skipped
_SPLIT_BASE = {"eval": 0, "train": 1_000_000_000, "select": 2_000_000_000}
_SEEDS_PER_CALL = 1_000_000  # seed s of a split draws from [base + s * 1e6, base + (s + 1) * 1e6)
_FEWSHOT_SEED = 999  # the worked examples' pool: training seed 999
_FEWSHOT_POOL = 50  # the pool of up to 5 worked examples
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


def split_of(task: str, question: str) -> str:
    """The split a question of `task` belongs to, by a stable hash of its text (`Task.in_split`)."""
    digest = hashlib.sha256(f"{task}\x00{question}".encode()).digest()
    if digest[0] % 2 == 0:
        return "eval"
    return "select" if digest[1] % 4 == 0 else "train"


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
        """Stable hash partition of the question text: an even first byte -> eval; an odd one -> select when the
        second byte is a multiple of 4, else train."""
        return split_of(self.name, question) == split

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

    def fewshot_pool(self, n: int = _FEWSHOT_POOL) -> list[Problem]:
        """The first `n` problems worked examples are taken from: training seed 999 over the training *and*
        selection halves of the hash, i.e. the training split as it was before `select` existed, so the few-shot
        prompts stay those every measured evaluation used."""
        if n < 1:
            raise UsageError(f"n={n} is invalid; it must be >= 1")
        key = ("fewshot", n, _FEWSHOT_SEED)
        if key not in self._cache:
            self._cache[key] = self._draw(_SPLIT_BASE["train"] + _FEWSHOT_SEED * _SEEDS_PER_CALL, n, "few-shot",
                                          lambda q: self.in_split(q, "train") or self.in_split(q, "select"))
        return list(self._cache[key])

    def _make_problems(self, split: str, n: int, seed: int) -> list[Problem]:
        base = _SPLIT_BASE[split] + seed * _SEEDS_PER_CALL
        if split != "select":
            return self._draw(base, n, split, lambda q: self.in_split(q, split))
        shown = {p.question for p in fewshot_examples(self, SELECTION_SHOTS)}
        return self._draw(base, n, split, lambda q: self.in_split(q, split) and q not in shown)

    def _draw(self, base: int, n: int, what: str, accept: Callable[[str], bool]) -> list[Problem]:
        """`n` problems from seeds base, base+1, ... whose question `accept`s, distinct while there are enough."""
        seen: set[str] = set()
        out: list[Problem] = []
        offset, batch = 0, max(4 * n, 64)
        while len(out) < n and offset < _SEEDS_PER_CALL and offset < 50 * n + 2000:
            for i, (q, a) in enumerate(self._candidates(base + offset, batch)):
                if q in seen or not accept(q) or (self.kind == "number" and not _INTEGER.fullmatch(a)):
                    continue
                seen.add(q)
                out.append(self._problem(q, a, base + offset + i))
                if len(out) == n:
                    break
            offset += batch
        if not out:
            raise RuntimeError(f"task {self.name} produced no {what} problems")
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
    """Refuse (UsageError) when the first n_train training problems share a question text with the first n_eval
    evaluation problems, so recovery data can never contain an evaluation item; with `n_select`, also when the first
    n_select selection problems share one with either, so the layer choice never sees an evaluation or a recovery
    item."""
    drawn = {"training": {p.question for p in task.problems("train", n_train, seed)},
             "evaluation": {p.question for p in task.problems("eval", n_eval, seed)}}
    if n_select:
        drawn["selection"] = {p.question for p in task.problems("select", n_select, seed)}
    names = list(drawn)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(drawn[a] & drawn[b])
            if shared:
                raise UsageError(f"task {task.name}: {len(shared)} {a} questions also appear in the {b} split, "
                                 f"e.g. {shared[0]!r}; the splits must be disjoint")


def fewshot_examples(task: Task, k: int = 5) -> list[Problem]:
    """Worked examples for the few-shot prompt, from `Task.fewshot_pool` (outside the evaluation split) so they never
    leak evaluation items; selection problems avoid the first `SELECTION_SHOTS` examples.

    Examples with distinct answers are preferred: a small model copies the answers it has just seen, so five
    examples showing two labels would bias a label task towards them.
    """
    if k < 1:
        return []
    pool = task.fewshot_pool(max(10 * k, _FEWSHOT_POOL))
    chosen: list[Problem] = []
    for p in pool:
        if p.answer not in {c.answer for c in chosen}:
            chosen.append(p)
        if len(chosen) == k:
            return chosen
    return (chosen + [p for p in pool if p not in chosen])[:k]
