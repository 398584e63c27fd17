"""Evaluate a live model on built-in tasks: generative (extracted exact match) and classification (log-likelihood
choice) forms over the same problems, so the gap between the two is measured on identical items.

Result keys: `<task>` for the generative form, `mc_<task>` for the classification form.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.generation import DEFAULT_SYSTEM_PROMPT, DecodingConfig, format_prompt, generate, prompt_room
from gradual.tasks.base import Problem, Task, fewshot_examples
from gradual.tasks.builtin import TASKS, check_difficulty, get_task
from gradual.tasks.extract import FAILURES, classify_failure, extract_answer
from gradual.tasks.result import TaskResult
from gradual.tasks.scoring import continuation_logprobs

log = logging.getLogger(__name__)

FORMS = ("generative", "classification")
FORMATS = ("fewshot", "chat")
FEWSHOT_STOP = ["\nQ:", "\n\n"]
CODE_TASKS = ("humaneval",)


def worked_examples(problems: Sequence[Problem]) -> str:
    """Solved problems as plain `Q: ... / A: ...` lines, each ending in a newline: the few-shot format, also used for
    the few-shot recovery documents (`gradual.tasks.documents`) so training text and evaluation prompts match."""
    return "".join(f"Q: {p.question}\nA: {p.answer}\n" for p in problems)


def fewshot_prefix(task: Task, k: int = 5) -> str:
    """k worked examples as plain `Q: ... / A: ...` lines; ends in a single newline."""
    return worked_examples(fewshot_examples(task, k))


def fewshot_prompt(task: Task, problem: Problem, shots: int = 5) -> str:
    """The few-shot prompt: `shots` worked examples + `Q: ...\\nA:`; no tokenizer needed."""
    return f"{fewshot_prefix(task, shots)}Q: {problem.question}\nA:"


def fewshot_decoding(max_new_tokens: int) -> DecodingConfig:
    """How a few-shot reply is decoded: greedy, ended with its first non-blank line (`answer_text` reads only that
    line) or at a stop string. The self-generated recovery documents decode the same way (`sgr.self_documents`)."""
    return DecodingConfig(do_sample=False, max_new_tokens=max_new_tokens, stop=list(FEWSHOT_STOP),
                          stop_at_line_end=True)


def build_prompt(task: Task, problem: Problem, tokenizer: PreTrainedTokenizerBase, fmt: str, shots: int = 5) -> str:
    """The full prompt string: few-shot examples + `Q: ...\\nA:`, or the chat template with an answer instruction."""
    if fmt == "fewshot":
        return fewshot_prompt(task, problem, shots)
    return format_prompt(tokenizer, task.chat_message(problem), system=DEFAULT_SYSTEM_PROMPT, chat=True)


def choice_text(prompt: str, choice: str) -> str:
    """A choice as a continuation: after `A:` it needs a leading space; after a chat template's newline it does not."""
    return choice if prompt[-1:].isspace() else f" {choice}"


def answer_text(reply: str, fmt: str) -> str:
    """The part of a reply that holds the answer: the first non-empty line for few-shot (examples are one line)."""
    if fmt == "fewshot":
        lines = [line for line in reply.strip().split("\n") if line.strip()]
        return lines[0] if lines else ""
    return reply


def token_budget(task: Task, fmt: str, max_new_tokens: int | None) -> int:
    """New tokens a reply may take: `max_new_tokens`, else the task's own budget for the format."""
    return max_new_tokens or (task.fewshot_tokens if fmt == "fewshot" else task.chat_tokens)


