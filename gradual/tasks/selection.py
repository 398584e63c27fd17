"""The score `selection.metric: task_ablation` ranks layers by: built-in generative tasks' problems from the `select`
split, so no evaluation problem takes part in choosing (`gradual.tasks.base`; a selection problem can repeat a
recovery training question of a small task).

The seed paper (arXiv 2602.01997) chooses the layers to prune by how much the model's generative task performance
drops without them. Two scores of one model on the same problems (`TASK_SCORES`):

- `loglik` (default): per task, the mean over problems of the reference answer's mean per-token log-probability
  after the task's prompt (teacher-forced); the score is the mean over tasks. It is continuous, so with the few
  problems a stage can afford (16 per task), candidates whose skip changes no greedy answer are still told apart,
  where exact match moves in steps of 1/n and ties most candidates of a small model; per token, so a task with long
  answers (`copy`) weighs no more than one with one-token answers; and it needs one forward pass per problem on the
  shared few-shot prefix's KV cache (`gradual.tasks.scoring.continuation_logprobs`), no decoding.
- `accuracy`: the mean over tasks of greedy exact match of the extracted answer, as `TaskEvaluation` scores the
  generative form (the paper's measure; `n` decoding runs per task and candidate, and coarse for small `n`).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradual.tasks.base import SELECTION_SHOTS, Problem, Task
from gradual.tasks.builtin import get_task
from gradual.tasks.evaluate import build_prompt, choice_text, evaluate_generative
from gradual.tasks.scoring import continuation_logprobs, encode_pair

TASK_SCORES = ("loglik", "accuracy")
SPLIT = "select"
SEED = 0
"""Selection problems are the same for every run seed: the seed varies the training, not the measurement."""


class TaskScore:
    """`score(model) -> float` (higher is better) on `n` selection-split problems of each task; the problems and
    their prompts are drawn and built once, so every candidate layer of every stage is scored on the same items.

    Args:
        tokenizer: the model's tokenizer (prompts, and the answer tokens for `loglik`).
        tasks: built-in task names.
        n: problems per task.
        fmt: `fewshot` (`SELECTION_SHOTS` worked examples, which no selection problem is) or `chat`.
        score: `loglik` or `accuracy` (module docstring).
        difficulty: `small` or `large` (`gradual.tasks.builtin`).
        batch_size: contexts per forward pass; None (default) = all of a task's problems, so the few-shot prefix
            runs once per task per scoring (SmolLM2-135M, one busy CPU thread, 2 tasks × 16 problems: 8.0 s a
            scoring, 9.7 s in batches of 8).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], n: int = 16, fmt: str = "fewshot",
                 score: str = "loglik", difficulty: str = "small", batch_size: int | None = None) -> None:
        self.tokenizer, self.fmt, self.score, self.batch_size = tokenizer, fmt, score, batch_size or n
        self.tasks: list[Task] = [get_task(name, difficulty) for name in tasks]
        self.problems: dict[str, list[Problem]] = {t.name: t.problems(SPLIT, n, SEED) for t in self.tasks}
        self.pairs: dict[str, list[tuple[str, str]]] = {}
        self.lengths: dict[str, list[int]] = {}
        for task in self.tasks:
            prompts = [build_prompt(task, p, tokenizer, fmt, SELECTION_SHOTS) for p in self.problems[task.name]]
            pairs = [(prompt, choice_text(prompt, p.answer)) for prompt, p in zip(prompts, self.problems[task.name],
                                                                                    strict=True)]
            self.pairs[task.name] = pairs
            self.lengths[task.name] = [len(encode_pair(tokenizer, c, x)[1]) for c, x in pairs]

    def per_task(self, model: PreTrainedModel) -> dict[str, float]:
        """Each task's score of `model` as it stands (skipped layers included)."""
        if self.score == "accuracy":
            return {t.name: evaluate_generative(model, self.tokenizer, t, self.problems[t.name], self.fmt,
                                                self.batch_size, progress=False, shots=SELECTION_SHOTS).score
                    for t in self.tasks}
        out = {}
        for task in self.tasks:
            logprobs = continuation_logprobs(model, self.tokenizer, self.pairs[task.name], batch_size=self.batch_size,
                                             progress=False, desc=f"select_{task.name}")
            per_token = [lp / length for lp, length in zip(logprobs, self.lengths[task.name], strict=True)]
            out[task.name] = sum(per_token) / len(per_token)
        return out

    def __call__(self, model: PreTrainedModel) -> float:
        scores = self.per_task(model)
        return sum(scores.values()) / len(scores)
