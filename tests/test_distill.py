"""Recovery pieces on tiny real models: the KL against a direct computation, chunking, memory, the layer map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_fit import fit_in_process, write_config

from gradual import surgery
from gradual.distill import (
    Recovery,
    RecoveryObjective,
    Teacher,
    forward_kl,
    hidden_state_loss,
    layer_pairs,
    loss_mask,
)
from gradual.errors import UsageError
from gradual.lora import LoraSettings, attach_lora
from gradual.models import load_model
from gradual.tiny import tiny_model


def _batch(seed: int = 0, rows: int = 3, width: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :4] = -100  # a prompt whose tokens are not learned
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _direct_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    per_token = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                         reduction="none").sum(-1)
    return per_token[mask].mean() * tau ** 2


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_equals_a_direct_full_vocabulary_computation(tau: float) -> None:
    batch = _batch()
    student, teacher = tiny_model("llama", 4, seed=1), tiny_model("llama", 4, seed=2)
    s = student(input_ids=batch["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    mask = loss_mask(batch)
    ours = forward_kl(s, t, mask, temperature=tau)
    (grad_ours,) = torch.autograd.grad(ours, s, retain_graph=True)
    direct = _direct_kl(s, t, mask, tau)
    (grad_direct,) = torch.autograd.grad(direct, s)
    assert ours.item() > 0
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_ours, grad_direct, rtol=1e-4, atol=1e-8)


def test_loss_mask_counts_label_targets_only() -> None:
    mask = loss_mask(_batch())
    assert mask.shape == (3, 9)
    assert mask[0].all() and mask[1].tolist() == [True] * 6 + [False] * 3
    assert mask[2].tolist() == [False] * 3 + [True] * 6


def test_chunking_changes_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 7, 50, generator=g, requires_grad=True)
    t = torch.randn(2, 7, 50, generator=g)
    mask = torch.rand(2, 7, generator=g) > 0.3
    values, grads = [], []
    for chunk in (1, 3, 1000):
        loss = forward_kl(s, t, mask, chunk_size=chunk)
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, s)[0])
    for v, gr in zip(values[1:], grads[1:], strict=True):
        torch.testing.assert_close(v, values[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gr, grads[0], rtol=1e-6, atol=1e-9)


def test_kl_saves_no_float32_softmax_for_backward() -> None:
    """Only the chunk inputs are kept for the backward pass (checkpointed), never a [n, V] float32 soft-max."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 64, 500, generator=g, dtype=torch.bfloat16).requires_grad_()
    t = torch.randn(2, 64, 500, generator=g, dtype=torch.bfloat16)
    mask = torch.ones(2, 64, dtype=torch.bool)
    saved: list[torch.Tensor] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = forward_kl(logits, t, mask, chunk_size=32)
    assert not any(x.dtype == torch.float32 and x.numel() >= 32 * 500 for x in saved), \
        [(x.dtype, tuple(x.shape)) for x in saved]
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_hidden_state_map_follows_original_indices() -> None:
    teacher_model = load_model("tiny:llama:6")
    student = load_model("tiny:llama:6")
    surgery.remove_layers(student, [2, 3])
    assert surgery.original_indices(student) == [0, 1, 4, 5]
    pairs = layer_pairs(surgery.original_indices(student), list(range(6)))
    assert pairs == [(1, 1), (2, 2), (3, 5), (4, 6)]
    batch = _batch()
    with torch.no_grad():
        hs = student(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        ht = teacher_model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    mask = batch["attention_mask"] > 0
    assert hidden_state_loss(hs, ht, pairs[:2], mask).item() == 0.0  # layers before the cut are the teacher's own
    assert hidden_state_loss(hs, ht, pairs[2:], mask).item() > 0


def test_kd_steps_bring_the_pruned_student_towards_the_teacher() -> None:
    teacher = Teacher(load_model("tiny:llama:6"))
    student = load_model("tiny:llama:6")
    surgery.remove_layers(student, [2, 3])
    student = attach_lora(student, LoraSettings(r=4, alpha=8, dropout=0.0))
    objective = RecoveryObjective(Recovery(loss="kd", hidden_weight=0.1), teacher)
    batch = _batch()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    original = surgery.original_indices(student)
    losses = []
    for _ in range(8):
        loss, parts = objective(student, batch, original)
        assert set(parts) == {"kd", "hidden"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["kd"])
    assert losses[-1] < 0.8 * losses[0], losses
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_kd_plus_sft_adds_the_cross_entropy_of_hf() -> None:
    teacher = Teacher(tiny_model("llama", 4, seed=3))
    student = load_model("tiny:llama:4")
    batch = _batch()
    objective = RecoveryObjective(Recovery(loss="kd+sft", sft_weight=0.5), teacher)
    loss, parts = objective(student, batch, [0, 1, 2, 3])
    hf_loss = student(**batch).loss
    torch.testing.assert_close(torch.tensor(parts["sft"]), hf_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), torch.tensor(parts["kd"] + 0.5 * parts["sft"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "needle"), [({"loss": "mse"}, "loss='mse'"), ({"temperature": 0}, "temperature"),
                                                ({"teacher_quantize": "int8"}, "int8"), ({"chunk_size": 0}, "chunk")])
def test_bad_settings_are_refused(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        Recovery(**kwargs)


def test_a_kd_fit_trains_the_student_against_a_frozen_original(tmp_path: Path) -> None:
    config, run_dir = write_config(tmp_path, model__schedule__max_layers=2, model__schedule__steps_per_stage=2,
                                   model__recovery={"loss": "kd", "hidden_weight": 0.5})
    cli = fit_in_process(config)
    module = cli.model
    reference = load_model("tiny:llama:6")
    teacher = module.teacher.model
    assert surgery.num_layers(teacher) == 6 and not teacher.training
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), reference.state_dict().values(),
                                                 strict=True)), "the teacher is never trained"
    assert not any(k.startswith("teacher") for k in module.state_dict())
    results = json.loads((run_dir / "results.json").read_text())
    stages = results["stages"]
    assert [len(s["removed_total"]) for s in stages] == [0, 1, 2] and all(s["loss"] > 0 for s in stages[1:])
    assert results["config"]["recovery"]["loss"] == "kd"


