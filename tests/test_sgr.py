"""SGR recovery data: prompt sources, cached teacher generation (hit, miss, resume, truncation), response modes,
DDP sharding. Real tiny models; generation calls are counted by wrapping the real `generate`."""

from __future__ import annotations

import copy
import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import gradual.sgr.teacher
from gradual.errors import UsageError
from gradual.generation import DecodingConfig, encode_prompt, format_prompt, generate, response_prompt
from gradual.models import save_model
from gradual.ranks import gather_in_order, merge_shards, split_for_rank
from gradual.sgr import PromptItem, SGRConfig, accepts, build_pairs, load_prompts, teacher_responses
from gradual.sgr.cache import ResponseCache
from gradual.sgr.fingerprint import cache_key, disk_teacher, fingerprint, generation_key, model_identity, weights_digest
from gradual.sgr.teacher import vllm_engine_kwargs, vllm_sampling_kwargs
from gradual.tasks.base import Task
from gradual.tasks.builtin import TASKS, get_task
from gradual.tiny import tiny_model, tiny_tokenizer
from gradual.training_examples import tokenize_pair

ITEMS = [PromptItem(p, None, "file") for p in
         ["hi", "What is 2+2?", "Tell me about cats and dogs", "x", "Repeat: a, b, c", "Name a color.", "7 * 6 ="]]
GREEDY = DecodingConfig(do_sample=False, max_new_tokens=8)


def make_model(seed: int = 0) -> torch.nn.Module:
    return tiny_model("qwen2", num_layers=2, seed=seed)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def spy(monkeypatch):
    """Counts prompts that really reach `generate`; `spy.stop_after` batches makes it raise (an interruption)."""

    class Spy:
        prompts: list[str] = []
        calls = 0
        stop_after: int | None = None

    class Interrupted(Exception):
        pass

    Spy.prompts, Spy.Interrupted = [], Interrupted

    def counting(model, tokenizer, prompts, config, batch_size=16, progress=True, desc="", on_batch=None,
                 seed_ids=None):
        Spy.calls += 1
        batches = 0

        def hook(idx, outs):
            nonlocal batches
            on_batch(idx, outs)
            Spy.prompts.extend(prompts[i] for i in idx)
            batches += 1
            if Spy.stop_after is not None and batches >= Spy.stop_after:
                raise Interrupted

        return generate(model, tokenizer, prompts, config, batch_size, progress, desc, hook, seed_ids)

    monkeypatch.setattr(gradual.sgr.teacher, "generate", counting)
    return Spy


def cfg_for(tmp_path: Path | None = None, **kw) -> SGRConfig:
    """A file-source config (the prompts are passed as items) with greedy decoding, batch 3, cache under tmp_path."""
    base = dict(source="file", path="unused.jsonl", decoding=GREEDY, batch_size=3,
                cache_dir=str(tmp_path / "cache") if tmp_path else None)
    return SGRConfig(**{**base, **kw})


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("*.jsonl"))


@pytest.fixture(scope="module")
def base(model, tok, tmp_path_factory) -> tuple[Path, list[dict]]:
    """One cached greedy run over ITEMS (batch 3), shared so each test only pays for the generation it checks."""
    root = tmp_path_factory.mktemp("base")
    return root, build_pairs(model, tok, cfg_for(root), items=ITEMS, progress=False)


@pytest.fixture
def cached(base, tmp_path) -> Path:
    """A private copy of the base cache: tests corrupt or extend it."""
    shutil.copytree(base[0] / "cache", tmp_path / "cache")
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# Generation and cache
# ---------------------------------------------------------------------------------------------------------------

def test_batched_greedy_sgr_equals_unbatched(model, tok, base):
    batched = base[1]
    single = build_pairs(model, tok, cfg_for(batch_size=1), items=ITEMS, progress=False)
    assert batched == single
    assert [p["prompt"] for p in batched] == [it.prompt for it in ITEMS]
    assert len({p["response"] for p in batched}) > 1


