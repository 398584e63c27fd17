"""The built-in offline tasks and their registry.

Each task makes (question, answer) pairs from a seed and proposes plausible wrong answers for its classification
form: nearby numbers for arithmetic, other labels for categories, perturbed strings for copy/uppercase, wrong
closings for brackets, other people for who-did-what. The arithmetic, word-problem, word-list reversal and
who-did-what (needle_haystack) tasks come from reasoning-gym (seeded, offline). Each task's capability family, and
its measured baseline, is in `gradual.tasks.families`.

Every task exists at two difficulties (`DIFFICULTIES`): `small`, sized so SmolLM2-135M stays off the floor (one-digit
arithmetic, short lists; the default, and the problems every baseline in docs/ was measured on), and `large`, sized
for 7-8B instruct models, which sit near 100% on `small` so their retention could not move (multi-digit arithmetic,
longer lists and bracket sequences, carries, made-up words, majority categories).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from functools import partial

from gradual.errors import UsageError
from gradual.tasks.base import Distractors, Task
from gradual.tasks.extract import CLOSERS, OPENERS, closing_sequence
from gradual.tasks.words import ALL_WORDS, CATEGORIES, CATEGORY_OF, LABELS

NUMBER_INSTRUCTION = "Give the final answer as a single number at the end of your reply."
DIFFICULTIES = ("small", "large")

# One-digit operands keep SmolLM2-135M off the floor (few-shot, n=30 probes: chain_sum 2-4 terms of 1-2 digits 0.10
# vs 2-3 one-digit terms 0.23; products of 1-2 digits 0.17 vs one-digit 0.70, but one-digit products have only 100
# questions, so negative factors are allowed: 361 questions, 0.43). basic_arithmetic uses its parenthesised
# generator: the plain one in reasoning-gym 0.1.25 evaluates left to right ("9 + 0 * 4" -> 36).
# `large`: 4-6 terms of 3-4 digits, two 2- or 3-digit factors, 3-5 terms of 2-3 digits: multi-step carries and long
# multiplication, sized so 7-8B instruct models are well below 100% and retention can move (not measured here: no
# GPU). gsm_symbolic has one difficulty in reasoning-gym 0.1.25 (GSM8K level, already below 100% for 7-8B models).
# word_sequence_reversal and needle_haystack were kept from a measured screen of reasoning-gym candidates
# (docs/baselines.md, families): 2-3 words (3-4 scored 0.08) and 3-5 statements; `large`: 10-16 words as copy's
# large lists, and 20-40 statements to search (not measured: no GPU).
GYM_CONFIGS: dict[str, dict[str, dict]] = {
    "small": {
        "basic_arithmetic": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-", "*"),
                                 allow_parentheses=True, allow_negation=False),
        "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1),
        "products": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, allow_negation=True),
        "gsm_symbolic": {},
        "word_sequence_reversal": dict(min_words=2, max_words=3),
        "needle_haystack": dict(min_num_statements=3, max_num_statements=5),
    },
    "large": {
        "basic_arithmetic": dict(min_terms=3, max_terms=5, min_digits=2, max_digits=3, operators=("+", "-", "*"),
                                 allow_parentheses=True, allow_negation=False),
        "chain_sum": dict(min_terms=4, max_terms=6, min_digits=3, max_digits=4),
        "products": dict(min_terms=2, max_terms=2, min_digits=2, max_digits=3),
        "gsm_symbolic": {},
        "word_sequence_reversal": dict(min_words=10, max_words=16),
        "needle_haystack": dict(min_num_statements=20, max_num_statements=40),
    },
}


def near_numbers(question: str, answer: str, rng: random.Random) -> list[str]:
    """Wrong numbers a model could plausibly produce: off by one/two/ten, a sign flip, swapped last digits."""
    a = int(answer)
    cands = {a + 1, a - 1, a + 2, a - 2, a + 10, a - 10}
    if abs(a) >= 100:
        cands |= {a + 100, a - 100}
    if a:
        cands.add(-a)
    digits = str(abs(a))
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        cands.add(int(("-" if a < 0 else "") + digits[:-2] + digits[-1] + digits[-2]))
    cands.discard(a)
    out = sorted(str(c) for c in cands)
    rng.shuffle(out)
    return out


def check_difficulty(difficulty: str) -> str:
    """`difficulty` itself when it is one of `DIFFICULTIES`; a one-line UsageError otherwise."""
    if difficulty not in DIFFICULTIES:
        raise UsageError(f"difficulty={difficulty!r} is unknown; allowed: {', '.join(DIFFICULTIES)}")
    return difficulty


def _successor(rng: random.Random, difficulty: str = "small") -> tuple[str, str]:
    """small: 0-998. large: 7-9 digits, half of them ending in 2-6 nines, so the answer carries through them."""
    if difficulty == "small":
        n = rng.randint(0, 998)
    else:
        n = rng.randint(10**6, 10**9 - 1)
        if rng.random() < 0.5:
            nines = rng.randint(2, 6)
            n = n - n % 10**nines + 10**nines - 1
    return f"What number comes after {n}?", str(n + 1)


def _successor_distractors(question: str, answer: str, rng: random.Random) -> list[str]:
    """The number itself is the most tempting wrong answer; then the neighbours around it."""
    n = int(answer) - 1
    rest = [str(c) for c in (n + 2, n - 1, n + 10, n + 11, n - 10) if c >= 0]
    rng.shuffle(rest)
    return [str(n), *rest]


def _copy(rng: random.Random, difficulty: str = "small") -> tuple[str, str]:
    """small: 3-5 words; large: 10-16."""
    words = rng.sample(ALL_WORDS, rng.randint(3, 5) if difficulty == "small" else rng.randint(10, 16))
    listed = ", ".join(words)
    return f"Repeat this list of words exactly: {listed}", listed


def _copy_distractors(question: str, answer: str, rng: random.Random) -> list[str]:
    """Swapped neighbours, a dropped word, a replaced word, the reversed list."""
    words = answer.split(", ")
    out = []
    for _ in range(3):
        i = rng.randrange(len(words) - 1)
        swapped = list(words)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        out.append(swapped)
        dropped = list(words)
        del dropped[rng.randrange(len(words))]
        out.append(dropped)
        replaced = list(words)
        replaced[rng.randrange(len(words))] = rng.choice([w for w in ALL_WORDS if w not in words])
        out.append(replaced)
    out.append(words[::-1])
    rng.shuffle(out)
    return [", ".join(w) for w in out]


def _uppercase(rng: random.Random, difficulty: str = "small") -> tuple[str, str]:
    """small: a common word. large: a made-up word of 12-20 random letters, which no tokenizer holds as one piece,
    so the model has to spell it out letter by letter."""
    if difficulty == "small":
        word = rng.choice(ALL_WORDS)
        return f'Write the word "{word}" in capital letters.', word.upper()
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(12, 20)))
    return f'Write the made-up word "{word}" in capital letters.', word.upper()


def _uppercase_distractors(question: str, answer: str, rng: random.Random) -> list[str]:
    """The word unchanged or capitalised, and capitals with a letter dropped, doubled or two letters swapped."""
    word = answer.lower()
    out = [word, word.capitalize()]
    edits = _letter_edits(answer)
    rng.shuffle(out)
    rng.shuffle(edits)
    return [out[0], edits[0], out[1], *edits[1:]]


def _category(rng: random.Random, difficulty: str = "small") -> tuple[str, str]:
    """small: the category of one word. large: the category most of 7 words belong to (3 of it, 2 of a second, 1
    each of two more), so the model has to classify every word and count.

    The labels are not listed in the question: SmolLM2-135M then answers the first listed label for almost
    every word (few-shot 0.35 vs 0.65 without the list); the chat instruction lists them instead."""
    if difficulty == "small":
        word = rng.choice(sorted(CATEGORY_OF))
        return f'Which category does the word "{word}" belong to?', CATEGORY_OF[word]
    labels = rng.sample(LABELS, 4)
    words = [w for label, count in zip(labels, (3, 2, 1, 1), strict=True) for w in rng.sample(CATEGORIES[label], count)]
    rng.shuffle(words)
    return f"Which category do most of these words belong to: {', '.join(words)}?", labels[0]


def _category_distractors(question: str, answer: str, rng: random.Random) -> list[str]:
    others = [label for label in LABELS if label != answer]
    rng.shuffle(others)
    return others


def _letter_edits(word: str) -> list[str]:
    """The word with one letter dropped, one doubled, or two neighbours swapped: the near misses of spelling."""
    edits = []
    for i in range(len(word)):
        edits.append(word[:i] + word[i + 1:])
        edits.append(word[:i] + word[i] + word[i:])
        if i + 1 < len(word) and word[i] != word[i + 1]:
            edits.append(word[:i] + word[i + 1] + word[i] + word[i + 2:])
    return edits


def _name_distractors(question: str, answer: str, rng: random.Random) -> list[str]:
    """The other people the statements name (each statement starts with a name), then one-letter edits of the
    answer where a question names fewer than four people."""
    statements = question.rsplit("\n", 1)[0]
    names = list(dict.fromkeys(m for m in re.findall(r"(?:^|[.!?]\s+)([A-Z][\w'-]*)", statements) if m != answer))
    edits = [e for e in _letter_edits(answer) if e]
    rng.shuffle(names)
    rng.shuffle(edits)
    return [*names, *edits]


def _brackets(rng: random.Random, difficulty: str = "small") -> tuple[str, str]:
    """A random prefix of a nested bracket sequence with brackets left open; the answer is its closing.
    small: 4-10 brackets, 1-5 left open; large: 16-30 brackets, 3-10 left open."""
    low, high, depth, least = (4, 10, 5, 1) if difficulty == "small" else (16, 30, 10, 3)
    seq: list[str] = []
    stack: list[str] = []
    for _ in range(rng.randint(low, high)):
        if not stack or (len(stack) < depth and rng.random() < 0.55):
            stack.append(rng.choice(sorted(OPENERS)))
            seq.append(stack[-1])
        else:
            seq.append(OPENERS[stack.pop()])
    while len(stack) < least:
        stack.append(rng.choice(sorted(OPENERS)))
        seq.append(stack[-1])
    prefix = " ".join(seq)
    return f"Complete the sequence so that every bracket is closed: {prefix}", " ".join(closing_sequence(prefix))


def _bracket_distractors(question: str, answer: str, rng: random.Random) -> list[str]:
    """Wrong closings: the reversed order, one closer of the wrong type, one missing, one extra."""
    closers = answer.split()
    out = [closers[::-1]]
    for _ in range(3):
        i = rng.randrange(len(closers))
        wrong_type = list(closers)
        wrong_type[i] = rng.choice([c for c in sorted(CLOSERS) if c != closers[i]])
        out.append(wrong_type)
        if len(closers) > 1:
            missing = list(closers)
            del missing[i]
            out.append(missing)
        out.append([*closers, rng.choice(sorted(CLOSERS))])
    return [" ".join(c) for c in out]


def _gym_batch(name: str, difficulty: str, base: int, count: int) -> list[tuple[str, str]]:
    """`count` reasoning-gym items; item i is generated from seed base + i (reasoning-gym seeds items that way).
    Questions are stripped: some generators end theirs in blank lines, which would split a few-shot example."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(name, seed=base, size=count, **GYM_CONFIGS[difficulty][name])
    return [(item["question"].strip(), str(item["answer"])) for item in (dataset[i] for i in range(count))]


