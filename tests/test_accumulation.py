"""One optimizer step's loss is the mean over all of its target tokens, however the step is split into micro-batches
(`accumulate_grad_batches`) and DDP ranks: the same 4 examples give one gradient as 4 × 1, 2 × 2 and 2 ranks × 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_fit import fit_in_process, write_config

from gradual.distill import Recovery, RecoveryObjective, Teacher
from gradual.models import load_model
from gradual.sampler import StageSampler
from gradual.tiny import tiny_model, tiny_tokenizer
from gradual.training_examples import TokenizedPairs, pad_collator, tokenize_text

TESTS = Path(__file__).resolve().parent
LOSSES = {"sft": {"loss": "sft"}, "kd": {"loss": "kd"}, "kd+sft": {"loss": "kd+sft", "sft_weight": 0.5},
          "kd+hidden": {"loss": "kd", "hidden_weight": 0.5}}
# two long texts and two short ones: length grouping puts the long pair in one micro-batch, the short in the other
TEXTS = ["The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill, "
         "counting one two three four five six seven eight nine ten eleven twelve.",
         "A long sentence about numbers: 12 + 30 = 42, then 42 + 8 = 50, and 50 - 7 = 43; lists [1, 2, 3] and "
         "brackets (([]{})) close in order.", "Hi there.", "Ok, bye."]


def _config(tmp_path: Path, name: str, loss: str, batch_size: int, accumulate: int, **changes: Any) -> Path:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    probe = {"class_path": "rank_probe.FirstStepGradients", "init_args": {"out_dir": str(tmp_path / name)}}
    config, _ = write_config(
        tmp_path, name, model__schedule__max_layers=1, model__schedule__steps_per_stage=1,
        model__recovery=LOSSES[loss], data__batch_size=batch_size, data__sources=[{"kind": "text", "path": str(texts)}],
        trainer__accumulate_grad_batches=accumulate, trainer__gradient_clip_val=None,
        trainer__callbacks=[probe, {"class_path": "gradual.callbacks.StageCheckpoint"}], **changes)
    return config


def _gradients(out: Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], list[int]]:
    return (load_file(str(out / f"grads_rank{rank}.safetensors")),
            json.loads((out / f"targets_rank{rank}.json").read_text()))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every gradient equal to within 1e-5 of its norm (LoRA's A gradients are exactly 0 while B is 0)."""
    assert a.keys() == b.keys() and a
    assert any(g.abs().sum() > 0 for g in a.values())
    for name, g in a.items():
        assert float((b[name] - g).norm()) <= 1e-5 * float(g.norm()), name


@pytest.mark.parametrize("loss", list(LOSSES))
def test_two_micro_batches_give_the_gradient_of_one_batch_of_four(tmp_path: Path, loss: str) -> None:
    fit_in_process(_config(tmp_path, "one", loss, batch_size=4, accumulate=1))
    fit_in_process(_config(tmp_path, "two", loss, batch_size=2, accumulate=2))
    one, one_targets = _gradients(tmp_path / "one")
    two, two_targets = _gradients(tmp_path / "two")
    assert sum(two_targets) == one_targets[0] and max(two_targets) > 3 * min(two_targets)  # an uneven split
    _assert_same(one, two)


@pytest.mark.slow  # two DDP processes per loss; CI runs it (make test-slow)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_two_ddp_ranks_give_the_gradient_of_one_batch_of_four(tmp_path: Path, loss: str) -> None:
    fit_in_process(_config(tmp_path, "one", loss, batch_size=4, accumulate=1))
    config = _config(tmp_path, "ddp", loss, batch_size=2, accumulate=1, trainer__strategy="ddp", trainer__devices=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "gradual", "fit", "--config", str(config)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    (tmp_path / "ddp.stderr").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, one_targets = _gradients(tmp_path / "one")
    (rank0, targets0), (rank1, targets1) = _gradients(tmp_path / "ddp", 0), _gradients(tmp_path / "ddp", 1)
    assert targets0[0] + targets1[0] == one_targets[0] and max(targets0[0], targets1[0]) > 3 * min(targets0[0],
                                                                                                  targets1[0])
    _assert_same(rank0, rank1)
    _assert_same(one, rank0)


def test_step_normalisers_count_every_micro_batch_and_rank() -> None:
    lengths = [40, 3, 25, 7, 12, 9, 30, 5]
    targets = [n - 1 for n in lengths]
    for world, accumulate in [(1, 1), (1, 2), (2, 2), (2, 1)]:
        per_rank = [StageSampler(lengths, samples_per_epoch=8, batch_size=2, rank=r, world_size=world,
                                 targets=targets, accumulate=accumulate) for r in range(world)]
        batches = [s.batches(0) for s in per_rank]
        norms = [s.normalizers(0) for s in per_rank]
        for step in range(len(batches[0]) // accumulate):
            idx = range(step * accumulate, (step + 1) * accumulate)
            members = [i for r in range(world) for j in idx for i in batches[r][j]]
            expected = (sum(targets[i] for i in members) / (accumulate * world),
                        sum(lengths[i] for i in members) / (accumulate * world))
            assert all(norms[r][j] == pytest.approx(expected) for r in range(world) for j in idx)
        items = list(per_rank[0])
        assert items == [i for b in batches[0] for i in b]  # still the plain indices
        assert [(item.targets, item.tokens) for item in items[::2]] == norms[0]


def test_micro_batch_losses_sum_to_the_step_loss_without_a_trainer() -> None:
    """The objective alone: two micro-batches of one step, each divided by the accumulation count as Lightning does,
    give the full batch's loss and gradient for every loss, including the hidden-state term."""
    tok = tiny_tokenizer()
    examples = [tokenize_text(tok, t) for t in TEXTS]
    dataset, collate = TokenizedPairs(examples), pad_collator(tok)
    teacher = Teacher(tiny_model("llama", 4, seed=3))
    for settings in LOSSES.values():
        objective = RecoveryObjective(Recovery(**settings), teacher)
        grads = []
        for batch_size, accumulate in [(4, 1), (2, 2)]:
            student = load_model("tiny:llama:4")
            sampler = StageSampler(dataset.lengths, 4, batch_size, rank=0, world_size=1, targets=dataset.targets,
                                   accumulate=accumulate)
            items = list(sampler)
            for lo in range(0, 4, batch_size):
                batch = collate([dataset[i] for i in items[lo:lo + batch_size]])
                loss, _ = objective(student, batch, [0, 1, 2, 3])
                (loss / accumulate).backward()
            grads.append({n: p.grad for n, p in student.named_parameters() if p.grad is not None})
        _assert_same(*grads)