def test_teacher_sees_chat_formatted_prompts_and_pairs_keep_raw_prompt(model, tok, spy):
    """The teacher continues exactly the prompt part the data module trains on; pairs store the raw user text."""
    cfg = cfg_for(system_prompt="Be brief.")
    pairs = build_pairs(model, tok, cfg, items=ITEMS[:3], progress=False)
    assert sorted(spy.prompts) == sorted(format_prompt(tok, it.prompt, "Be brief.") for it in ITEMS[:3])
    assert "<|system|>Be brief." in spy.prompts[0]
    for chat in (True, False):
        ids = tokenize_pair(tok, ITEMS[1].prompt, "answer", "Be brief.", chat=chat)
        prompt_ids = [i for i, label in zip(ids["input_ids"], ids["labels"], strict=True) if label == -100]
        teacher = response_prompt(tok, ITEMS[1].prompt, "Be brief.", chat)
        assert prompt_ids == encode_prompt(tok, teacher)
    assert [p["prompt"] for p in pairs] == [it.prompt for it in ITEMS[:3]]
    spy.prompts.clear()
    build_pairs(model, tok, cfg_for(chat=False), items=ITEMS[:3], progress=False)
    assert sorted(spy.prompts) == sorted(it.prompt + "\n" for it in ITEMS[:3]), "the plain prompt data.py trains on"


def test_cache_hit_generates_nothing(model, tok, spy, base, cached):
    second = build_pairs(model, tok, cfg_for(cached), items=ITEMS, progress=False)
    assert spy.calls == 0 and spy.prompts == []
    assert second == base[1]
    [path] = cache_files(cached)
    lines = path.read_text().splitlines()
    meta = json.loads(lines[0])["meta"]
    assert path.stem == meta["fingerprint"] and meta["num_prompts"] == len(ITEMS)
    records = {r["i"]: r for r in map(json.loads, lines[1:])}
    assert sorted(records) == list(range(len(ITEMS)))
    assert records[1]["prompt"] == ITEMS[1].prompt


@pytest.mark.parametrize("change", [
    {"decoding": DecodingConfig(do_sample=False, max_new_tokens=9)},
    {"decoding": DecodingConfig(do_sample=True, max_new_tokens=8)},
    {"system_prompt": "You are terse."},
    {"chat": False},
])
def test_cache_miss_on_changed_setting(model, tok, spy, cached, change):
    build_pairs(model, tok, cfg_for(cached, **change), items=ITEMS, progress=False)
    assert len(spy.prompts) == len(ITEMS)
    assert len(cache_files(cached)) == 2


def test_greedy_key_ignores_sampling_only_settings(model, tok, spy, cached):
    """Temperature, top_p, seed and batch size do not change greedy output, so they must not force a new run."""
    other = DecodingConfig(do_sample=False, max_new_tokens=8, temperature=0.5, top_p=0.5, seed=3)
    build_pairs(model, tok, cfg_for(cached, decoding=other, batch_size=5), items=ITEMS, progress=False)
    assert spy.prompts == []


def test_cache_miss_on_changed_weights(tok, spy, cached):
    model = make_model()
    cfg = cfg_for(cached)
    build_pairs(model, tok, cfg, items=ITEMS, progress=False)
    assert spy.prompts == [], "a rebuilt model with the same weights hits the cache"
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    build_pairs(model, tok, cfg, items=ITEMS, progress=False)
    assert len(spy.prompts) == len(ITEMS)
    del model.model.layers[1]
    model.config.num_hidden_layers = 1
    build_pairs(model, tok, cfg, items=ITEMS, progress=False)
    assert len(spy.prompts) == 2 * len(ITEMS)
    assert len(cache_files(cached)) == 3


def test_cache_miss_on_changed_prompts(model, tok, spy, cached):
    build_pairs(model, tok, cfg_for(cached), items=ITEMS[:-1] + [PromptItem("Another one", None, "file")],
                progress=False)
    assert len(spy.prompts) == len(ITEMS)


def test_weights_digest_properties():
    a, b = make_model(), make_model()
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(a) != weights_digest(make_model(seed=1))
    with torch.no_grad():
        w = b.model.layers[0].self_attn.q_proj.weight
        w[[0, 1]] = w[[1, 0]].clone()  # same values, same sum: only the position weighting sees the swap
    assert weights_digest(a) != weights_digest(b)
    tok = tiny_tokenizer()
    assert model_identity(a, "x", tok) != model_identity(a, "y", tok)


