"""The `self_text` recovery source: the original model's sampled continuations of built-in openings — what it
generates, the cache and its key, resume after an interruption, bad settings. Real tiny models; generation is counted
by wrapping the real batched generator the teacher answers through."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from gradual import models
from gradual.datamodule import GradualDataModule
from gradual.errors import UsageError
from gradual.generation import DecodingConfig, generate
from gradual.mixture import DataSource
from gradual.sgr import SGRConfig, self_text_items, self_texts
from gradual.sgr.texts import builtin_openings, opening_prompts
from gradual.tiny import tiny_tokenizer

TINY = "tiny:llama:6"
SOURCE = {"kind": "self_text", "n_texts": 6, "max_new_tokens": 8}


def sgr_config(tmp_path: Path, **changes: Any) -> SGRConfig:
    return SGRConfig(**{"tasks": ["successor"], "n_per_task": 2, "batch_size": 2,
                        "cache_dir": str(tmp_path / "cache"), **changes})


def data_module(tmp_path: Path, **source: Any) -> GradualDataModule:
    return GradualDataModule(model=TINY, sgr=sgr_config(tmp_path), batch_size=2,
                             sources=[DataSource(**{**SOURCE, **source})])


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("*.jsonl"))


class Interrupted(Exception):
    pass


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A spy on the batched generator the teacher answers through: prompts generated per call (`calls`); with
    `stop_after` set, the call raises after that many batches were handed back (and cached): an interruption."""
    import gradual.sgr.teacher as teacher

    spy: dict[str, Any] = {"calls": [], "stop_after": None}
    real = teacher.generate

    def counting(model: Any, tokenizer: Any, prompts: list[str], *args: Any, on_batch: Any = None,
                 **kwargs: Any) -> Any:
        spy["calls"].append(len(prompts))
        batches = 0

        def hook(idx: list[int], outs: list[list[str]]) -> None:
            nonlocal batches
            if on_batch is not None:
                on_batch(idx, outs)
            batches += 1
            if spy["stop_after"] is not None and batches >= spy["stop_after"]:
                raise Interrupted

        return real(model, tokenizer, prompts, *args, on_batch=hook, **kwargs)

    monkeypatch.setattr(teacher, "generate", counting)
    return spy


def test_openings_are_built_in_diverse_and_served_evenly_in_a_seeded_order() -> None:
    openings = builtin_openings()
    assert len(openings) >= 80 and len(set(openings)) == len(openings)
    assert any("\n" in o for o in openings), "code and letters keep their line breaks"
    n = 2 * len(openings) + 5
    drawn = opening_prompts(n, seed=3)
    assert sorted(Counter(drawn).values()) == [2] * (len(openings) - 5) + [3] * 5, "passes over every opening"
    assert opening_prompts(n, seed=3) == drawn and opening_prompts(n, seed=4) != drawn
    assert opening_prompts(7, seed=3) == drawn[:7]


def test_texts_are_the_openings_continued_by_the_original_model_and_a_second_build_reads_the_cache(
        tmp_path: Path, generations: dict[str, Any]) -> None:
    dm = data_module(tmp_path, temperature=0.8, top_p=0.9, seed=5)
    dm.setup("fit")
    texts = [e["text"] for e in dm.parts[0].examples]
    openings = opening_prompts(6, seed=5)
    decoding = DecodingConfig(do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=8, seed=5)
    tok, model = tiny_tokenizer(), models.load_model(TINY)
    continued = generate(model, tok, openings, decoding, progress=False, seed_ids=list(range(6)))
    expected = [o + c[0] for o, c in zip(openings, continued, strict=True) if c[0].strip()]
    assert expected and texts == expected, "each text: its opening, then the model's own sampled continuation"
    assert len({t[len(o):] for t, o in zip(texts, openings, strict=False)}) > 1
    assert sum(generations["calls"]) == 6 and len(cache_files(tmp_path)) == 1
    assert dm.recovery_tasks() == [] and dm.needs_teacher
    [row] = dm.describe()
    assert (row["kind"], row["texts"], row["examples"], row["max_new_tokens"]) == ("self_text", 6, len(texts), 8)
    dm.samples_per_epoch = 2
    assert all(e["labels"] == e["input_ids"] for e in dm.dataset.examples), "texts learn every token"

    again = data_module(tmp_path, temperature=0.8, top_p=0.9, seed=5)
    again.setup("fit")
    assert [e["text"] for e in again.parts[0].examples] == texts
    assert sum(generations["calls"]) == 6, "the second build reads the cache: nothing is generated"


def test_the_cache_key_follows_every_setting_and_the_weights(tmp_path: Path, generations: dict[str, Any]) -> None:
    cfg, tok, model = sgr_config(tmp_path), tiny_tokenizer(), models.load_model(TINY)

    def build(n: int = 4, seed: int = 0, **decoding: Any) -> tuple[int, int]:
        """(openings generated, cache files) after one build."""
        before = sum(generations["calls"])
        settings = {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 6, "seed": seed,
                    **decoding}
        self_texts(model, tok, cfg, self_text_items(n, seed), DecodingConfig(**settings), model_id=TINY,
                   progress=False)
        return sum(generations["calls"]) - before, len(cache_files(tmp_path))

    assert build() == (4, 1)
    assert build() == (0, 1), "same weights, openings and decoding: read from the cache"
    assert build(n=3) == (3, 2), "another number of texts"
    assert build(seed=1) == (4, 3), "another seed: other openings' order and other draws"
    assert build(max_new_tokens=3) == (4, 4)
    assert build(temperature=0.7) == (4, 5)
    assert build(top_p=0.5) == (4, 6)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert build() == (4, 7), "other weights: written afresh"


def test_an_interrupted_generation_resumes_where_it_stopped_and_draws_the_same_texts(
        tmp_path: Path, generations: dict[str, Any]) -> None:
    whole = data_module(tmp_path / "whole")
    whole.setup("fit")
    generations["calls"].clear()

    generations["stop_after"] = 1
    with pytest.raises(Interrupted):
        data_module(tmp_path / "cut").setup("fit")
    assert generations["calls"] == [6]
    generations["stop_after"] = None
    resumed = data_module(tmp_path / "cut")
    resumed.setup("fit")
    assert generations["calls"] == [6, 4], "the first batch of 2 was cached before the interruption"
    assert resumed.parts[0].examples == whole.parts[0].examples


@pytest.mark.parametrize(("source", "needle"), [
    ({"n_texts": 0}, "data source self_text n_texts=0 is invalid; it must be >= 1"),
    ({"max_new_tokens": 0}, "data source self_text max_new_tokens=0 is invalid; it must be >= 1"),
    ({"temperature": 0.0}, "data source self_text temperature=0.0 is invalid; it must be finite and > 0"),
    ({"temperature": float("nan")}, "temperature=nan is invalid"),
    ({"top_p": 1.5}, "data source self_text top_p=1.5 is invalid; it must be in (0, 1]"),
    ({"kind": "text", "n_texts": 5}, "data source text has n_texts=5, but only kind self_text takes it"),
    ({"kind": "sgr", "temperature": 0.5}, "data source sgr has temperature=0.5, but only kind self_text takes it"),
    ({"kind": "self_txt"}, "kind='self_txt' is unknown; allowed: sgr, tasks, text, sdft, self_text"),
])
def test_bad_settings_end_in_one_line(source: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError) as refused:
        DataSource(**{"kind": "self_text", **source})
    assert needle in str(refused.value) and "\n" not in str(refused.value)
