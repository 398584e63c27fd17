"""On-policy distillation (`model.recovery.on_policy`): GKD's on-policy batches (Agarwal et al., arXiv 2306.13649).

Off-policy distillation trains the student on sequences it did not write; at inference it conditions on its own
tokens, whose mistakes the teacher never corrected. GKD mixes in batches where the student samples the sequence and
the teacher scores every token of it. Here, with probability λ = `recovery.on_policy` a training batch is on-policy:

1. **prompts**: each row's prompt part, its tokens before the first label (a pair's chat-formatted prompt); a row
   whose every token is a label (a text: `tasks`, `text`, `self_text` sources) has no prompt, so its first
   `TEXT_PROMPT_TOKENS` tokens serve as one (at most half the text, at least one token);
2. **rollout**: the current student continues every prompt through the project's batched generator
   (`gradual.generation.generate_ids`), sampled from its unwarped distribution (temperature 1, no top-p: the
   student's own policy, on which GKD's on-policy objective is defined), up to `recovery.on_policy_tokens` tokens,
   the end token kept when it ended the row; each row's generator is seeded by (seed, stage, batch index, rank,
   row), so a resumed run draws the same tokens from the same weights;
3. **loss**: the per-token forward KL(teacher ‖ student) over the full vocabulary at `recovery.temperature` (times
   τ², `gradual.distill.forward_kl`), on the generated tokens only, averaged over them. This is GKD's divergence
   D = forward KL (its generalised JSD at β = 0 in TRL's convention); the teacher is the stage's teacher. The student's
   sampling is not differentiated through (GKD's on-policy gradient likewise ignores it). The cross-entropy and the
   hidden-state term are not applied to on-policy batches: a student's own sample is no target.

Which batches are on-policy depends only on (seed, stage, batch index), the same on every rank, so ranks generate
together and a resumed stage repeats its choice. An on-policy batch's loss is its own per-token mean: its token count
is known only after generation, so the step normalisers the sampler computed for the batch's data do not apply.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import torch

from gradual.distill import IGNORE_INDEX, Recovery, RecoveryObjective, Teacher
from gradual.generation import DecodingConfig, generate_ids
from gradual.ranks import rank_world

TEXT_PROMPT_TOKENS = 32
"""Prompt tokens taken from a row without a prompt part (a text), at most half its tokens."""


def is_on_policy(seed: int, stage: int, batch_idx: int, share: float) -> bool:
    """Whether training batch `batch_idx` of `stage` is on-policy: a uniform draw seeded by (seed, stage, batch_idx)
    below `share` (GKD's Bernoulli(λ) per batch). 0 never, 1 always."""
    return bool(share > 0 and np.random.default_rng([seed, 4, stage, batch_idx]).random() < share)


def row_seed(seed: int, stage: int, batch_idx: int, rank: int, row: int) -> int:
    """The sampling seed of one rollout row: distinct per (seed, stage, batch, rank, row)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage}:{batch_idx}:{rank}:{row}".encode()).digest()[:4], "little")


def prompts_of(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt token ids: its real tokens before the first label, or for a row labelled from its first
    token (a text) its first min(`TEXT_PROMPT_TOKENS`, half its length) tokens, at least one. Rows are right-padded
    (`gradual.training_examples.pad_collator`)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    labels = batch.get("labels", ids.masked_fill(mask == 0, IGNORE_INDEX))
    prompts = []
    for row, real, lab in zip(ids.tolist(), mask.tolist(), labels.tolist(), strict=True):
        n = int(sum(real))
        first = next((t for t in range(n) if lab[t] != IGNORE_INDEX), n)
        cut = first if first > 0 else max(1, min(TEXT_PROMPT_TOKENS, n // 2))
        prompts.append(row[:cut])
    return prompts


def rollout_batch(prompts: list[list[int]], generated: list[list[int]], pad_id: int,
                  device: torch.device | str) -> dict[str, torch.Tensor]:
    """prompt + generated tokens per row, right-padded: `input_ids`, `attention_mask`, and `labels` that are the
    generated tokens and -100 elsewhere, so `gradual.distill.loss_mask` counts exactly the positions predicting a
    generated token. [B, T] long tensors on `device`."""
    width = max(len(p) + len(g) for p, g in zip(prompts, generated, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, g) in enumerate(zip(prompts, generated, strict=True)):
        ids[i, :len(p) + len(g)] = torch.tensor(p + g, dtype=torch.long)
        mask[i, :len(p) + len(g)] = 1
        if g:
            labels[i, len(p):len(p) + len(g)] = torch.tensor(g, dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


class OnPolicy:
    """The on-policy batches of a run (`recovery.on_policy` > 0): which batches (`chooses`), the student's rollout
    (`rollout`) and its loss (`loss`). `GradualModule.training_step` calls them in that order.

    Args:
        recovery: the run's recovery settings (`on_policy`, `on_policy_tokens`, `temperature`, `chunk_size`).
        seed: the run's seed (`model.seed`).
    """

    def __init__(self, recovery: Recovery, seed: int) -> None:
        self.share, self.seed = recovery.on_policy, seed
        self.decoding = DecodingConfig(do_sample=True, temperature=1.0, top_p=1.0,
                                       max_new_tokens=recovery.on_policy_tokens)
        self.settings = replace(recovery, loss="kd", hidden_weight=0.0, on_policy=0.0)

    def chooses(self, stage: int, batch_idx: int) -> bool:
        return is_on_policy(self.seed, stage, batch_idx, self.share)

    def rollout(self, student: torch.nn.Module, tokenizer: object, batch: dict[str, torch.Tensor], stage: int,
                batch_idx: int) -> dict[str, torch.Tensor]:
        """The student's continuations of the batch's prompts (`prompts_of`) as a batch whose labels are the
        generated tokens (`rollout_batch`)."""
        prompts = prompts_of(batch)
        rank = rank_world()[0]
        seeds = [row_seed(self.seed, stage, batch_idx, rank, r) for r in range(len(prompts))]
        generated = generate_ids(student, tokenizer, prompts, self.decoding, seeds, keep_end=True)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return rollout_batch(prompts, generated, pad_id, batch["input_ids"].device)

    def loss(self, student: torch.nn.Module, teacher: Teacher, rollout: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, float]:
        """(loss to back-propagate, its value): the forward KL(teacher ‖ student) summed over the vocabulary, times
        τ², averaged over the rollout's generated tokens (0 when there are none)."""
        loss, parts = RecoveryObjective(self.settings, teacher)(student, rollout, [])
        return loss, parts["kd"]