def test_resume_after_interruption(model, tok, spy, base, tmp_path):
    cfg = cfg_for(tmp_path)
    spy.stop_after = 1
    with pytest.raises(spy.Interrupted):
        build_pairs(model, tok, cfg, items=ITEMS, progress=False)
    assert len(spy.prompts) == 3
    [path] = cache_files(tmp_path)
    assert len(path.read_text().splitlines()) == 1 + 3, "each batch is on disk as soon as it is generated"
    spy.stop_after = None
    resumed = build_pairs(model, tok, cfg, items=ITEMS, progress=False)
    assert len(spy.prompts) == len(ITEMS), "only the missing prompts are generated"
    assert resumed == base[1]


def test_sampled_resume_draws_what_an_uninterrupted_run_draws(model, tok, spy, tmp_path):
    """Sampled SGR: each prompt draws from its own generator seeded by its index in the whole list, so prompts
    answered after an interruption get the answers an uninterrupted run gives them (and the batch size does not
    matter either)."""
    sampled = DecodingConfig(do_sample=True, temperature=1.5, top_p=1.0, max_new_tokens=8, seed=3)
    whole = build_pairs(model, tok, cfg_for(tmp_path / "whole", decoding=sampled), items=ITEMS, progress=False)
    cfg = cfg_for(tmp_path / "resumed", decoding=sampled, batch_size=2)
    spy.stop_after = 1
    with pytest.raises(spy.Interrupted):
        build_pairs(model, tok, cfg, items=ITEMS, progress=False)
    spy.stop_after = None
    assert build_pairs(model, tok, cfg, items=ITEMS, progress=False) == whole
    greedy = build_pairs(model, tok, cfg_for(tmp_path / "greedy"), items=ITEMS, progress=False)
    assert whole != greedy, "the sampled answers differ from greedy ones: sampling is on"


def test_truncated_last_line_and_garbage_tolerated(model, tok, spy, base, cached):
    cfg = cfg_for(cached)
    [path] = cache_files(cached)
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "not json at all\n"
    path.write_text("".join(lines[:-1]) + lines[-1][:7])  # died while writing the last record
    again = build_pairs(model, tok, cfg, items=ITEMS, progress=False)
    assert len(spy.prompts) == 2
    assert again == base[1]
    text = path.read_text()
    assert text.endswith("\n")
    for line in text.splitlines()[1:]:
        if line != "not json at all":
            json.loads(line)  # the partial line was cut off, not continued
    spy.prompts.clear()
    assert build_pairs(model, tok, cfg, items=ITEMS, progress=False) == base[1]
    assert spy.prompts == []


def test_foreign_meta_line_is_restarted(model, tok, spy, base, cached):
    [path] = cache_files(cached)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(json.dumps({"meta": {"fingerprint": "something else"}}) + "\n" + "".join(lines[1:]))
    assert build_pairs(model, tok, cfg_for(cached), items=ITEMS, progress=False) == base[1]
    assert len(spy.prompts) == len(ITEMS)


def test_num_samples_and_chunks(model, tok, tmp_path):
    dec = DecodingConfig(do_sample=True, max_new_tokens=6, num_samples=2, seed=5)
    cfg = cfg_for(tmp_path, decoding=dec, chunk_size=3)
    answers = teacher_responses(model, tok, ITEMS, cfg, progress=False)
    assert [len(a) for a in answers] == [2] * len(ITEMS)
    assert teacher_responses(model, tok, ITEMS, cfg, progress=False) == answers
    assert len({a[0] for a in answers}) > 1 and any(a[0] != a[1] for a in answers)
    pairs = build_pairs(model, tok, cfg, items=ITEMS, progress=False)
    assert len(pairs) == sum(1 for a in answers for r in a if r.strip())


def test_fingerprint_depends_on_inputs(tok):
    settings = generation_key(tok, {2}, cfg_for())
    base = fingerprint("id", ["a", "b"], settings)
    assert base == fingerprint("id", ["a", "b"], settings)
    assert base != fingerprint("id", ["b", "a"], settings)
    assert base != fingerprint("id2", ["a", "b"], settings)
    assert base != fingerprint("id", ["a", "b"], generation_key(tok, {2}, cfg_for(backend="vllm")))
    assert base != fingerprint("id", ["ab"], settings)
    stop = DecodingConfig(do_sample=False, max_new_tokens=8, stop=["\n"])
    assert base != fingerprint("id", ["a", "b"], generation_key(tok, {2}, cfg_for(decoding=stop)))