def _masked_vocab(side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits [2, 5, 12] with ids 9-11 at −inf on `side` (student, teacher or both)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 12, generator=g)
    t = torch.randn(2, 5, 12, generator=g)
    if side in ("student", "both"):
        s[..., 9:] = float("-inf")
    if side in ("teacher", "both"):
        t[..., 9:] = float("-inf")
    return s.requires_grad_(), t, torch.ones(2, 5, dtype=torch.bool)


@pytest.mark.parametrize("chunk", [1, 1024])
def test_kl_with_masked_vocabulary_on_both_sides_is_the_kl_over_the_other_ids(chunk: int) -> None:
    s, t, mask = _masked_vocab("both")
    loss = forward_kl(s, t, mask, chunk_size=chunk)
    loss.backward()
    direct = _direct_kl(s.detach()[..., :9], t[..., :9], mask, 1.0)  # 0 · log 0 = 0: the masked ids add nothing
    torch.testing.assert_close(loss.detach(), direct, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(s.grad).all() and (s.grad[..., 9:] == 0).all() and s.grad[..., :9].abs().sum() > 0


def test_kl_with_masked_teacher_ids_ignores_them() -> None:
    s, t, mask = _masked_vocab("teacher")
    loss = forward_kl(s, t, mask)
    loss.backward()
    p = F.softmax(t, -1)
    direct = (p * (F.log_softmax(t, -1).clamp_min(-1e30) - F.log_softmax(s.detach(), -1)))[..., :9].sum(-1).mean()
    torch.testing.assert_close(loss.detach(), direct, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(s.grad).all()


def test_a_student_at_minus_inf_where_the_teacher_has_mass_is_plus_inf() -> None:
    s, t, mask = _masked_vocab("student")
    assert forward_kl(s, t, mask).item() == float("inf")
    assert forward_kl(s, t, mask, reduction="sum").item() == float("inf")
