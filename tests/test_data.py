"""Recovery data: response-only labels, truncation, padding, length grouping, fixed-size resumable stages."""

import sys
from collections import Counter

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import batches_per_epoch, pairs_of, set_pairs

from gradual import models
from gradual.datamodule import GradualDataModule, RecoveryDataModule
from gradual.errors import UsageError
from gradual.generation import DecodingConfig, format_prompt
from gradual.lora import LoraSettings, attach_lora
from gradual.models import save_model
from gradual.sampler import StageSampler
from gradual.sgr import SGRConfig
from gradual.tiny import tiny_model, tiny_tokenizer
from gradual.training_examples import IGNORE_INDEX, load_pairs, pad_collator, tokenize_pair


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _prompt_ids(tok, prompt, system="You are a helpful assistant.", chat=True):
    return tok(format_prompt(tok, prompt, system, chat), add_special_tokens=False)["input_ids"]


def test_labels_mask_the_prompt_and_keep_the_response(tok):
    ex = tokenize_pair(tok, "What is 2+2?", "It is 4.")
    p = _prompt_ids(tok, "What is 2+2?")
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids[: len(p)] == p
    assert labels[: len(p)] == [IGNORE_INDEX] * len(p)
    assert labels[len(p):] == ids[len(p):]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[len(p):-1]) == "It is 4."
    assert "<|system|>You are a helpful assistant." in tok.decode(ids)


def test_system_prompt_is_configurable(tok):
    terse = tok.decode(tokenize_pair(tok, "hi", "hello", system="Be terse.")["input_ids"])
    assert "<|system|>Be terse." in terse
    assert "<|system|>" not in tok.decode(tokenize_pair(tok, "hi", "hello", system=None)["input_ids"])


def test_plain_prompt_newline_response_without_template(tok):
    ex = tokenize_pair(tok, "Say hi", "hi", chat=False)
    assert tok.decode(ex["input_ids"]) == "<s>Say hi\nhi</s>", "the tiny tokenizer adds BOS, as Llama's does"
    n_prompt = len(tok("Say hi\n")["input_ids"])
    assert ex["labels"] == [IGNORE_INDEX] * n_prompt + ex["input_ids"][n_prompt:]


def test_truncation_cuts_the_response_end_and_drops_overlong_prompts(tok):
    p = _prompt_ids(tok, "Count:")
    full = tokenize_pair(tok, "Count:", "one two three")
    cut = tokenize_pair(tok, "Count:", "one two three", max_length=len(p) + 3)
    assert cut["input_ids"] == full["input_ids"][: len(p) + 3]
    assert cut["labels"] == full["labels"][: len(p) + 3]
    assert tokenize_pair(tok, "Count:", "one", max_length=len(p)) is None

    dm = RecoveryDataModule([{"prompt": "Count:", "response": "one"}, {"prompt": "x" * 200, "response": "y"}],
                            tokenizer=tok, samples_per_epoch=2, batch_size=1, max_length=len(p) + 3)
    assert len(dm.dataset) == 1 and dm.num_dropped == 1
    dm = RecoveryDataModule([{"prompt": "x" * 200, "response": "y"}], tokenizer=tok, samples_per_epoch=2,
                            batch_size=1, max_length=20)
    with pytest.raises(UsageError, match="max_length=20"):
        dm.train_dataloader()


COLLATE_BATCH = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                 {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                 {"input_ids": [4, 4], "labels": [-100, 4]}]


