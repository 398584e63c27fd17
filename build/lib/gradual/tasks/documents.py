"""Few-shot recovery documents: built-in tasks' training problems written as the evaluation's few-shot prompt writes
its worked examples (`Q: ...\\nA: ...` lines, `evaluate.worked_examples`).

Why: distilling the original model's next-token distribution on such text restores in-data retention far better
than chat answers or generic text (measured on SmolLM2), because it is exactly the text the evaluation feeds the
model. Only training-split problems are used, and a draw that shares a question with the evaluation split is refused.
"""

from __future__ import annotations

from gradual.errors import UsageError
from gradual.tasks.base import Problem, Task
from gradual.tasks.evaluate import worked_examples


def training_problems(task: Task, n: int, seed: int = 0, eval_n: int = 500, eval_seed: int = 0) -> list[Problem]:
    """`n` training-split problems of `task` (seed `seed`), refused (UsageError) when one shares its question with the
    first `eval_n` evaluation problems of `eval_seed`: recovery data must never contain an evaluation item."""
    train = task.problems("train", n, seed)
    shared = {p.question for p in train} & {p.question for p in task.problems("eval", eval_n, eval_seed)}
    if shared:
        raise UsageError(f"task {task.name}: {len(shared)} training prompts also appear in the evaluation split "
                         f"(e.g. {min(shared)!r}); recovery data must not contain evaluation items")
    return train


def fewshot_documents(task: Task, n: int, shots: int = 5, seed: int = 0, eval_n: int = 500,
                      eval_seed: int = 0) -> list[str]:
    """`n` documents of `shots` worked examples each, from `n × shots` consecutive training problems.

    A document reads like the evaluation's few-shot prompt with its question answered: `Q: q1\\nA: a1\\n...Q: qk\\nA:
    ak\\n`. When the task's training split has fewer distinct questions than `n × shots`, problems repeat in order
    (`Task.problems`), so later documents repeat earlier ones.
    """
    if n < 1 or shots < 1:
        raise UsageError(f"n={n} documents of shots={shots} worked examples is invalid; both must be >= 1")
    problems = training_problems(task, n * shots, seed, eval_n, eval_seed)
    return [worked_examples(problems[i * shots:(i + 1) * shots]) for i in range(n)]