def evaluate_generative(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
                        problems: Sequence[Problem], fmt: str = "fewshot", batch_size: int = 16,
                        max_new_tokens: int | None = None, progress: bool = True, records: bool = False,
                        shots: int = 5) -> TaskResult:
    """Greedy batched generation, answer extraction and failure analysis over `problems`."""
    prompts = [build_prompt(task, p, tokenizer, fmt, shots) for p in problems]
    budget = token_budget(task, fmt, max_new_tokens)
    # a few-shot answer is the reply's first non-blank line (`answer_text`): decoding stops when that line ends
    config = fewshot_decoding(budget) if fmt == "fewshot" else DecodingConfig(do_sample=False, max_new_tokens=budget)
    outputs = generate(model, tokenizer, prompts, config, batch_size=batch_size, progress=progress, desc=task.name)
    replies = [r[0] for r in outputs]
    accuracy = MeanMetric(sync_on_compute=False)  # local: under DDP only rank 0 evaluates
    failures = dict.fromkeys(FAILURES, 0)
    items, correct = [], []
    for p, reply, cut in zip(problems, replies, outputs.truncated, strict=True):
        text = answer_text(reply, fmt)
        category = classify_failure(task.kind, text, p.answer, task.labels, p.brackets)
        failures[category] += 1
        correct.append(float(category == "correct"))
        accuracy.update(torch.tensor(float(category == "correct")))
        if records:
            items.append(dict(question=p.question, answer=p.answer, reply=reply,
                              extracted=extract_answer(task.kind, text, task.labels), failure=category,
                              truncated=cut))
    return TaskResult(task.name, "generative", float(accuracy.compute()), len(problems), failures, fmt,
                      items if records else None, sum(outputs.truncated), correct)


def evaluate_classification(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
                            problems: Sequence[Problem], fmt: str = "fewshot", batch_size: int = 16,
                            progress: bool = True, records: bool = False, shots: int = 5) -> TaskResult:
    """Pick the choice with the highest summed log-probability; accuracy against the reference answer's index."""
    pairs, owner = [], []
    for k, p in enumerate(problems):
        prompt = build_prompt(task, p, tokenizer, fmt, shots)
        for choice in p.choices:
            pairs.append((prompt, choice_text(prompt, choice)))
            owner.append(k)
    flat = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, progress=progress,
                                 desc=f"mc_{task.name}")
    width = max(len(p.choices) for p in problems)
    scores = torch.full((len(problems), width), -math.inf)
    fill = [0] * len(problems)
    cut = [False] * len(problems)
    for k, s, t in zip(owner, flat, flat.truncated, strict=True):
        scores[k, fill[k]] = s
        fill[k] += 1
        cut[k] |= t
    target = torch.tensor([p.label for p in problems])
    metric = MulticlassAccuracy(num_classes=width, average="micro", sync_on_compute=False)
    metric.update(scores, target)
    pred = scores.argmax(dim=1)
    correct = int((pred == target).sum())
    items = None
    if records:
        items = [dict(question=p.question, answer=p.answer, choices=list(p.choices), label=p.label,
                      logprobs=scores[k, :len(p.choices)].tolist(), predicted=int(pred[k]), truncated=cut[k])
                 for k, p in enumerate(problems)]
    return TaskResult(f"mc_{task.name}", "classification", float(metric.compute()), len(problems),
                      {"correct": correct, "wrong_choice": len(problems) - correct}, fmt, items, sum(cut),
                      (pred == target).double().tolist())


def check_task_settings(tasks: Sequence[str], forms: Sequence[str] = FORMS, fmt: str = "fewshot",
                        enable_code: bool = False, difficulty: str = "small", options: bool = False) -> None:
    """The one check of the built-in task settings `gradual eval`, `TaskEvaluation` and `evaluate` share, so each
    refuses them before any model loads. The forms matter only when there are tasks. `options` names the settings
    as command-line options (`--fmt 'x'`) rather than as keys (`fmt='x'`).

    Raises:
        UsageError: an unknown task, humaneval without `enable_code`, unknown or no forms, an unknown format or
            difficulty.
    """
    def named(key: str, value: object) -> str:
        return f"--{key.replace('_', '-')} {value!r}" if options else f"{key}={value!r}"

    unknown = [t for t in tasks if t not in TASKS and t not in CODE_TASKS]
    if unknown:
        allowed = ", ".join([*TASKS, *CODE_TASKS])
        raise UsageError(f"unknown task(s) {', '.join(map(repr, unknown))}; allowed: {allowed}")
    if any(t in CODE_TASKS for t in tasks) and not enable_code:
        allow = "add --enable-code" if options else "set enable_code=True"
        raise UsageError(f"task 'humaneval' runs model-written code; {allow} to allow it")
    if tasks and (not forms or any(f not in FORMS for f in forms)):
        shown = ",".join(forms) if options else list(forms)
        raise UsageError(f"{named('forms', shown)} is invalid; allowed: one or both of {', '.join(FORMS)}")
    if fmt not in FORMATS:
        raise UsageError(f"{named('fmt', fmt)} is unknown; allowed: {', '.join(FORMATS)}")
    check_difficulty(difficulty)