def test_new_end_of_turn_id_in_generation_config_is_not_served_stale_answers(tok, spy, tmp_path):
    """The issue's scenario: answers cached, then the model's generation_config gains an end-of-turn id (weights
    unchanged, as happens upstream to chat models). The old answers ran past that id, so they must not be reused."""
    model = make_model()
    cfg = cfg_for(tmp_path)
    before = teacher_responses(model, tok, ITEMS, cfg, progress=False)
    # an ordinary token the teacher emits inside an answer: as an end id it cuts that answer short
    i, cut = next((i, a[0][1]) for i, a in enumerate(before) if len(a[0]) > 2)
    end_of_turn = tok.convert_tokens_to_ids(tok.tokenize(cut))[0]
    spy.prompts.clear()
    model.generation_config.eos_token_id = [tok.eos_token_id, end_of_turn]
    after = teacher_responses(model, tok, ITEMS, cfg, progress=False)
    assert len(spy.prompts) == len(ITEMS), "the cached answers were generated without that end id"
    assert after[i] != before[i] and before[i][0].startswith(after[i][0])
    inputs = [response_prompt(tok, it.prompt) for it in ITEMS]
    assert after == generate(model, tok, inputs, GREEDY, progress=False)
    assert len(cache_files(tmp_path)) == 2


def _variant_tokenizer(tok, change: str):
    other = copy.deepcopy(tok)
    if change == "tokenizer_eos":
        other.eos_token = "<|user|>"
    elif change == "pad":
        other.pad_token = "<unk>"
    else:
        other.chat_template = other.chat_template.replace("<|assistant|>{% endif %}", "<|assistant|>\n{% endif %}")
    return other


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory) -> Path:
    """A tiny teacher saved as an ordinary Hugging Face folder (what vLLM would load)."""
    folder = tmp_path_factory.mktemp("teacher") / "tiny"
    save_model(make_model(), tiny_tokenizer(), folder)
    return folder


@pytest.mark.parametrize("change", ["generation_eos", "tokenizer_eos", "pad", "chat_template", "system_prompt",
                                    "backend", "vllm_args", "batch_size", "chunk_size"])
def test_cache_key_covers_everything_that_changes_answers(tok, saved_teacher, change):
    """The same formatted inputs: only the setting under test differs. Batch and chunk sizes change no answer."""
    model, inputs = make_model(), [response_prompt(tok, it.prompt) for it in ITEMS]
    cfg = cfg_for(backend="vllm") if change == "vllm_args" else cfg_for()
    base, _, _ = cache_key(model, tok, inputs, cfg, str(saved_teacher))
    other_tok, other_cfg = tok, cfg
    if change == "generation_eos":
        model.generation_config.eos_token_id = [tok.eos_token_id, 200]
    elif change in ("tokenizer_eos", "pad", "chat_template"):
        other_tok = _variant_tokenizer(tok, change)
    elif change == "system_prompt":
        other_cfg = cfg_for(system_prompt="Answer in French.")
    elif change == "backend":
        other_cfg = cfg_for(backend="vllm")
    elif change == "vllm_args":
        other_cfg = cfg_for(backend="vllm", vllm_args={"gpu_memory_utilization": 0.5})
    else:
        other_cfg = cfg_for(**{change: 7})
    key, _, _ = cache_key(model, other_tok, inputs, other_cfg, str(saved_teacher))
    assert (key == base) == (change in ("batch_size", "chunk_size")), change


def test_vllm_args_do_not_key_the_transformers_backend(model, tok):
    inputs = [response_prompt(tok, it.prompt) for it in ITEMS]
    assert cache_key(model, tok, inputs, cfg_for())[0] == cache_key(
        model, tok, inputs, cfg_for(vllm_args={"gpu_memory_utilization": 0.5}))[0]


# ---------------------------------------------------------------------------------------------------------------
# Prompt sources
# ---------------------------------------------------------------------------------------------------------------

def test_task_prompts_come_from_training_split():
    cfg = SGRConfig(tasks=["successor", "chain_sum"], n_per_task=5, eval_n=50)
    items = load_prompts(cfg)
    assert [it.task for it in items] == ["successor"] * 5 + ["chain_sum"] * 5
    for name in ("successor", "chain_sum"):
        task = get_task(name)
        train = task.problems("train", 5, 0)
        assert [it.prompt for it in items if it.task == name] == [task.chat_message(p) for p in train]
        assert [it.reference for it in items if it.task == name] == [p.answer for p in train]
        eval_questions = {p.question for p in task.problems("eval", 50, 0)}
        assert not eval_questions & {p.question for p in train}


