"""The record every evaluation returns (built-in tasks, lm-eval tasks, code), and a table for the CLI."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class TaskResult:
    """One score with its sample size, failure counts, (optionally) per-item records, `truncated`: how many
    prompts were cut from the left to fit the model's positions (a score over cut prompts reads low), and `items`:
    each problem's score in problem order (0/1, or partial credit), which the intervals of `gradual.intervals`
    resample (None where the evaluation gives no per-problem score)."""

    task: str
    form: str
    score: float
    n: int
    failures: dict[str, int] = field(default_factory=dict)
    fmt: str = ""
    records: list[dict] | None = None
    truncated: int = 0
    items: list[float] | None = None

    @property
    def stderr(self) -> float:
        """Binomial standard error of an accuracy, sqrt(p(1-p)/n): the noise floor when comparing stages."""
        return math.sqrt(max(self.score * (1 - self.score), 0.0) / self.n) if self.n else float("nan")

    def stage_score(self) -> dict:
        """What a stage's record keeps of the result (`StageRecord.scores[key]`): score, form, n, failures,
        truncated prompts and, where the evaluation gives them, the per-problem scores the intervals resample."""
        out = {"score": self.score, "form": self.form, "n": self.n, "failures": dict(self.failures),
               "truncated": self.truncated}
        return out if self.items is None else {**out, "items": list(self.items)}

    def to_dict(self, with_records: bool = False) -> dict:
        out = asdict(self)
        if not with_records:
            out.pop("records")
        if self.items is None:
            out.pop("items")
        out["stderr"] = self.stderr
        return out


def format_results_table(results: dict[str, TaskResult]) -> str:
    """A Markdown table of results: key, form, format, n, score +- stderr, non-zero failure counts, truncated
    prompts."""
    lines = ["| task | form | format | n | score | ± | failures | truncated |", "|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        fails = ", ".join(f"{k} {v}" for k, v in r.failures.items() if v and k != "correct")
        lines.append(f"| {key} | {r.form} | {r.fmt or '-'} | {r.n} | {r.score:.3f} | {r.stderr:.3f} | {fails or '-'} "
                     f"| {r.truncated} |")
    return "\n".join(lines)