def _gym_task(name: str, difficulty: str, description: str, fewshot_tokens: int = 16, chat_tokens: int = 96,
              kind: str = "number", distractors: Distractors = near_numbers,
              instruction: str = NUMBER_INSTRUCTION) -> Task:
    def single(rng: random.Random) -> tuple[str, str]:
        return _gym_batch(name, difficulty, rng.randrange(2**31), 1)[0]

    return Task(name, kind, single, distractors, instruction, fewshot_tokens=fewshot_tokens,
                chat_tokens=chat_tokens, batch_generator=partial(_gym_batch, name, difficulty), description=description)


def _build(difficulty: str = "small") -> dict[str, Task]:
    """The registry at one difficulty. Generation budgets grow with the `large` answers (16 words, 10 closers)."""
    small = difficulty == "small"
    gen = {f.__name__: partial(f, difficulty=difficulty) for f in (_successor, _copy, _uppercase, _category, _brackets)}
    tasks = [
        Task("successor", "number", gen["_successor"], _successor_distractors, NUMBER_INSTRUCTION,
             fewshot_tokens=8 if small else 16, chat_tokens=48 if small else 96,
             description='what number comes after 37 (answer "38")' if small else
             "what number comes after a 7-9 digit number, often ending in nines"),
        Task("copy", "list", gen["_copy"], _copy_distractors, "Reply with the words only, separated by commas.",
             fewshot_tokens=32 if small else 96, chat_tokens=64 if small else 160,
             description=f"repeat a list of {'3-5' if small else '10-16'} words"),
        Task("uppercase", "upper", gen["_uppercase"], _uppercase_distractors, "Reply with the word in capitals only.",
             fewshot_tokens=12 if small else 32, chat_tokens=48 if small else 96,
             description="write a word in capital letters" if small else
             "write a made-up word of 12-20 letters in capitals"),
        Task("category", "label", gen["_category"], _category_distractors,
             f"Reply with one of: {', '.join(LABELS[:-1])} or {LABELS[-1]}.",
             labels=LABELS, fewshot_tokens=8, chat_tokens=48 if small else 96,
             description="category of a word (8 labels)" if small else
             "the category most of 7 words belong to (8 labels)"),
        _gym_task("chain_sum", difficulty, "reasoning-gym chain_sum: 2-3 one-digit terms, + and -" if small else
                  "reasoning-gym chain_sum: 4-6 terms of 3-4 digits, + and -", chat_tokens=96 if small else 192),
        _gym_task("products", difficulty, "reasoning-gym products: two one-digit factors, negatives allowed" if small
                  else "reasoning-gym products: two 2-digit or two 3-digit factors",
                  chat_tokens=96 if small else 256),
        _gym_task("basic_arithmetic", difficulty,
                  "reasoning-gym basic_arithmetic: two one-digit terms, + - *, signs, parentheses" if small else
                  "reasoning-gym basic_arithmetic: 3-5 terms of 2-3 digits, + - *, signs, parentheses",
                  fewshot_tokens=16 if small else 24, chat_tokens=96 if small else 256),
        _gym_task("gsm_symbolic", difficulty, "reasoning-gym gsm_symbolic: GSM8K-style word problems", chat_tokens=256),
        Task("brackets", "brackets", gen["_brackets"], _bracket_distractors,
             "Reply with the closing brackets only, separated by spaces.", fewshot_tokens=24 if small else 48,
             chat_tokens=48 if small else 96,
             description="close the open brackets of a nested sequence" + ("" if small else " of 16-30 brackets")),
        _gym_task("word_sequence_reversal", difficulty,
                  f"reasoning-gym word_sequence_reversal: reverse a list of {'2-3' if small else '10-16'} words",
                  fewshot_tokens=32 if small else 96, chat_tokens=64 if small else 160, kind="list",
                  distractors=_copy_distractors, instruction="Reply with the words only, separated by commas."),
        _gym_task("needle_haystack", difficulty,
                  f"reasoning-gym needle_haystack: who, of {'3-5' if small else '20-40'} people described, does X",
                  chat_tokens=48, kind="word", distractors=_name_distractors, instruction=""),
    ]
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = _build("small")
PRESETS: dict[str, dict[str, Task]] = {"small": TASKS, "large": _build("large")}


def get_task(name: str, difficulty: str = "small") -> Task:
    """The built-in task called `name` at `difficulty` (`small` or `large`); UsageError listing the names otherwise."""
    registry = PRESETS[check_difficulty(difficulty)]
    if name not in registry:
        raise UsageError(f"task {name!r} is unknown; built-in tasks: {', '.join(registry)}")
    return registry[name]


def task_names(names: Sequence[str] | None = None) -> list[str]:
    """Validate a list of task names (all built-in tasks when None)."""
    names = list(TASKS) if names is None else list(names)
    for name in names:
        get_task(name)
    return names