def test_task_overlap_with_evaluation_is_refused(monkeypatch):
    class Leaky(Task):
        def in_split(self, question: str, split: str) -> bool:
            return True

    base = get_task("successor")
    leaky = Leaky("leaky", "number", base.generate, base.distractors, base.instruction)
    monkeypatch.setitem(TASKS, "leaky", leaky)
    with pytest.raises(UsageError, match="leaky.*evaluation split"):
        load_prompts(SGRConfig(tasks=["leaky"], n_per_task=20, eval_n=200))


def test_unknown_task_is_usage_error():
    with pytest.raises(UsageError, match="nope"):
        load_prompts(SGRConfig(tasks=["nope"]))


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "", "output": "x"},
        {"instruction": "Count to 3", "output": "1 2 3"}, {"instruction": "Say hi", "output": "hello"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_file_prompts(tmp_path, suffix):
    path = write_rows(tmp_path / f"p{suffix}", ROWS)
    items = load_prompts(SGRConfig(source="file", path=str(path), prompt_field="instruction"))
    assert [it.prompt for it in items] == ["Say hi", "Count to 3"], "empty prompts and duplicates dropped"
    items = load_prompts(SGRConfig(source="file", path=str(path), prompt_field="instruction",
                                   response_field="output", responses="dataset"))
    assert [(it.prompt, it.reference) for it in items] == [("Say hi", "hi"), ("Count to 3", "1 2 3")]


def test_file_max_prompts_is_a_seeded_subset(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(20)])
    a = load_prompts(SGRConfig(source="file", path=str(path), max_prompts=5, seed=1))
    assert len(a) == 5 and a == load_prompts(SGRConfig(source="file", path=str(path), max_prompts=5, seed=1))
    assert a != load_prompts(SGRConfig(source="file", path=str(path), max_prompts=5, seed=2))


@pytest.mark.parametrize("name, content, match", [
    ("missing.jsonl", None, "does not exist"),
    ("p.txt", "Say hi\n", "unsupported type"),
    ("p.jsonl", '{"question": "a"}\n', "no field 'instruction'"),
    ("p.jsonl", '{"instruction": ""}\n{"instruction": "  "}\n', "no non-empty prompts"),
    ("p.jsonl", '{"instruction": "a"}\n{broken\n', "line 2 is not valid JSON"),
    ("p.jsonl", "", "no rows"),
    ("p.jsonl", '{"instruction": ["a"]}\n', "list, not text"),
    ("p.json", '{"instruction": "a"}', "list of objects"),
    ("p.csv", "question\nwhat\n", "no field 'instruction'"),
])
def test_file_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=match) as err:
        load_prompts(SGRConfig(source="file", path=str(path), prompt_field="instruction"))
    assert "\n" not in str(err.value)


def test_hf_source_local_folder_and_offline_failure(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = tmp_path / "ds"
    folder.mkdir()
    write_rows(folder / "train.jsonl", [{"q": "one"}, {"q": "two"}])
    items = load_prompts(SGRConfig(source="hf", path=str(folder), prompt_field="q"))
    assert [it.prompt for it in items] == ["one", "two"]
    with pytest.raises(UsageError, match="could not load Hugging Face dataset 'nobody/no-such-set'") as err:
        load_prompts(SGRConfig(source="hf", path="nobody/no-such-set"))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="split 'test'"):
        load_prompts(SGRConfig(source="hf", path=str(folder), prompt_field="q", hf_split="test"))


@pytest.mark.parametrize("kw, match", [
    ({"source": "web"}, "source"), ({"responses": "gold"}, "responses"), ({"backend": "tgi"}, "backend"),
    ({"teacher": "oracle"}, "teacher"), ({"n_per_task": 0}, "n_per_task"), ({"source": "file"}, "path"),
    ({"source": "file", "path": "p.jsonl", "responses": "sgr_filtered"}, "sgr_filtered"),
    ({"source": "file", "path": "p.jsonl", "responses": "dataset"}, "response_field"),
    ({"max_prompts": 0}, "max_prompts"), ({"batch_size": 0}, "batch_size"),
])
def test_config_errors(kw, match):
    with pytest.raises(UsageError, match=match):
        SGRConfig(**kw)


