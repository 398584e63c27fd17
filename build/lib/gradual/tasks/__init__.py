"""Built-in offline tasks (generative and classification forms on the same problems), answer extraction, failure
analysis and batched evaluation. lm-eval tasks live in `gradual.tasks.lm_eval_bridge`, the optional HumanEval
code task and its sandbox in `gradual.tasks.code`.
"""

from gradual.tasks.base import Problem, Task, assert_disjoint, fewshot_examples
from gradual.tasks.builtin import TASKS, get_task, task_names
from gradual.tasks.evaluate import (
    CODE_TASKS,
    FORMATS,
    FORMS,
    build_prompt,
    check_task_settings,
    evaluate,
    evaluate_classification,
    evaluate_generative,
)
from gradual.tasks.extract import FAILURES, classify_failure, extract_answer, is_repetitive
from gradual.tasks.result import TaskResult, format_results_table

__all__ = [
    "CODE_TASKS", "FAILURES", "FORMATS", "FORMS", "TASKS", "Problem", "Task", "TaskResult", "assert_disjoint",
    "build_prompt", "check_task_settings", "classify_failure", "evaluate", "evaluate_classification",
    "evaluate_generative", "extract_answer", "fewshot_examples", "format_results_table", "get_task", "is_repetitive",
    "task_names",
]
