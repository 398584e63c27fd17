"""Answer extraction and failure analysis for generated replies (pure functions, no model).

Strict whole-reply matching scores a chatty model at zero, so the final answer is pulled out of the reply first
(last integer, first label, first bracket run, ...) and compared after normalisation. When a reply is wrong, the
failure category says *how* it broke, which is what layer pruning changes first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

KINDS = ("number", "label", "list", "upper", "brackets", "word")
FAILURES = ("correct", "wrong_value", "no_answer", "unbalanced_brackets", "repetition")
OPENERS = {"(": ")", "[": "]", "{": "}", "<": ">"}
CLOSERS = {v: k for k, v in OPENERS.items()}

_INT = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
_LIST = re.compile(r"[A-Za-z]+(?:[ \t]*,[ \t]*[A-Za-z]+)+")
_BRACKET_RUN = re.compile(r"[()\[\]{}<>](?:[ \t]*[()\[\]{}<>])*")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def extract_number(text: str) -> str | None:
    """The last integer in the text ("1,000" -> "1000", "42.0" -> "42"); None when there is none or it is fractional."""
    matches = _INT.findall(text)
    if not matches:
        return None
    value = matches[-1].replace(",", "")
    if "." in value:
        whole, frac = value.split(".")
        if frac.strip("0"):
            return value
        value = whole
    return str(int(value))


def extract_label(text: str, labels: Sequence[str]) -> str | None:
    """The label mentioned first (case-insensitive, a plural 's' allowed); None when no label appears."""
    best: tuple[int, str] | None = None
    for label in labels:
        m = re.search(rf"\b{re.escape(label)}s?\b", text, flags=re.IGNORECASE)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), label.lower())
    return best[1] if best else None


def extract_list(text: str) -> str | None:
    """The first comma-separated run of at least two words, normalised to lowercase "a, b, c"."""
    m = _LIST.search(text)
    if not m:
        return None
    return ", ".join(w.strip().lower() for w in m.group(0).split(","))


def extract_upper(text: str) -> str | None:
    """The first all-capitals word (two letters or more); else the first word, so a lowercase reply counts as a wrong
    value rather than a missing answer."""
    words = re.findall(r"[A-Za-z]+", text)
    for w in words:
        if len(w) >= 2 and w.isupper():
            return w
    return words[0] if words else None


def extract_word(text: str) -> str | None:
    """The first word (letters only), lowercased: a one-word answer ("Tayo", "Tayo accepts the color red.")."""
    words = re.findall(r"[A-Za-z]+", text)
    return words[0].lower() if words else None


def extract_brackets(text: str) -> str | None:
    """The first run of bracket characters, spaces removed."""
    m = _BRACKET_RUN.search(text)
    return re.sub(r"\s+", "", m.group(0)) if m else None


def extract_answer(kind: str, text: str, labels: Sequence[str] = ()) -> str | None:
    """Dispatch on the task's answer kind; returns the normalised answer or None when nothing is extractable."""
    if kind == "number":
        return extract_number(text)
    if kind == "label":
        return extract_label(text, labels)
    if kind == "list":
        return extract_list(text)
    if kind == "upper":
        return extract_upper(text)
    if kind == "brackets":
        return extract_brackets(text)
    if kind == "word":
        return extract_word(text)
    raise ValueError(f"answer kind {kind!r} is unknown; allowed: {', '.join(KINDS)}")


def normalize_reference(kind: str, answer: str) -> str:
    """Bring a reference answer into the same normal form as an extracted one."""
    if kind in ("label", "word"):
        return answer.strip().lower()
    if kind == "list":
        return ", ".join(w.strip().lower() for w in answer.split(","))
    if kind == "brackets":
        return re.sub(r"\s+", "", answer)
    if kind == "number":
        return str(int(answer.strip().replace(",", "")))
    return answer.strip()


def _still_open(seq: str) -> list[str] | None:
    """The brackets `seq` leaves open, innermost last (other characters ignored); None if it closes one it never
    opened, or closes it out of order."""
    stack: list[str] = []
    for ch in seq:
        if ch in OPENERS:
            stack.append(ch)
        elif ch in CLOSERS:
            if not stack or stack[-1] != CLOSERS[ch]:
                return None
            stack.pop()
    return stack


def is_balanced(seq: str) -> bool:
    """Whether a bracket string (other characters ignored) closes every bracket it opens, in order."""
    return _still_open(seq) == []


def closing_sequence(prefix: str) -> str:
    """The unique shortest closing of a bracket prefix, e.g. "( [ {" -> "}])"."""
    stack = _still_open(prefix)
    if stack is None:
        raise ValueError(f"bracket prefix {prefix!r} closes a bracket it never opened")
    return "".join(OPENERS[c] for c in reversed(stack))


def is_repetitive(text: str, max_n: int = 12, min_repeats: int = 3, min_tokens: int = 8) -> bool:
    """A degenerate loop: some n-gram (n <= max_n) repeated back to back >= min_repeats times over >= min_tokens tokens.

    The token-count floor keeps legitimate short repeats (a closing "] ] ]") from counting as a loop.
    """
    tokens = _TOKEN.findall(text)
    for n in range(1, max_n + 1):
        need = max(min_repeats, -(-min_tokens // n))
        if need * n > len(tokens):
            break
        for start in range(len(tokens) - need * n + 1):
            gram = tokens[start:start + n]
            if all(tokens[start + k * n:start + (k + 1) * n] == gram for k in range(1, need)):
                return True
    return False


def classify_failure(kind: str, reply: str, reference: str, labels: Sequence[str] = (),
                     prompt_brackets: str = "") -> str:
    """One of FAILURES for a generated reply.

    Order matters: a correct answer is correct even inside a loop; a loop is reported before a missing answer because
    it is the more specific diagnosis; `unbalanced_brackets` applies to bracket tasks, where `prompt_brackets` is the
    prefix the reply had to close.
    """
    extracted = extract_answer(kind, reply, labels)
    if extracted is not None and extracted == normalize_reference(kind, reference):
        return "correct"
    if is_repetitive(reply):
        return "repetition"
    if extracted is None:
        return "no_answer"
    if kind == "brackets" and not is_balanced(prompt_brackets + extracted):
        return "unbalanced_brackets"
    return "wrong_value"