# ---------------------------------------------------------------------------------------------------------------
# Response modes
# ---------------------------------------------------------------------------------------------------------------

def test_dataset_answers_need_no_model(tmp_path):
    pairs = build_pairs(None, None, SGRConfig(tasks=["successor"], n_per_task=4, eval_n=20, responses="dataset"))
    task = get_task("successor")
    train = task.problems("train", 4, 0)
    assert pairs == [{"prompt": task.chat_message(p), "response": p.answer, "task": "successor"} for p in train]
    path = write_rows(tmp_path / "p.csv", ROWS)
    pairs = build_pairs(None, None, SGRConfig(source="file", path=str(path), prompt_field="instruction",
                                              response_field="output", responses="dataset"))
    assert pairs == [{"prompt": "Say hi", "response": "hi", "task": "file"},
                     {"prompt": "Count to 3", "response": "1 2 3", "task": "file"}]
    with pytest.raises(UsageError, match="teacher model"):
        build_pairs(None, None, SGRConfig(tasks=["successor"], n_per_task=2, eval_n=20))


def test_accepts_uses_task_scorer():
    item = PromptItem("What number comes after 41? ...", "42", "successor")
    assert accepts(item, "The number after 41 is 42.")
    assert not accepts(item, "It is 41.")
    assert accepts(PromptItem("...", "fruit", "category"), "Fruit.")


def test_filtered_sgr_keeps_only_accepted_answers(model, tok, tmp_path):
    """The teacher's cached answers are replaced by known ones (half right); the filter keeps exactly those."""
    cfg = SGRConfig(tasks=["successor"], n_per_task=4, eval_n=20, decoding=GREEDY, cache_dir=str(tmp_path / "cache"))
    items = load_prompts(cfg)
    build_pairs(model, tok, cfg, items=items, progress=False)
    [path] = cache_files(tmp_path)
    lines = path.read_text().splitlines()
    chosen = {i: (f"It is {it.reference}." if i % 2 == 0 else "I do not know.") for i, it in enumerate(items)}
    records = [json.loads(line) for line in lines[1:]]
    path.write_text("\n".join([lines[0]] + [json.dumps({**r, "responses": [chosen[r["i"]]]}) for r in records]) + "\n")
    everything = build_pairs(model, tok, cfg, items=items, progress=False)
    assert [p["response"] for p in everything] == [chosen[i] for i in range(4)]
    filtered = build_pairs(model, tok, SGRConfig(**{**cfg.__dict__, "responses": "sgr_filtered"}), items=items,
                           progress=False)
    assert filtered == [{"prompt": items[i].prompt, "response": chosen[i], "task": "successor"} for i in (0, 2)]