def test_collate_pads_to_the_longest_in_the_batch(tok):
    assert tok.pad_token_id == 0
    out = pad_collator(tok)(COLLATE_BATCH)
    assert out["input_ids"].shape == (3, 5)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 6, 7, 8, 9], [4, 4, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 7, 8, 9], [-100, 4, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert {v.dtype for v in out.values()} == {torch.long}


def test_collate_pads_right_whatever_the_tokenizer_says_and_falls_back_to_eos():
    """Generation pads on the left; training batches always pad on the right, without changing the tokenizer."""
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    out = pad_collator(tok)(COLLATE_BATCH)
    assert tok.padding_side == "left"
    assert out["input_ids"][2].tolist() == [4, 4, 0, 0, 0] and out["labels"][2].tolist() == [-100, 4, -100, -100, -100]
    tok.pad_token = None
    out = pad_collator(tok)(COLLATE_BATCH)
    assert tok.pad_token_id is None
    assert out["input_ids"][2].tolist() == [4, 4] + [tok.eos_token_id] * 3


def test_batches_group_similar_lengths_in_shuffled_order():
    lengths = np.random.default_rng(0).integers(1, 500, size=64).tolist()
    # one mega-batch spans the whole epoch, so batches are consecutive runs of the length-sorted epoch
    sampler = StageSampler(lengths, samples_per_epoch=64, batch_size=4, mega_batch_mult=16, rank=0, world_size=1)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(64))
    spans = sorted(([lengths[i] for i in b] for b in batches), key=max, reverse=True)
    assert all(min(hi) >= max(lo) for hi, lo in zip(spans, spans[1:], strict=False))
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)
    # smaller mega-batches sort only within themselves: the first 16 samples of the epoch stay together
    small = StageSampler(lengths, samples_per_epoch=64, batch_size=4, mega_batch_mult=4, rank=0, world_size=1)
    first_mega = set(small.epoch_order(0)[:16].tolist())
    assert sum(set(b) <= first_mega for b in small.batches(0)) == 4


def test_epoch_has_fixed_length_and_continues_where_the_last_stopped():
    sampler = StageSampler([3] * 10, samples_per_epoch=5, batch_size=1, rank=0, world_size=1)
    epochs = []
    for e in range(4):
        sampler.set_epoch(e)
        epochs.append(list(sampler))
    assert [len(e) for e in epochs] == [5, 5, 5, 5] and len(sampler) == 5
    first_pass, second_pass = epochs[0] + epochs[1], epochs[2] + epochs[3]
    assert sorted(first_pass) == list(range(10)) and sorted(second_pass) == list(range(10))
    assert first_pass != second_pass  # a new shuffle per pass

    big = StageSampler(list(range(1, 101)), samples_per_epoch=8, batch_size=4, rank=0, world_size=1)
    assert len(list(big)) == 8  # epoch length does not depend on dataset size
    assert Counter(i for e in range(25) for i in big.epoch_order(e)) == Counter({i: 2 for i in range(100)})


def test_sampler_is_resumable_from_seed_and_epoch():
    lengths = list(np.random.default_rng(1).integers(1, 50, size=30))
    first = StageSampler(lengths, samples_per_epoch=12, batch_size=3, seed=7, rank=0, world_size=1)
    seen = {}
    for e in range(4):
        first.set_epoch(e)
        seen[e] = list(first)
    resumed = StageSampler(lengths, samples_per_epoch=12, batch_size=3, seed=7, rank=0, world_size=1)
    resumed.set_epoch(2)
    assert list(resumed) == seen[2]
    assert seen[2] != seen[3]
    other_seed = StageSampler(lengths, samples_per_epoch=12, batch_size=3, seed=8, rank=0, world_size=1)
    other_seed.set_epoch(2)
    assert list(other_seed) != seen[2]


