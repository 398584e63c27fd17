"""The recovery mixture: weighted sources (sgr, tasks, text, sdft), their shares of every stage, resumption and the
DDP split, the kinds of examples (pairs learn the response, texts every token), the in-data tasks, SDFT, bad input,
`data.sgr` alone pinned to recorded pairs, order and cache, self-answered task documents (`answers: self`), and a
`gradual fit` on a mixture under `kd`."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from helpers import pairs_of
from test_fit import write_config

from gradual import models
from gradual.cli import main
from gradual.datamodule import GradualDataModule, RecoveryDataModule
from gradual.distill import loss_mask
from gradual.errors import UsageError
from gradual.generation import DecodingConfig
from gradual.importance import calibration_texts
from gradual.lightning_cli import GradualCLI
from gradual.mixture import DataSource
from gradual.sampler import StageSampler
from gradual.sgr import SDFT_TEMPLATE, SGRConfig, accepts, build_pairs
from gradual.tasks import TASKS, build_prompt, get_task
from gradual.tasks.base import Task
from gradual.tiny import tiny_tokenizer
from gradual.training_examples import IGNORE_INDEX, Part, pad_collator, tokenize_pair

TINY = "tiny:llama:6"
GREEDY = DecodingConfig(do_sample=False, max_new_tokens=8)


def sgr_config(tmp_path: Path, **changes: Any) -> SGRConfig:
    """Successor and copy training prompts, greedy 8-token answers, cached under tmp_path (the smoke settings)."""
    return SGRConfig(**{"tasks": ["successor", "copy"], "n_per_task": 4, "decoding": GREEDY,
                        "cache_dir": str(tmp_path / "cache"), **changes})


def data_module(tmp_path: Path, sources: list[dict] | None, **sgr_changes: Any) -> GradualDataModule:
    return GradualDataModule(model=TINY, sgr=sgr_config(tmp_path, **sgr_changes), batch_size=2,
                             sources=None if sources is None else [DataSource(**s) for s in sources])


# ---------------------------------------------------------------------------------------------------------------
# The sampler: shares, resumption, ranks
# ---------------------------------------------------------------------------------------------------------------

def per_source(sampler: StageSampler, epoch: int) -> Counter:
    return Counter(int(sampler.sources[i]) for i in sampler.epoch_order(epoch))


def test_every_stage_holds_each_source_by_weight_and_each_example_by_weight_over_size() -> None:
    sizes, weights = [5, 40, 300, 7], [1.0, 2.0, 1.0, 0.0]
    sources = np.repeat(np.arange(4), sizes)
    lengths = np.random.default_rng(0).integers(1, 90, size=len(sources)).tolist()
    sampler = StageSampler(lengths, samples_per_epoch=40, batch_size=4, seed=3, rank=0, world_size=1,
                           sources=sources, weights=weights)
    seen: Counter = Counter()
    for epoch in range(10):
        assert per_source(sampler, epoch) == Counter({0: 10, 1: 20, 2: 10}), "the weights' shares, exactly"
        seen.update(sampler.epoch_order(epoch).tolist())
    assert [seen[i] for i in range(5)] == [20] * 5, "the small source passes over its examples evenly"
    assert {seen[i] for i in range(5, 45)} == {5}, "rate ∝ weight / size: 1/5 against 2/40 is 4 to 1"
    assert all(seen[i] <= 1 for i in range(45, 345)) and not any(seen[i] for i in range(345, 352))

    uneven = StageSampler(lengths, samples_per_epoch=64, batch_size=4, seed=3, rank=0, world_size=1,
                          sources=sources, weights=[0.3, 1.7, 1.0, 0.5])
    total: Counter = Counter()
    for epoch in range(20):
        counts = per_source(uneven, epoch)
        total.update(counts)
        for k, w in enumerate([0.3, 1.7, 1.0, 0.5]):
            assert abs(counts[k] - 64 * w / 3.5) <= 2, (epoch, k, counts)
    for k, w in enumerate([0.3, 1.7, 1.0, 0.5]):
        assert abs(total[k] - 20 * 64 * w / 3.5) <= 1.5, "no drift over stages"


def test_one_source_keeps_the_order_it_always_had() -> None:
    """Batches pinned from a recording of the single-source sampler (a 13-example pool, 2 ranks, 3 stages)."""
    lengths = np.random.default_rng(4).integers(1, 60, size=13).tolist()
    before = {0: [[[1, 4], [9, 3]], [[0, 8], [6, 5]], [[6, 5], [9, 3]]],
              1: [[[2, 12], [10, 7]], [[11, 11], [2, 0]], [[4, 12], [8, 10]]]}
    for rank in (0, 1):
        sampler = StageSampler(lengths, 8, 2, seed=5, mega_batch_mult=2, rank=rank, world_size=2, weights=[3.0])
        assert [sampler.batches(e) for e in range(3)] == before[rank]


def test_mixture_resumes_by_epoch_and_ranks_take_disjoint_halves_of_each_step() -> None:
    sources = np.repeat([0, 1, 2], [6, 30, 11])
    lengths = np.random.default_rng(1).integers(1, 70, size=len(sources)).tolist()

    def make(rank: int, world: int) -> StageSampler:
        return StageSampler(lengths, samples_per_epoch=24, batch_size=3, seed=7, mega_batch_mult=2, rank=rank,
                            world_size=world, sources=sources, weights=[1.0, 3.0, 2.0])

    continuous = make(0, 1)
    seen = {}
    for epoch in range(5):
        continuous.set_epoch(epoch)
        seen[epoch] = list(continuous)
    resumed = make(0, 1)
    resumed.set_epoch(3)
    assert list(resumed) == seen[3] and seen[3] != seen[4]

    ranks = [make(0, 2), make(1, 2)]
    for epoch in range(5):
        orders = [r.epoch_order(epoch) for r in ranks]
        assert np.array_equal(orders[0], orders[1]), "every rank computes the same global order"
        halves = [r.batches(epoch) for r in ranks]
        assert [len(h) for h in halves] == [4, 4] and all(len(b) == 3 for h in halves for b in h)
        assert Counter(i for h in halves for b in h for i in b) == Counter(orders[0].tolist())
        for first, second in zip(*halves, strict=True):  # one step: rank 0 the longer half of a length-sorted run
            assert min(lengths[i] for i in first) >= max(lengths[i] for i in second)


def test_weights_and_sources_are_checked() -> None:
    with pytest.raises(UsageError, match="weight 0"):
        StageSampler([3, 4], 2, 1, rank=0, world_size=1, sources=[0, 1], weights=[0.0, 0.0])
    with pytest.raises(UsageError, match="weight -1"):
        StageSampler([3, 4], 2, 1, rank=0, world_size=1, sources=[0, 1], weights=[1.0, -1.0])
    with pytest.raises(UsageError, match="source 1 has weight 2.0 but no examples"):
        StageSampler([3, 4], 2, 1, rank=0, world_size=1, sources=[0, 0], weights=[1.0, 2.0])


# ---------------------------------------------------------------------------------------------------------------
# Kinds of examples
# ---------------------------------------------------------------------------------------------------------------

def test_texts_learn_every_token_and_pairs_only_the_response(tiny_tok) -> None:
    dm = RecoveryDataModule(tokenizer=tiny_tok, samples_per_epoch=4, batch_size=2, max_length=64)
    dm.set_parts([Part("pairs", 1.0, [{"prompt": "What is 2+2?", "response": "4"}]),
                  Part("texts", 1.0, [{"text": "Q: 3 + 4\nA: 7\n"}, {"text": "x" * 100}])])
    pair, text, long_text = dm.dataset.examples
    assert dm.dataset.sources == [0, 1, 1]
    assert pair == tokenize_pair(tiny_tok, "What is 2+2?", "4") and pair["labels"][0] == IGNORE_INDEX
    assert text["labels"] == text["input_ids"] and text["input_ids"][0] == tiny_tok.bos_token_id
    assert tiny_tok.decode(text["input_ids"], skip_special_tokens=True) == "Q: 3 + 4\nA: 7\n", "no EOS on a text"
    assert len(long_text["input_ids"]) == 64, "a long text is cut at max_length"
    batch = pad_collator(tiny_tok)([pair, text])
    mask = loss_mask(batch)
    n_text, n_response = len(text["input_ids"]), sum(x != IGNORE_INDEX for x in pair["labels"])
    assert int(mask[1].sum()) == n_text - 1, "kd/sft on a text: every token after the first is a target"
    assert int(mask[0].sum()) == n_response, "on a pair: the response (and its EOS) only"

    positions = RecoveryDataModule(tokenizer=tiny_tok, samples_per_epoch=2, batch_size=2, max_length=64,
                                   max_positions=16)
    positions.set_parts([Part("texts", 1.0, [{"text": "y" * 40}, {"text": "z"}])])
    assert [len(e["input_ids"]) for e in positions.dataset.examples] == [16, 2]
    assert positions.num_clamped == 1 and positions.part_counts == [{"examples": 2, "dropped": 0, "clamped": 1}]


# ---------------------------------------------------------------------------------------------------------------
# Sources: tasks documents, texts, in-data tasks, bad input
# ---------------------------------------------------------------------------------------------------------------

def test_tasks_documents_are_training_problems_in_the_evaluations_fewshot_format(tmp_path: Path, tiny_tok) -> None:
    dm = data_module(tmp_path, [{"kind": "tasks", "tasks": ["successor", "category"], "n_per_task": 6, "shots": 3}],
                     eval_n=300)
    [pool] = dm.pools
    assert len(pool.texts) == 12 and pool.tasks == ["category", "successor"]
    for name, docs in (("successor", pool.texts[:6]), ("category", pool.texts[6:])):
        task = get_task(name)
        train = task.problems("train", 18, 0)
        assert docs == ["".join(build_prompt(task, p, tiny_tok, "fewshot", shots=0) + f" {p.answer}\n"
                                for p in train[3 * d: 3 * d + 3]) for d in range(6)]
        questions = {line[3:] for doc in docs for line in doc.splitlines() if line.startswith("Q: ")}
        assert len(questions) == 18 and all(task.in_split(q, "train") for q in questions)
        assert not questions & {p.question for p in task.problems("eval", 300, 0)}
    prompt = build_prompt(get_task("successor"), get_task("successor").problems("eval", 1)[0], tiny_tok, "fewshot")
    assert prompt.startswith("Q: ") and "\nA: " in prompt and prompt.endswith("\nA:"), "the same Q:/A: lines"


def test_tasks_documents_refuse_problems_shared_with_evaluation(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    class Leaky(Task):
        def in_split(self, question: str, split: str) -> bool:
            return True

    base = get_task("successor")
    monkeypatch.setitem(TASKS, "leaky", Leaky("leaky", "number", base.generate, base.distractors, base.instruction))
    with pytest.raises(UsageError, match="leaky.*evaluation split"):
        data_module(tmp_path, [{"kind": "tasks", "tasks": ["leaky"], "n_per_task": 10}], eval_n=200)


def test_text_sources_read_builtin_texts_files_and_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builtin = data_module(tmp_path, [{"kind": "text"}]).pools[0].texts
    assert builtin == calibration_texts(None, n=None) and len(builtin) > 20
    subset = data_module(tmp_path, [{"kind": "text", "max_texts": 5}]).pools[0].texts
    assert len(subset) == 5 and subset == [t for t in builtin if t in subset], "a seeded subset in source order"
    (tmp_path / "t.txt").write_text("first text\n\nsecond text\n")
    assert data_module(tmp_path, [{"kind": "text", "path": str(tmp_path / "t.txt")}]).pools[0].texts == [
        "first text", "second text"]
    (tmp_path / "t.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    jsonl = data_module(tmp_path, [{"kind": "text", "path": str(tmp_path / "t.jsonl"), "text_field": "body"}])
    assert jsonl.pools[0].texts == ["one", "two"] and jsonl.recovery_tasks() == []
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"text": "from a dataset"}\n{"text": ""}\n')
    hf = data_module(tmp_path, [{"kind": "text", "path": str(tmp_path / "ds")}])
    assert hf.pools[0].texts == ["from a dataset"]


@pytest.mark.parametrize(("sources", "sgr_changes", "expected"), [
    (None, {}, ["copy", "successor"]),
    ([{"kind": "sgr"}], {"source": "file", "path": "PROMPTS"}, []),
    ([{"kind": "tasks", "tasks": ["category"], "n_per_task": 2}], {}, ["category"]),
    ([{"kind": "tasks", "n_per_task": 1, "shots": 1}], {}, sorted(TASKS)),
    ([{"kind": "text"}], {}, []),
    ([{"kind": "text", "path": "TEXTS"}], {}, []),
    ([{"kind": "sdft", "tasks": ["uppercase"], "n_per_task": 2}], {}, ["uppercase"]),
    ([{"kind": "sgr"}, {"kind": "tasks", "tasks": ["category"], "n_per_task": 2}, {"kind": "text"},
      {"kind": "sdft", "tasks": ["uppercase", "copy"], "n_per_task": 2}], {}, ["category", "copy", "successor",
                                                                              "uppercase"]),
    ([{"kind": "sgr", "weight": 0}, {"kind": "tasks", "tasks": ["category"], "n_per_task": 2}], {}, ["category"]),
])
def test_recovery_tasks_are_the_union_of_the_tasks_each_source_draws_from(
        sources: list[dict] | None, sgr_changes: dict, expected: list[str], tmp_path: Path) -> None:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "What number comes after 41?"}\n')
    (tmp_path / "texts.txt").write_text("What number comes after 41? 42\n")
    sgr_changes = {k: str(tmp_path / "prompts.jsonl") if v == "PROMPTS" else v for k, v in sgr_changes.items()}
    for s in sources or []:
        if s.get("path") == "TEXTS":
            s["path"] = str(tmp_path / "texts.txt")
    dm = data_module(tmp_path, sources, **sgr_changes)
    assert dm.recovery_tasks() == expected
    assert sorted({t for row in dm.describe() for t in row["tasks"]}) == expected


BAD_SOURCES = {
    "unknown kind": ("[{kind: web}]", "kind='web' is unknown; allowed: sgr, tasks, text, sdft"),
    "negative weight": ("[{kind: sgr}, {kind: text, weight: -0.5}]", "text weight=-0.5 is invalid"),
    "all weights zero": ("[{kind: sgr, weight: 0}, {kind: text, weight: 0}]", "every data source has weight 0"),
    "missing file": ("[{kind: text, path: /nonexistent/texts.txt}]", "'/nonexistent/texts.txt' does not exist"),
    "unknown task": ("[{kind: tasks, tasks: [nope]}]", "task 'nope' is unknown"),
    "unknown sdft task": ("[{kind: sdft, tasks: [nope]}]", "task 'nope' is unknown"),
    "path on sgr": ("[{kind: sgr, path: p.jsonl}]", "only kind text reads a path"),
    "tasks on text": ("[{kind: text, tasks: [copy]}]", "only kinds tasks and sdft take tasks"),
    "two sgr": ("[{kind: sgr}, {kind: sgr, weight: 2}]", "lists kind sgr twice"),
    "empty": ("[]", "data.sources is empty"),
    "misspelt field": ("[{kind: text, wieght: 2}]", "data.sources: unknown field 'wieght'"),
    "zero shots": ("[{kind: tasks, shots: 0}]", "shots=0 is invalid"),
    "unknown answers": ("[{kind: tasks, answers: model}]", "answers='model' is unknown; allowed: reference, self"),
    "answers on sdft": ("[{kind: sdft, answers: self}]", "sdft has answers='self', but only kind tasks takes answers"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_sources_end_in_one_line_before_any_model_loads(case: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda name, *a, **k: loads.append(name) or real(name, *a, **k))
    value, needle = BAD_SOURCES[case]
    config, run_dir = write_config(tmp_path)
    assert main(["fit", "--config", str(config), "--data.sources", value]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len([line for line in err if "error" in line.lower()]) == 1 and err[-1].startswith("gradual: error:")
    assert needle in err[-1], err[-1]
    assert loads == [] and not run_dir.exists()


# ---------------------------------------------------------------------------------------------------------------
# data.sgr alone (pinned); SDFT
# ---------------------------------------------------------------------------------------------------------------

def test_data_sgr_alone_gives_the_same_pairs_order_and_cache_as_before(tmp_path: Path) -> None:
    """Digests and batches pinned from a recording (dataset answers: no model involved); with the teacher, the pairs
    and the one cache file are those of `build_pairs` on the same settings."""
    dm = data_module(tmp_path, None, responses="dataset")
    dm.setup("fit")
    dm.samples_per_epoch = 6
    digest = hashlib.sha256(json.dumps(pairs_of(dm)).encode()).hexdigest()
    assert digest == "4b7d8a8a26eb193b87a5f27b15c148786c49ef022931e34431ebe6ef6366f0a1"
    tokens = hashlib.sha256(json.dumps(dm.dataset.examples).encode()).hexdigest()
    assert tokens == "0d15420cbd7f89611cc01295a00774010e1dbe2512ff5bfe5101d576ade88c46"
    assert [dm.stage_sampler().batches(e) for e in range(4)] == [
        [[0, 2], [4, 5], [6, 3]], [[4, 5], [7, 1], [1, 3]], [[7, 7], [5, 6], [0, 2]], [[1, 3], [0, 2], [4, 6]]]

    dm = data_module(tmp_path, None)
    dm.setup("fit")
    cache = sorted((tmp_path / "cache").glob("*.jsonl"))
    direct = build_pairs(models.load_model(TINY), tiny_tokenizer(), dm.sgr, model_id=TINY, progress=False)
    assert pairs_of(dm) == [{"prompt": p["prompt"], "response": p["response"]} for p in direct]
    assert sorted((tmp_path / "cache").glob("*.jsonl")) == cache and len(cache) == 1, "one cache, hit by both"
    assert dm.describe() == [{"name": "sgr", "kind": "sgr", "weight": 1.0, "share": 1.0,
                              "tasks": ["copy", "successor"], "prompts": 8, "examples": 8}]


def test_sdft_keeps_accepted_rewrites_and_falls_back_to_the_reference(tmp_path: Path) -> None:
    """The tiny teacher's rewrites (cached by the SGR machinery) are kept only where the scorer accepts them; the cache
    is then edited so half the rewrites restate the reference, and exactly those are kept."""
    sources = [{"kind": "sdft", "tasks": ["successor"], "n_per_task": 4}]
    dm = data_module(tmp_path, sources, eval_n=50)
    dm.setup("fit")
    items = dm.pools[0].items
    [path] = sorted((tmp_path / "cache").glob("*.jsonl"))
    lines = path.read_text().splitlines()
    records = sorted((json.loads(line) for line in lines[1:]), key=lambda r: r["i"])
    assert [r["prompt"] for r in records] == [SDFT_TEMPLATE.format(prompt=it.prompt, reference=it.reference)
                                              for it in items], "the teacher saw prompt and reference"
    replies = [r["responses"][0] for r in records]
    assert [p["response"] for p in pairs_of(dm)] == [r if accepts(it, r) else it.reference
                                                 for it, r in zip(items, replies, strict=True)]
    assert [p["prompt"] for p in pairs_of(dm)] == [it.prompt for it in items], "the student sees the plain prompt"

    rewrites = {r["i"]: f"After {items[r['i']].reference}... no: the answer is {items[r['i']].reference}."
                if r["i"] % 2 == 0 else "I would rather not say." for r in records}
    path.write_text("\n".join([lines[0]] + [json.dumps({**r, "responses": [rewrites[r["i"]]]}) for r in records])
                    + "\n")
    again = data_module(tmp_path, sources, eval_n=50)
    again.setup("fit")
    assert [p["response"] for p in pairs_of(again)] == [rewrites[i] if i % 2 == 0 else it.reference
                                                    for i, it in enumerate(items)]
    [row] = again.describe()
    assert row["rewrites"] == 2 and row["examples"] == 4 and row["tasks"] == ["successor"]


# ---------------------------------------------------------------------------------------------------------------
# Self-answered task documents (answers: self)
# ---------------------------------------------------------------------------------------------------------------

SELF_SOURCE = {"kind": "tasks", "tasks": ["successor", "category"], "n_per_task": 3, "shots": 1, "answers": "self"}


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A spy on the batched generator the teacher answers through: the number of prompts of every call."""
    import gradual.sgr.teacher as teacher

    calls: list[int] = []
    real = teacher.generate

    def spy(model: Any, tokenizer: Any, prompts: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(teacher, "generate", spy)
    return calls


def hf_greedy_line(model: torch.nn.Module, tokenizer: Any, prompt: str, budget: int) -> str:
    """transformers' own greedy `generate` on the prompt, read as the evaluation reads a few-shot reply."""
    from gradual.generation import encode_prompt
    from gradual.tasks.documents import answer_line

    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=budget,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id,
                                                                                tokenizer.pad_token_id])
    return answer_line(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\nQ:")[0])


def test_self_documents_hold_the_models_greedy_answers_to_the_evaluation_prompts(tmp_path: Path,
                                                                                   generations: list[int]) -> None:
    dm = data_module(tmp_path, [SELF_SOURCE], eval_n=50)
    dm.setup("fit")
    items = dm.pools[0].items
    docs = [e["text"] for e in dm.parts[0].examples]
    tok, model = tiny_tokenizer(), models.load_model(TINY)
    expected, answered_otherwise = [], 0
    for name in ("successor", "category"):
        task = get_task(name)
        for it, p in zip([it for it in items if it.task == name], task.problems("train", 3, 0), strict=True):
            assert it.prompt == build_prompt(task, p, tok, "fewshot", shots=1), "the evaluation's own prompt"
            line = hf_greedy_line(model, tok, it.prompt, task.fewshot_tokens)
            if line.strip():
                expected.append(it.prompt + line + "\n")
                answered_otherwise += line.strip() != p.answer
                if line.strip() != p.answer:
                    assert p.answer not in (it.prompt + line + "\n")[len(it.prompt):], "no reference answer"
    assert expected and docs == expected, "each document: the prompt, then the model's own first line"
    assert answered_otherwise > 0, "the tiny model answers otherwise than the references"
    assert sum(generations) == len(items) and len(list((tmp_path / "cache").glob("*.jsonl"))) == 2
    [row] = dm.describe()
    assert row["answers"] == "self" and row["documents"] == 6 and row["examples"] == len(docs)

    again = data_module(tmp_path, [SELF_SOURCE], eval_n=50)
    again.setup("fit")
    assert [e["text"] for e in again.parts[0].examples] == docs
    assert sum(generations) == len(items), "the second build reads the cache: nothing is generated"


def test_self_answer_cache_key_follows_the_weights_and_the_decoding(tmp_path: Path, generations: list[int]) -> None:
    from gradual.sgr import self_documents

    items = data_module(tmp_path, [{**SELF_SOURCE, "tasks": ["successor"]}], eval_n=50).pools[0].items
    cfg, tok, model = sgr_config(tmp_path), tiny_tokenizer(), models.load_model(TINY)

    def build(**kwargs: Any) -> tuple[int, int]:
        """(prompts generated, cache files) after one build."""
        before = sum(generations)
        self_documents(model, tok, cfg, items, model_id=TINY, progress=False, **kwargs)
        return sum(generations) - before, len(list((tmp_path / "cache").glob("*.jsonl")))

    assert build() == (3, 1)
    assert build() == (0, 1), "same weights, prompts and decoding: read from the cache"
    assert build(max_new_tokens=3) == (3, 2), "another decoding budget: its own cache file"
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert build() == (3, 3), "other weights: answered afresh"
    assert build(max_new_tokens=3) == (3, 4)


def test_reference_task_documents_are_unchanged(tmp_path: Path) -> None:
    """`answers: reference` (the default) gives the documents and tokens pinned before `answers` existed."""
    for source in ({}, {"answers": "reference"}):
        dm = data_module(tmp_path, [{"kind": "tasks", "tasks": ["successor", "category"], "n_per_task": 6,
                                     "shots": 3, **source}], eval_n=300)
        dm.setup("fit")
        dm.samples_per_epoch = 6
        assert hashlib.sha256(json.dumps(dm.parts[0].examples).encode()).hexdigest() == (
            "3dc23045b65b88f400227daabeec58ee34e3f1f90e4115ba26dca61c4c7ac7af")
        assert hashlib.sha256(json.dumps(dm.dataset.examples).encode()).hexdigest() == (
            "7de20dc3503252d14fee8661449572208fb39db18cdd7fb369f9e02dbeb7aa18")
        assert not dm.needs_teacher and not list((tmp_path / "cache").glob("*.jsonl"))


@pytest.mark.parametrize("loss", ["kd", "sft", "kd+sft"])
def test_fit_on_self_documents_learns_every_token_and_says_self_generated(loss: str, tmp_path: Path) -> None:
    from gradual.runplan import plan_lines

    config, run_dir = write_config(tmp_path, data__sources=[{**SELF_SOURCE, "tasks": ["category"]}],
                                   data__sgr__cache_dir=str(tmp_path / "cache"), model__recovery={"loss": loss},
                                   model__schedule__max_layers=1, model__schedule__steps_per_stage=2)
    recorder = _Batches()
    cli = fit_with(config, recorder)
    docs = {tuple(tiny_tokenizer()(e["text"])["input_ids"]) for e in cli.datamodule.parts[0].examples}
    assert recorder.rows and all(labels == ids and tuple(ids) in docs for ids, labels in recorder.rows)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stages"][-1]["loss"] is not None and np.isfinite(results["stages"][-1]["loss"])
    assert results["in_data_tasks"] == ["category"] and results["recovery_data"][0]["answers"] == "self"
    assert "(tasks, self-generated answers)" in (run_dir / "report.md").read_text()
    [recovery] = [line for line in plan_lines(cli.model, cli.datamodule, cli.trainer) if "recovery:" in line]
    assert "self-generated answers of the original model" in recovery, recovery


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------

class _Batches(L.Callback):
    """Labels and attention of every training batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[list[int], list[int]]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            n = int(mask.sum())
            self.rows.append((ids[:n].tolist(), labels[:n].tolist()))


def test_fit_on_a_mixture_with_kd_runs_end_to_end(tmp_path: Path) -> None:
    sources = [{"kind": "sgr", "weight": 1.0},
               {"kind": "tasks", "weight": 2.0, "tasks": ["category"], "n_per_task": 4, "shots": 3},
               {"kind": "text", "weight": 0.5, "max_texts": 6},
               {"kind": "sdft", "weight": 0.5, "tasks": ["uppercase"], "n_per_task": 3}]
    config, run_dir = write_config(tmp_path, data__sources=sources, data__sgr__cache_dir=str(tmp_path / "cache"),
                                   model__recovery={"loss": "kd"}, model__schedule__max_layers=2,
                                   model__schedule__steps_per_stage=4)
    recorder = _Batches()
    cli = fit_with(config, recorder)
    assert cli.model.recovery.loss == "kd"
    results = json.loads((run_dir / "results.json").read_text())
    assert [s["depth"] for s in results["stages"]] == [6, 5, 4]
    assert all(s["loss"] is not None and np.isfinite(s["loss"]) for s in results["stages"][1:])
    assert results["in_data_tasks"] == ["category", "copy", "successor", "uppercase"]
    rows = cli.datamodule.describe()
    assert [(r["kind"], r["share"]) for r in rows] == [("sgr", 0.25), ("tasks", 0.5), ("text", 0.125),
                                                       ("sdft", 0.125)]
    assert [r["examples"] for r in rows] == [8, 4, 6, 3] and rows[3]["rewrites"] is not None
    assert len(recorder.rows) == 2 * 4 * 2, "2 stages × 4 steps × batch 2"
    texts = [labels == ids for ids, labels in recorder.rows]
    assert sum(texts) == 2 * 5, "each stage of 8: 4 task documents and 1 text (weights 2 and 0.5 of 4)"
    assert all(labels[0] == IGNORE_INDEX for (ids, labels), t in zip(recorder.rows, texts, strict=True) if not t)


def fit_with(config: Path, callback: L.Callback) -> GradualCLI:
    """`gradual fit` in process with one more callback."""
    cli = GradualCLI(args=["--config", str(config)], run=False)
    cli.trainer.callbacks.append(callback)
    cli.model.check_run_dir(cli.trainer, cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def test_results_record_what_each_source_contributed(tmp_path: Path) -> None:
    from test_fit import fit_in_process, write_config

    config, run_dir = write_config(tmp_path, model__schedule__max_layers=1, model__schedule__steps_per_stage=1,
                                   model__recovery={"loss": "kd"},
                                   data__sources=[{"kind": "sgr"}, {"kind": "tasks", "tasks": ["category"],
                                                                    "n_per_task": 4, "weight": 3.0}])
    fit_in_process(config)
    results = json.loads((run_dir / "results.json").read_text())
    kinds = {d["kind"]: d for d in results["recovery_data"]}
    assert kinds["tasks"]["share"] == 0.75 and kinds["tasks"]["tasks"] == ["category"]
    assert kinds["sgr"]["tasks"] == ["copy", "successor"] and kinds["sgr"]["examples"] == 8
    assert results["in_data_tasks"] == ["category", "copy", "successor"]
    assert "recovery data: " in (run_dir / "report.md").read_text()
