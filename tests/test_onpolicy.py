"""On-policy distillation (`model.recovery.on_policy`, GKD arXiv 2306.13649): the loss against a direct computation,
the student's rollout (prompts, generated tokens, labels, seeds, end token), which batches are on-policy, bad
settings, and a `gradual fit` whose on-policy batches are those the seed says, refused when resumed with another
share. Real tiny models, real Lightning."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fit import write_config

from gradual.cli import main
from gradual.distill import IGNORE_INDEX, Recovery, Teacher
from gradual.errors import UsageError
from gradual.generation import generate_ids
from gradual.lightning_cli import GradualCLI, check_strategy
from gradual.onpolicy import TEXT_PROMPT_TOKENS, OnPolicy, is_on_policy, prompts_of, rollout_batch, row_seed
from gradual.tiny import tiny_model, tiny_tokenizer
from gradual.training_examples import pad_collator, tokenize_pair, tokenize_text


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def student_and_teacher() -> tuple[torch.nn.Module, Teacher]:
    """A 2-layer student and a 3-layer teacher of the same vocabulary, different random weights."""
    return tiny_model("llama", 2, seed=1).train(), Teacher(tiny_model("llama", 3, seed=2))


def mixed_batch(tok: Any) -> dict[str, torch.Tensor]:
    """A pair (its prompt masked) and a text (every token a label), right-padded as training batches are."""
    return pad_collator(tok)([tokenize_pair(tok, "What is 2+2?", "4, as two and two make four."),
                              tokenize_text(tok, "The quick brown fox jumps over the lazy dog, again and again.")])


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_on_policy_loss_equals_a_direct_computation(tau: float) -> None:
    """Fixed prompts and generated tokens: the module's loss is Σ_v p_t (log p_t − log p_s) at every position that
    predicts a generated token, times τ², averaged over the generated tokens; padding and prompts add nothing."""
    student, teacher = student_and_teacher()
    prompts = [[1, 40, 41, 42, 43], [1, 50, 51], [1, 60, 61, 62]]
    generated = [[70, 71, 72], [80, 81, 82, 83, 84, 85], [2]]
    batch = rollout_batch(prompts, generated, pad_id=0, device="cpu")
    loss, value = OnPolicy(Recovery(on_policy=1.0, temperature=tau, chunk_size=4), seed=0).loss(
        student, teacher, batch)

    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        t_logits = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    terms = []
    for r, (p, g) in enumerate(zip(prompts, generated, strict=True)):
        for j in range(len(g)):  # position len(p) - 1 + j predicts generated token j
            t = len(p) - 1 + j
            log_s = F.log_softmax(s_logits[r, t] / tau, dim=-1)
            log_t = F.log_softmax(t_logits[r, t] / tau, dim=-1)
            terms.append((log_t.exp() * (log_t - log_s)).sum() * tau ** 2)
    direct = torch.stack(terms).mean()
    assert len(terms) == 10
    assert abs(float(loss.detach()) - float(direct)) < 1e-6 and abs(value - float(direct)) < 1e-6
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.model.parameters()), "the teacher is frozen"


# ---------------------------------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------------------------------

def test_prompts_are_a_pairs_prompt_part_and_a_texts_first_tokens(tok: Any) -> None:
    batch = mixed_batch(tok)
    pair, text = prompts_of(batch)
    labels = batch["labels"][0].tolist()
    first = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
    assert pair == batch["input_ids"][0, :first].tolist(), "the chat-formatted prompt, up to the response"
    n = int(batch["attention_mask"][1].sum())
    assert text == batch["input_ids"][1, :min(TEXT_PROMPT_TOKENS, n // 2)].tolist()
    short = pad_collator(tok)([tokenize_text(tok, "ab")])
    assert prompts_of(short) == [short["input_ids"][0, :1].tolist()], "at least one token"


def test_rollout_continues_every_prompt_with_seeded_student_samples_labelled_alone(tok: Any) -> None:
    student, _ = student_and_teacher()
    batch = mixed_batch(tok)
    on_policy = OnPolicy(Recovery(on_policy=0.5, on_policy_tokens=12), seed=7)
    rollout = on_policy.rollout(student, tok, batch, stage=2, batch_idx=3)
    assert student.training, "the student's mode is restored after generating in eval mode"
    prompts = prompts_of(batch)
    seeds = [row_seed(7, 2, 3, 0, r) for r in range(2)]
    generated = generate_ids(student, tok, prompts, on_policy.decoding, seeds, keep_end=True)
    assert [generate_ids(student, tok, [p], on_policy.decoding, [s], keep_end=True)[0]
            for p, s in zip(prompts, seeds, strict=True)] == generated, "draws do not depend on the batch"
    for r, (p, g) in enumerate(zip(prompts, generated, strict=True)):
        n = int(rollout["attention_mask"][r].sum())
        assert 1 <= len(g) <= 12 and n == len(p) + len(g)
        assert rollout["input_ids"][r, :n].tolist() == p + g
        assert rollout["labels"][r].tolist() == [IGNORE_INDEX] * len(p) + g + [IGNORE_INDEX] * (
            rollout["labels"].shape[1] - n), "only the generated tokens are targets"
    again = on_policy.rollout(student, tok, batch, stage=2, batch_idx=3)
    assert all(torch.equal(again[k], rollout[k]) for k in rollout), "seeded: a resumed run draws the same"
    other = on_policy.rollout(student, tok, batch, stage=2, batch_idx=4)
    assert not torch.equal(other["input_ids"], rollout["input_ids"]), "each batch its own draws"


def test_a_row_the_student_ends_keeps_its_end_token_as_a_target(tok: Any) -> None:
    """With half the vocabulary ending an answer (the generation config's end ids), rows end early: the end token
    is the last generated token and is learned, as the student's decision to stop."""
    student, _ = student_and_teacher()
    ends = list(range(7, 140))
    student.generation_config.eos_token_id = ends
    rollout = OnPolicy(Recovery(on_policy=1.0, on_policy_tokens=40), seed=0).rollout(
        student, tok, mixed_batch(tok), stage=1, batch_idx=0)
    for labels in rollout["labels"].tolist():
        targets = [t for t in labels if t != IGNORE_INDEX]
        assert len(targets) < 40 and targets[-1] in ends and not set(targets[:-1]) & set(ends)


def test_which_batches_are_on_policy_depends_only_on_seed_stage_and_batch() -> None:
    chosen = [is_on_policy(0, 1, i, 0.3) for i in range(4000)]
    assert chosen == [is_on_policy(0, 1, i, 0.3) for i in range(4000)], "the same on every rank and on resume"
    assert chosen != [is_on_policy(1, 1, i, 0.3) for i in range(4000)]
    assert chosen != [is_on_policy(0, 2, i, 0.3) for i in range(4000)]
    assert abs(np.mean(chosen) - 0.3) < 0.03, "a Bernoulli(λ) choice per batch"
    assert not any(is_on_policy(0, 1, i, 0.0) for i in range(500))
    assert all(is_on_policy(0, 1, i, 1.0) for i in range(500))
    assert set(np.flatnonzero([is_on_policy(0, 1, i, 0.6) for i in range(4000)])) >= set(np.flatnonzero(chosen)), \
        "a larger share keeps the batches a smaller one chose"


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"on_policy": 1.5}, "recovery.on_policy=1.5 is invalid; it must be a share in [0, 1]"),
    ({"on_policy": -0.1}, "recovery.on_policy=-0.1 is invalid"),
    ({"on_policy": math.nan}, "recovery.on_policy=nan is invalid"),
    ({"on_policy_tokens": 0}, "recovery.on_policy_tokens=0 is invalid; it must be >= 1"),
])
def test_bad_on_policy_settings_are_refused_in_one_line(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError) as refused:
        Recovery(**kwargs)
    assert needle in str(refused.value) and "\n" not in str(refused.value)