def test_ranks_split_each_stage_without_overlap():
    lengths = list(np.random.default_rng(2).integers(1, 50, size=40))
    single = StageSampler(lengths, samples_per_epoch=16, batch_size=2, seed=3, rank=0, world_size=1)
    ranks = [StageSampler(lengths, samples_per_epoch=16, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for e in (0, 1):
        per_rank = [s.batches(e) for s in ranks]
        assert [len(b) for b in per_rank] == [4, 4] and all(len(b) == 2 for b in per_rank[0] + per_rank[1])
        union = Counter(i for batches in per_rank for b in batches for i in b)
        assert union == Counter(single.epoch_order(e).tolist())
    with pytest.raises(UsageError, match="samples_per_epoch=6"):
        StageSampler(lengths, samples_per_epoch=6, batch_size=2, rank=0, world_size=2)


def test_pairs_from_jsonl_list_or_set_later(tmp_path, tok):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "source": "x"}\n\n{"prompt": "c", "response": "d"}\n')
    dm = RecoveryDataModule(str(path), tokenizer=tok, samples_per_epoch=4, batch_size=2)
    assert len(dm.dataset) == 2
    set_pairs(dm, [{"prompt": "only", "response": "one"}])
    assert len(dm.dataset) == 1
    assert load_pairs(path) == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(UsageError, match="pairs.jsonl line 2"):
        load_pairs(path)
    path.write_text("not json\n")
    with pytest.raises(UsageError, match="pairs.jsonl line 1 is not valid JSON"):
        load_pairs(path)
    with pytest.raises(UsageError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="samples_per_epoch=5"):
        RecoveryDataModule(samples_per_epoch=5, batch_size=2)
    with pytest.raises(UsageError, match="no recovery pairs"):
        RecoveryDataModule(tokenizer=tok).train_dataloader()


class _Recorder(pl.LightningModule):
    """Minimal module: LoRA on a tiny model; records every batch it trains on, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.model = attach_lora(tiny_model("llama", num_layers=2), LoraSettings(r=4))
        self.seen: dict[int, list[torch.Tensor]] = {}

    def on_train_epoch_start(self) -> None:
        self.model.train()  # Lightning keeps submodules in the mode it finds them; tiny_model comes in eval mode

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch["input_ids"].clone())
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=2e-4)


def test_lightning_trains_one_fixed_stage_per_epoch(tok):
    pairs = [{"prompt": f"question {i}", "response": "answer " * (i % 5 + 1)} for i in range(6)]
    dm = RecoveryDataModule(pairs, tokenizer=tok, samples_per_epoch=8, batch_size=2, seed=5)
    module = _Recorder()
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=2, use_distributed_sampler=False, accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert batches_per_epoch(dm) == 4
    assert trainer.global_step == 2 * 4 // 2
    collate, sampler = pad_collator(tok), dm.stage_sampler()
    for epoch in (0, 1):  # Lightning called set_epoch: each epoch trained the sampler's batches for that epoch
        expected = [collate([dm.dataset[i] for i in b])["input_ids"] for b in sampler.batches(epoch)]
        assert len(module.seen[epoch]) == 4
        assert all(torch.equal(a, b) for a, b in zip(module.seen[epoch], expected, strict=True))


def _counting_loads(monkeypatch) -> list[str]:
    """Names passed to the real `models.load_model` (wrapped, not replaced)."""
    loads: list[str] = []
    real = models.load_model

    def counting(name, *args, **kwargs):
        loads.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    return loads


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_vllm_teacher_loads_no_transformers_copy(backend, tmp_path, monkeypatch):
    """With backend vllm, vLLM loads the teacher itself: setup loads no HF model (without vLLM installed it stops at
    the missing package, in one line). The transformers backend, by contrast, loads the teacher once."""
    folder = tmp_path / "teacher"
    save_model(tiny_model("llama", num_layers=2), tiny_tokenizer(), folder)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails as on a machine without vLLM
    loads = _counting_loads(monkeypatch)
    sgr = SGRConfig(tasks=["successor"], n_per_task=3, eval_n=20, backend=backend, cache_dir=str(tmp_path / "cache"),
                    decoding=DecodingConfig(do_sample=False, max_new_tokens=4))
    dm = GradualDataModule(model=str(folder), sgr=sgr, dtype="float32", batch_size=2)
    if backend == "transformers":
        dm.setup("fit")
        assert loads == [str(folder)] and len(pairs_of(dm)) == 3
        return
    with pytest.raises(UsageError, match="needs the vllm package") as err:
        dm.setup("fit")
    assert "\n" not in str(err.value)
    assert loads == [], "an HF copy of the teacher was loaded next to vLLM's"


def test_stages_of_different_lengths_take_consecutive_slices_of_the_stream() -> None:
    """A run whose stages train 2, 2 and 6 batches sees stream positions 0-3, 4-7, 8-19 (batch 2): the examples of
    its first stages do not depend on how long a later (consolidation) stage is."""
    lengths = list(range(1, 41))
    uniform = StageSampler(lengths, samples_per_epoch=4, batch_size=2, seed=5, rank=0, world_size=1)
    mixed = StageSampler(lengths, samples_per_epoch=4, batch_size=2, seed=5, rank=0, world_size=1,
                         stage_samples=[4, 4, 12])
    assert [mixed.bounds(e) for e in range(4)] == [(0, 4), (4, 4), (8, 12), (20, 12)]
    for epoch in (0, 1):
        assert mixed.batches(epoch) == uniform.batches(epoch)
    stream = np.concatenate([uniform.epoch_order(e) for e in range(5)])
    assert sorted(mixed.epoch_order(2).tolist()) == sorted(stream[8:20].tolist())
    mixed.set_epoch(2)
    assert len(mixed) == 12 and len(list(mixed)) == 12
    with pytest.raises(UsageError, match="samples_per_epoch=5"):
        StageSampler(lengths, samples_per_epoch=4, batch_size=2, rank=0, world_size=1, stage_samples=[4, 5])