def test_filtered_sgr_with_nothing_accepted_is_usage_error(model, tok):
    cfg = SGRConfig(tasks=["successor"], n_per_task=3, eval_n=20, decoding=GREEDY, responses="sgr_filtered")
    with pytest.raises(UsageError, match="kept none"):
        build_pairs(model, tok, cfg, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Backends and DDP
# ---------------------------------------------------------------------------------------------------------------

def test_vllm_backend_requires_vllm(tok, saved_teacher, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails as on a machine without vLLM
    with pytest.raises(UsageError, match="needs the vllm package") as err:
        build_pairs(None, tok, cfg_for(tmp_path, backend="vllm"), items=ITEMS[:1], model_id=str(saved_teacher),
                    progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="saved on disk or a hub id"):
        build_pairs(None, tok, cfg_for(backend="vllm"), items=ITEMS[:1], model_id="tiny:qwen2", progress=False)


def test_vllm_teacher_fully_cached_needs_no_model_and_no_vllm(tok, saved_teacher, monkeypatch, tmp_path):
    """The vLLM path keys the cache on the files vLLM would load; a complete cache answers without vLLM or weights."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    cfg = cfg_for(tmp_path, backend="vllm")
    inputs = [response_prompt(tok, it.prompt) for it in ITEMS]
    fp, stop_ids, teacher = cache_key(None, tok, inputs, cfg, str(saved_teacher))
    assert teacher.source == str(saved_teacher) and teacher.revision is None
    assert stop_ids == {tok.eos_token_id, tok.pad_token_id}, "the saved generation_config's EOS and the tokenizer's"
    cache = ResponseCache(tmp_path / "cache" / f"{fp}.jsonl", {"fingerprint": fp})
    cache.load([it.prompt for it in ITEMS])
    cache.append([(i, it.prompt, [f"answer {i}"]) for i, it in enumerate(ITEMS)])
    pairs = build_pairs(None, tok, cfg, items=ITEMS, model_id=str(saved_teacher), progress=False)
    assert [p["response"] for p in pairs] == [f"answer {i}" for i in range(len(ITEMS))]


def test_disk_teacher_identity_follows_the_files_vllm_loads(saved_teacher, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved_teacher, folder)
    base = disk_teacher(str(folder))
    (folder / "metrics.json").write_text("{}")  # gradual's bookkeeping next to a saved stage: not read by vLLM
    assert disk_teacher(str(folder)).identity == base.identity
    original = (folder / "generation_config.json").read_text()
    (folder / "generation_config.json").write_text(json.dumps({**json.loads(original), "eos_token_id": [2, 200]}))
    changed = disk_teacher(str(folder))
    assert changed.identity != base.identity and changed.generation_config.eos_token_id == [2, 200]
    (folder / "generation_config.json").write_text(original)
    assert disk_teacher(str(folder)).identity == base.identity
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert disk_teacher(str(folder)).identity != base.identity


def test_disk_teacher_pins_a_hub_id_to_its_cached_commit(monkeypatch, tmp_path, saved_teacher):
    """A hub id is resolved (offline: from the local cache) to one commit, which keys the cache and is what vLLM is
    told to load; vllm_args cannot point the engine elsewhere."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    repo = hub / "models--someone--tiny-chat"
    identities = []
    for commit in ("a" * 40, "b" * 40):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name in ("config.json", "generation_config.json"):
            shutil.copy(saved_teacher / name, snapshot / name)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        teacher = disk_teacher("someone/tiny-chat")
        assert (teacher.source, teacher.revision) == ("someone/tiny-chat", commit)
        identities.append(teacher.identity)
        engine = vllm_engine_kwargs(teacher, {"model": "elsewhere", "gpu_memory_utilization": 0.5}, seed=3)
        assert engine == dict(seed=3, model="someone/tiny-chat", revision=commit, tokenizer="someone/tiny-chat",
                              tokenizer_revision=commit, gpu_memory_utilization=0.5)
    assert identities[0] != identities[1]
    with pytest.raises(UsageError, match="cannot resolve model 'someone/absent'") as err:
        disk_teacher("someone/absent")
    assert "\n" not in str(err.value)


def test_vllm_sampling_kwargs():
    assert vllm_sampling_kwargs(DecodingConfig(num_samples=2)) == dict(n=2, max_tokens=256, stop=None,
                                                                        temperature=0.9, top_p=0.95)
    assert vllm_sampling_kwargs(DecodingConfig(do_sample=False, max_new_tokens=5, stop=["\n"]), {7, 2}) == dict(
        n=1, max_tokens=5, stop=["\n"], temperature=0.0, top_p=1.0, stop_token_ids=[2, 7])


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_and_merge_round_trip(n, world):
    items = list(range(n))
    shards = [split_for_rank(items, r, world) for r in range(world)]
    assert sorted(x for s in shards for x in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert merge_shards(shards) == items


def test_merge_shards_rejects_uneven_shards():
    with pytest.raises(ValueError, match="shard 0"):
        merge_shards([[0, 2, 4, 6], [1]])


def _ddp_worker(rank: int, world: int, init_file: str, cache_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gathered = gather_in_order(split_for_rank(list(range(7)), rank, world))
        cfg = cfg_for(decoding=GREEDY, batch_size=2, chunk_size=4, cache_dir=cache_dir)
        pairs = build_pairs(make_model(), tiny_tokenizer(), cfg, items=ITEMS, progress=False)
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"gathered": gathered, "pairs": pairs}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_shard_and_gather(base, tmp_path, monkeypatch):
    """Two gloo ranks each answer half the prompts; both get the full list in order, equal to one process."""
    reference = base[1]
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "cache"), str(tmp_path / "out")),
             nprocs=2, join=True)
    results = [json.loads((tmp_path / "out" / f"{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert res["gathered"] == list(range(7))
        assert res["pairs"] == reference
    [path] = cache_files(tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert sorted(r["i"] for r in records) == list(range(len(ITEMS))), "rank 0 wrote each record once"