def distinct_problems(task: Task, n: int, seed: int = 0) -> list[Problem]:
    """The first `n` evaluation problems of `task`, each distinct question once (fewer, with a warning, when the
    split holds fewer than `n`)."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for p in task.problems("eval", n, seed):
        if p.question not in seen:
            seen.add(p.question)
            problems.append(p)
    if len(problems) < n:
        log.warning("task %s has %d distinct evaluation problems at this difficulty; n=%d scores those %d once each",
                    task.name, len(problems), n, len(problems))
    return problems


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], n: int = 100,
             forms: Sequence[str] = FORMS, fmt: str = "fewshot", batch_size: int = 16,
             max_new_tokens: int | None = None, seed: int = 0, progress: bool = True, records: bool = False,
             enable_code: bool = False, shots: int = 5, difficulty: str = "small") -> dict[str, TaskResult]:
    """Score the model on each task's evaluation split (`n` problems from `seed`) at `difficulty` (`small` or `large`,
    see `gradual.tasks.builtin`).

    Returns `{<task>: generative result, mc_<task>: classification result}` for the requested forms. Code tasks
    (`humaneval`) run model-written code in a sandbox and need `enable_code=True`. `max_new_tokens=None` uses each
    task's own budget (short for few-shot answers, longer for chat replies that reason first); `shots` is the number
    of worked examples in the few-shot format. A prompt longer than the model's positions (less the reply's budget)
    keeps its last tokens and is counted in its result's `truncated`; a budget the positions cannot hold is refused
    before any work. A task whose evaluation split has fewer than `n` distinct questions (small `uppercase`,
    `category`, `products`: 122-171) is scored on those once each, with a warning, and its result's `n` says so:
    scoring a repeated problem again adds no information, and its copies would narrow the intervals falsely.
    """
    check_task_settings(tasks, forms, fmt, enable_code, difficulty)
    if n < 1 or batch_size < 1 or shots < 0:
        raise UsageError(f"n={n}, batch_size={batch_size}, shots={shots} are invalid; need n, batch_size >= 1, "
                         "shots >= 0")
    code = [t for t in tasks if t in CODE_TASKS]
    builtin = [get_task(t, difficulty) for t in tasks if t not in CODE_TASKS]
    code_tokens = max_new_tokens or 256
    budgets = [token_budget(t, fmt, max_new_tokens) for t in builtin if "generative" in forms]
    for budget in budgets + [code_tokens] * bool(code and enable_code):  # without enable_code, humaneval refuses
        prompt_room(model, budget, "max_new_tokens")  # refuse a budget the model cannot hold before any work
    results: dict[str, TaskResult] = {}
    for task in tqdm(builtin, desc="tasks", disable=None if progress else True, leave=False):
        problems = distinct_problems(task, n, seed)
        if "generative" in forms:
            results[task.name] = evaluate_generative(model, tokenizer, task, problems, fmt, batch_size,
                                                     max_new_tokens, progress, records, shots)
        if "classification" in forms:
            res = evaluate_classification(model, tokenizer, task, problems, fmt, batch_size, progress, records,
                                          shots)
            results[res.task] = res
    if code:
        from gradual.tasks.code import evaluate_humaneval

        results["humaneval"] = evaluate_humaneval(model, tokenizer, n=n, enable_code=enable_code,
                                                  batch_size=batch_size, max_new_tokens=code_tokens,
                                                  progress=progress, records=records)
    return results