def test_on_policy_asks_for_a_teacher_and_zero_changes_nothing() -> None:
    assert not Recovery().needs_teacher and not Recovery().distils
    mixed = Recovery(loss="sft", on_policy=0.25, teacher="previous")
    assert mixed.needs_teacher and not mixed.distils, "the teacher scores on-policy batches only"
    assert Recovery(loss="kd").needs_teacher and Recovery(loss="kd").distils


def test_on_policy_is_refused_under_fsdp_before_anything_loads() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    check_strategy(strategy, "full", 0.0)
    with pytest.raises(UsageError, match=r"recovery.on_policy=0.5 with trainer.strategy ModelParallelStrategy"):
        check_strategy(strategy, "full", 0.5)


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------

class RecordedOnPolicy(OnPolicy):
    """The run's own on-policy batches, recording (stage, batch index) of every rollout."""

    def __init__(self, recovery: Recovery, seed: int) -> None:
        super().__init__(recovery, seed)
        self.rollouts: list[tuple[int, int]] = []

    def rollout(self, student: Any, tokenizer: Any, batch: Any, stage: int, batch_idx: int) -> Any:
        self.rollouts.append((stage, batch_idx))
        return super().rollout(student, tokenizer, batch, stage, batch_idx)


def test_a_fit_trains_on_the_on_policy_batches_the_seed_chose_and_refuses_another_share(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Under `loss: sft` the teacher is loaded for the on-policy batches alone; the mixture holds self-written text.
    A resume with another share, or other self_text settings, is another run."""
    from gradual.runplan import plan_lines

    sources = [{"kind": "sgr"}, {"kind": "self_text", "n_texts": 4, "max_new_tokens": 8}]
    changes = dict(data__sources=sources, data__sgr__cache_dir=str(tmp_path / "cache"),
                   model__schedule__max_layers=2, model__schedule__steps_per_stage=4)
    config, run_dir = write_config(tmp_path, model__recovery={"loss": "sft", "on_policy": 0.5, "on_policy_tokens": 6},
                                   **changes)
    cli = GradualCLI(args=["--config", str(config)], run=False)
    cli.model.on_policy = RecordedOnPolicy(cli.model.recovery, cli.model.seed)
    cli.model.check_run_dir(cli.trainer, cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    expected = [(s, i) for s in (1, 2) for i in range(4) if is_on_policy(0, s, i, 0.5)]
    assert cli.model.on_policy.rollouts == expected and 0 < len(expected) < 8, expected
    assert cli.model.teacher is not None, "loaded for the on-policy batches"
    results = json.loads((run_dir / "results.json").read_text())
    for stage in results["stages"][1:]:
        assert np.isfinite(stage["loss"])
        assert ("rollout_s" in stage["timings"]) == any(s == stage["stage"] for s, _ in expected)
    assert [r["kind"] for r in results["recovery_data"]] == ["sgr", "self_text"]
    [recovery] = [line for line in plan_lines(cli.model, cli.datamodule, cli.trainer) if "recovery:" in line]
    assert "on-policy (GKD) on 50% of batches" in recovery and "continuations of built-in openings" in recovery

    capsys.readouterr()
    recovery_settings = {"loss": "sft", "on_policy": 0.5, "on_policy_tokens": 6}
    for key, change in [("recovery.on_policy", {"model__recovery": {**recovery_settings, "on_policy": 0.25}}),
                        ("data.sources.1.temperature", {"model__recovery": recovery_settings, "data__sources": [
                            sources[0], {**sources[1], "temperature": 0.7}]})]:
        other, _ = write_config(tmp_path, **{**changes, **change})
        assert main(["fit", "--config", str(other)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "already holds a different run" in err[0] and key in err[0], err
