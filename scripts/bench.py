"""Performance of gradual against what a user would run instead, as ratios measured side by side in one process.

Every comparison runs its candidates alternately (A B, B A, ...) for a few rounds and keeps each one's best time
(decode speed: all variants step in turn, one token each, and the median step counts), on the same inputs, and
reports how often their outputs agree. Absolute times on a shared machine mean little; the ratios are what
`bench.json` records:

1. layer scoring (block influence, angular distance) ÷ one plain forward pass over the same batches (<= 1.3)
2. SGR generation: new tokens/s of gradual's `generate` ÷ HF `model.generate` on the same batches (the demo's SGR
   prompts and batch size, left padding, attention mask, KV cache, greedy, same budget and end ids) (>= 1.5)
3. recovery training: tokens/s of a real Lightning stage (GradualModule + RecoveryDataModule) ÷ a bare
   PyTorch + peft loop on the same batches with the same LoRA and optimizer (>= 0.95)
4. decode tokens/s with k of L layers removed ÷ unpruned, as a share of the ideal L / (L − k) (>= 0.9)
5. built-in task evaluation (`gradual.tasks.evaluate`) ÷ lm-eval's HFLM on the live model at its best batch size, on
   the same items exported as local lm-eval tasks, per form (>= 2 each); items whose outcomes differ are explained
   in the details file
6. a demo stage's wall time not spent in recovery steps (<= 0.25), from a real one-stage fit of the demo's recipe
   (LoRA + KD from the unpruned teacher on the few-shot task documents) in a subprocess
7. that subprocess's peak RSS ÷ the model's fp32 weight size (reported; student and teacher)
8. distillation: a KD recovery step (teacher forward + chunked forward KL) ÷ an SFT step on the same batch, in time
   (<= 1.5) and in the step's peak memory above the loaded models (<= 1.3; each measured in a fresh process)

Usage: `python scripts/bench.py [--quick] [--out bench.json] [--details PATH] [--model NAME] [--threads N|auto]
[--device cpu|cuda] [--dtype float32|bfloat16]`; results and their explanation: docs/bench.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from gradual.callbacks import StageCheckpoint, TaskEvaluation  # noqa: E402  # isort: skip
from gradual.datamodule import GradualDataModule, RecoveryDataModule  # noqa: E402
from gradual.distill import Recovery, RecoveryObjective, Teacher  # noqa: E402
from gradual.generation import DecodingConfig, encode_prompt, end_ids, format_prompt, generate  # noqa: E402
from gradual.importance import calibration_batches, calibration_texts, score_layers  # noqa: E402
from gradual.lora import LoraSettings, attach_lora  # noqa: E402
from gradual.mixture import DataSource  # noqa: E402
from gradual.models import load_model, load_tokenizer  # noqa: E402
from gradual.module import GradualModule  # noqa: E402
from gradual.sgr import SGRConfig, load_prompts  # noqa: E402
from gradual.stages import Schedule, Selection  # noqa: E402
from gradual.surgery import num_layers, remove_layers  # noqa: E402
from gradual.tasks.builtin import get_task  # noqa: E402
from gradual.tasks.evaluate import answer_text, build_prompt, evaluate  # noqa: E402
from gradual.tasks.extract import classify_failure  # noqa: E402
from gradual.tasks.lm_eval_bridge import evaluate_lm_eval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
Batch = dict[str, torch.Tensor]
TARGETS: dict[str, str] = {
    "scoring_block_influence_vs_forward": "<= 1.3",
    "scoring_angular_distance_vs_forward": "<= 1.3",
    "sgr_generation_vs_hf_batched": ">= 1.5",
    "recovery_vs_bare": ">= 0.95",
    "pruned_decode_k4_vs_ideal": ">= 0.9",
    "pruned_decode_k8_vs_ideal": ">= 0.9",
    "evaluation_vs_lm_eval_generative": ">= 2",
    "evaluation_vs_lm_eval_classification": ">= 2",
    "stage_overhead_share": "<= 0.25",
    "kd_step_vs_sft_step": "<= 1.5",
    "kd_step_peak_memory_vs_sft": "<= 1.3",
}
"""Figures with a target (the issue's); every other figure is reported only."""
LM_EVAL_STOP = ["\n"]
"""lm-eval's `until` for the exported one-line few-shot answers: the answer line ends at the first newline."""


# ---------------------------------------------------------------------------------------------------------------
# Figures, timing and placement


@dataclass
class Figure:
    """One number of the bench; `target` like ">= 5" or "<= 1.3", None for a reported-only figure."""

    name: str
    value: float
    target: str | None = None

    def __post_init__(self) -> None:
        self.value = float(self.value)
        self.target = self.target or TARGETS.get(self.name)

    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target.split()
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)

    def line(self) -> str:
        verdict = {None: "", True: " met", False: " MISSED"}[self.met()]
        return f"{self.name}: {self.value:.4g} ({self.target or 'reported'}){verdict}"


def figures_json(figures: Sequence[Figure]) -> dict[str, dict[str, float | str]]:
    """The bench.json mapping: `{name: {"value": v, "target": ">= 5"}}`, no target for reported-only figures."""
    out: dict[str, dict[str, float | str]] = {}
    for f in figures:
        out[f.name] = {"value": float(f.value)} | ({"target": f.target} if f.target else {})
    return out


def sync() -> None:
    """Wait for queued GPU work, so a wall time covers it (CUDA kernels run asynchronously); nothing on a CPU."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def alternate(candidates: dict[Any, Callable[[], Any]], rounds: int) -> tuple[dict[Any, float], dict[Any, Any]]:
    """Best wall time of each candidate over `rounds`, running them in turn and reversing the order every round,
    so a load change hits all of them alike. Also returns each candidate's last result."""
    best = dict.fromkeys(candidates, float("inf"))
    results: dict[str, Any] = {}
    names = list(candidates)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            results[name] = candidates[name]()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


@dataclass
class Placement:
    """Where the bench runs: `cpu` in float32 (the committed figures), or `cuda` in bfloat16 (scripts/gpu_check.py)."""

    device: str = "cpu"
    dtype: str = "float32"

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def accelerator(self) -> str:
        return "gpu" if self.cuda else "cpu"

    @property
    def precision(self) -> str:
        """Lightning's precision for the dtype, as the repository's GPU configs set it."""
        return {"bfloat16": "bf16-mixed", "float16": "16-mixed"}.get(self.dtype, "32-true")

    def load(self, name: str) -> torch.nn.Module:
        return load_model(name, dtype=self.dtype).to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast a Lightning `*-mixed` precision applies to a training step (none in float32)."""
        if self.precision == "32-true":
            return contextlib.nullcontext()
        return torch.autocast("cuda" if self.cuda else "cpu", dtype=getattr(torch, self.dtype))


@dataclass
class Sizes:
    """How much work each comparison does; `quick` is for a fast look, the default for the committed figures."""

    rounds: int = 3  # best-of rounds of the cheap comparisons (scoring, decode, KD step)
    slow_rounds: int = 2  # best-of rounds of the comparisons that take minutes (generation, training, evaluation)
    calib_texts: int = 8
    calib_max_length: int = 64
    gen_batches: int = 2  # batches of the demo's SGR batch size (`data.sgr.batch_size`)
    gen_batch_size: int | None = None  # None: the demo's SGR batch size
    gen_tokens: int = 24
    gen_batch1: bool = True  # also time the batch-1 `model.generate` loop (reported only)
    decode_tokens: int = 24
    prune: tuple[int, ...] = (4, 8)
    train_steps: int = 6  # steps 1.. are timed: 5 steps keep one slow step from deciding the ratio
    train_batch: int = 4
    train_max_length: int = 128
    eval_tasks: tuple[str, ...] = ("successor", "copy")
    eval_n: int = 16
    eval_tokens: int = 16
    lm_eval_batch_sizes: tuple[int, ...] = (8, 32, 64)  # lm-eval's batch sizes tried; its fastest counts
    kd_batch: int | None = None  # None: the demo's batch size (KD vs SFT step on a batch of the demo's data)
    stage_steps: int | None = None  # None: the demo's own steps per stage, so the stage is measured, not projected
    stage_eval_n: int | None = None  # None: the demo's own problems per task


QUICK = Sizes(rounds=2, slow_rounds=1, calib_texts=8, gen_batches=1, gen_batch_size=8, gen_tokens=16,
              decode_tokens=12, train_steps=2, train_batch=2, train_max_length=96, eval_tasks=("successor",),
              eval_n=8, lm_eval_batch_sizes=(8, 32), kd_batch=2, stage_steps=2, stage_eval_n=1)


# ---------------------------------------------------------------------------------------------------------------
# 1. Layer scoring


@torch.inference_mode()
def plain_forward(model: torch.nn.Module, batches: Sequence[Batch]) -> None:
    """The reference: one forward pass over the batches, nothing captured."""
    model.eval()
    device = next(model.parameters()).device
    for b in batches:
        model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False)


def bench_scoring(model: torch.nn.Module, batches: Sequence[Batch], rounds: int) -> list[Figure]:
    plain_forward(model, batches[:1])  # warm-up
    times, _ = alternate({
        "forward": lambda: plain_forward(model, batches),
        "block_influence": lambda: score_layers(model, batches, "block_influence", progress=False),
        "angular_distance": lambda: score_layers(model, batches, "angular_distance", progress=False),
    }, rounds)
    return [Figure(f"scoring_{m}_vs_forward", times[m] / times["forward"])
            for m in ("block_influence", "angular_distance")]


# ---------------------------------------------------------------------------------------------------------------
# 2. SGR generation


@torch.inference_mode()
def hf_generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                batch_size: int) -> list[str]:
    """The baseline a user would write: the prompts in order, `batch_size` at a time, left-padded with an attention
    mask through HF `model.generate` (greedy, KV cache, pad id, gradual's end ids as `eos_token_id`); each row's
    completion is its new tokens up to its first end id. Prompts are encoded as gradual encodes them
    (`encode_prompt`), so both start from the same ids; batch size 1 is the plain one-prompt-at-a-time loop."""
    model.eval()
    ends = sorted(end_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts = []
    for lo in range(0, len(prompts), batch_size):
        rows = [encode_prompt(tokenizer, p) for p in prompts[lo:lo + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=ends,
                             use_cache=True)
        for new in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(new) if t in ends), len(new))
            texts.append(tokenizer.decode(new[:cut], skip_special_tokens=True))
    return texts


def sgr_prompts(tokenizer: Any, tasks: Sequence[str], n: int) -> tuple[list[str], list[str]]:
    """`n` recovery prompts mixed across `tasks` (training split): (user messages, chat-formatted prompts)."""
    items = load_prompts(SGRConfig(tasks=list(tasks), n_per_task=max(1, -(-n // len(tasks)))))
    step = max(1, len(items) // n)
    users = [it.prompt for it in items[::step][:n]]
    return users, [format_prompt(tokenizer, u) for u in users]


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> int:
    """New tokens of completions, counted alike for every candidate (each completion already ends at its end id)."""
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def agreement(a: Sequence[Any], b: Sequence[Any]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


def bench_generation(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                     batch_size: int, rounds: int, batch1: bool = True
                     ) -> tuple[list[Figure], list[str], dict[str, Any]]:
    """gradual's `generate` vs HF `model.generate`, both in batches of `batch_size`, greedy; optionally the batch-1
    loop too. Returns the figures, gradual's completions and, for the details file, the completions that differ.

    `batch_fill` is the share of the row-steps HF decodes (each batch's rows until its longest reply ends, its end
    token included) that produce a kept token: in a decode whose cost grew with the rows, 1 / fill would be what
    dropping finished rows (gradual) can save at most."""
    config = DecodingConfig(do_sample=False, max_new_tokens=max_new_tokens)
    candidates = {
        "gradual": lambda: [r[0] for r in generate(model, tokenizer, prompts, config, batch_size=batch_size,
                                                    progress=False)],
        "hf_batched": lambda: hf_generate(model, tokenizer, prompts, max_new_tokens, batch_size),
    }
    if batch1:
        candidates["hf_batch1"] = lambda: hf_generate(model, tokenizer, prompts, max_new_tokens, 1)
    times, out = alternate(candidates, rounds)
    rate = {k: count_tokens(tokenizer, out[k]) / times[k] for k in times}
    lengths = [count_tokens(tokenizer, [t]) for t in out["gradual"]]
    # row-steps HF generate decodes: every row of a batch until its longest row ends (or the budget)
    longest = [max(lengths[lo:lo + batch_size]) for lo in range(0, len(lengths), batch_size)]
    hf_row_steps = sum(len(lengths[k * batch_size:(k + 1) * batch_size]) * (m + (m < max_new_tokens))
                       for k, m in enumerate(longest))
    figures = [Figure("sgr_generation_vs_hf_batched", rate["gradual"] / max(rate["hf_batched"], 1e-9)),
               Figure("sgr_generation_agreement", agreement(out["gradual"], out["hf_batched"])),
               Figure("sgr_generation_batch_fill", sum(lengths) / max(1, hf_row_steps))]
    if batch1:
        figures += [Figure("sgr_generation_speedup", rate["gradual"] / max(rate["hf_batch1"], 1e-9)),
                    Figure("sgr_generation_agreement_batch1", agreement(out["gradual"], out["hf_batch1"]))]
    differ = [{"prompt": p[-120:], "gradual": g, "hf_batched": h}
              for p, g, h in zip(prompts, out["gradual"], out["hf_batched"], strict=True) if g != h]
    details = {"prompts": len(prompts), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
               "new_tokens": {k: count_tokens(tokenizer, out[k]) for k in out},
               "best_s": times, "differences": differ}
    return figures, out["gradual"], details


# ---------------------------------------------------------------------------------------------------------------
# 3. Recovery training (and the one-stage fit used by 6 and 7)


class StepTimer(Callback):
    """Start/end time and real-token count of every training step, and a copy of every batch."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.batches: list[Batch] = []
        self.peak_rss_training = 0
        self.peak_cuda_training = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Batch,
                             batch_idx: int) -> None:
        self.batches.append({k: v.detach().cpu().clone() for k, v in batch.items()})
        self.tokens.append(int(batch["attention_mask"].sum()))
        sync()
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Batch,
                           batch_idx: int) -> None:
        sync()
        self.ends.append(time.perf_counter())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Runs before the evaluation and checkpoint callbacks: the peak so far is that of scoring + training."""
        self.peak_rss_training = peak_rss_bytes()
        self.peak_cuda_training = peak_cuda_bytes()

    def steady_rate(self) -> float:
        """Tokens/s from the start of step 1 to the end of the last step (step 0 warms allocators up)."""
        return steady_rate(self.starts, self.ends, self.tokens)

    def steps_s(self) -> float:
        return self.ends[-1] - self.starts[0]


def steady_rate(starts: Sequence[float], ends: Sequence[float], tokens: Sequence[int]) -> float:
    first = 1 if len(starts) > 1 else 0
    return sum(tokens[first:]) / (ends[-1] - starts[first])


class StageEvaluation(TaskEvaluation):
    """TaskEvaluation without the stage-0 baseline: the bench times one stage, not the run's baseline."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        return None


@dataclass
class StageSpec:
    """One pruning stage: what a demo stage does, with steps and evaluation size as given.

    The recovery data are `pairs` (SFT pairs, learned on the response) or, when `sources` is set, the demo's mixture
    of `data.sources` with its `data.sgr` settings, built by the datamodule `gradual fit` uses."""

    model: str
    pairs: list[dict[str, str]]
    steps: int
    batch_size: int
    max_length: int
    lora: dict[str, Any] = field(default_factory=dict)
    recovery: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] | None = None
    sgr: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 3
    num_calibration: int = 8
    calibration_max_length: int = 32
    eval_tasks: list[str] = field(default_factory=list)
    eval_n: int = 1
    eval_tokens: int = 16
    eval_batch_size: int = 32
    checkpoint: bool = False
    device: str = "cpu"
    dtype: str = "float32"


def stage_data(spec: StageSpec) -> RecoveryDataModule:
    if spec.sources is None:
        data = RecoveryDataModule(pairs=spec.pairs, batch_size=spec.batch_size, samples_per_epoch=spec.batch_size,
                                  max_length=spec.max_length)
        data.set_tokenizer(load_tokenizer(spec.model))
        return data
    return GradualDataModule(model=spec.model, sgr=SGRConfig(**spec.sgr),
                             sources=[DataSource(**s) for s in spec.sources], batch_size=spec.batch_size,
                             max_length=spec.max_length)


def run_stage(spec: StageSpec, run_dir: Path) -> tuple[GradualModule, StepTimer, float]:
    """One stage through the real Lightning path: score, remove one layer, recovery steps (with a teacher when the
    recovery distils), merge, and optionally the evaluation and checkpoint callbacks of a `gradual fit` run.
    Returns the module, the step timer and the whole fit's wall time (model, teacher and data loading included)."""
    placement = Placement(spec.device, spec.dtype)
    module = GradualModule(model=spec.model, dtype=spec.dtype,
                           schedule=Schedule(max_layers=1, steps_per_stage=spec.steps, final_steps=0),
                           selection=Selection(num_calibration=spec.num_calibration,
                                               calibration_max_length=spec.calibration_max_length),
                           lora=LoraSettings(**spec.lora), recovery=Recovery(**spec.recovery),
                           warmup_steps=spec.warmup_steps, run_dir=str(run_dir), overwrite=True)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if spec.eval_tasks:
        callbacks.append(StageEvaluation(spec.eval_tasks, n=spec.eval_n, max_new_tokens=spec.eval_tokens,
                                         batch_size=spec.eval_batch_size, progress=False))
    if spec.checkpoint:
        callbacks.append(StageCheckpoint())
    trainer = L.Trainer(accelerator=placement.accelerator, devices=1, precision=placement.precision, max_epochs=1,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=spec.checkpoint,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, reload_dataloaders_every_n_epochs=1,
                        callbacks=callbacks)
    start = time.perf_counter()
    data = stage_data(spec)
    module.check_run_dir(trainer, data)
    trainer.fit(module, datamodule=data)
    return module, timer, time.perf_counter() - start


def bare_loop(spec: StageSpec, removed: Sequence[int], batches: Sequence[Batch], seed: int = 1) -> float:
    """The same steps by hand: same model, same removed layer, same LoRA, AdamW, warm-up, clipping and batches.

    Returns tokens/s over steps 1.. (as `StepTimer.steady_rate`)."""
    placement = Placement(spec.device, spec.dtype)
    model = placement.load(spec.model)
    model.config.use_cache = False
    remove_layers(model, list(removed))
    torch.manual_seed(seed)
    model = attach_lora(model, LoraSettings(**spec.lora))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    warmup = max(1, spec.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    starts, ends, tokens = [], [], []
    for batch in batches:
        batch = {k: v.to(spec.device) for k, v in batch.items()}
        sync()
        starts.append(time.perf_counter())
        with placement.autocast():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        ends.append(time.perf_counter())
        tokens.append(int(batch["attention_mask"].sum()))
    return steady_rate(starts, ends, tokens)


def bench_recovery(spec: StageSpec, rounds: int, workdir: Path) -> list[Figure]:
    """Lightning stage vs bare loop, alternating (the first Lightning stage supplies the batches), best of each."""
    rates: dict[str, float] = {"lightning": 0.0, "bare": 0.0}
    batches: list[Batch] = []
    removed: list[int] = []
    for r in range(rounds):
        for which in ("lightning", "bare") if r % 2 == 0 else ("bare", "lightning"):
            if which == "lightning":
                module, timer, _ = run_stage(spec, workdir / f"recovery_{r}")
                rates["lightning"] = max(rates["lightning"], timer.steady_rate())
                batches, removed = timer.batches, module.history[-1].removed
            else:
                rates["bare"] = max(rates["bare"], bare_loop(spec, removed, batches))
    return [Figure("recovery_vs_bare", rates["lightning"] / rates["bare"])]


# ---------------------------------------------------------------------------------------------------------------
# 4. Decode speed after pruning


@torch.inference_mode()
def interleaved_decode(variants: dict[int, torch.nn.Module], ids: torch.Tensor, tokens: int) -> dict[int, list[float]]:
    """Greedy batch-1 decode of `tokens` tokens with every variant at once, one step of each in turn, so a load
    burst hits all of them alike. Returns each variant's seconds per decode step (the prefill is not counted).

    A decode step is what `generate` runs per token: one cached forward of the new token (logits for it only)
    and the greedy pick; generate's own bookkeeping, the same for every variant, is left out."""
    state = {}
    for k, model in variants.items():
        model.eval()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        state[k] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    steps: dict[int, list[float]] = {k: [] for k in variants}
    for _ in range(tokens):
        for k, model in variants.items():
            cache, token = state[k]
            sync()
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            state[k] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
            sync()
            steps[k].append(time.perf_counter() - start)
    return steps


def bench_pruned_decode(model: torch.nn.Module, ids: torch.Tensor, tokens: int, ks: Sequence[int],
                        rounds: int) -> list[Figure]:
    """Decode tokens/s with k layers removed (the layers just below the last one) vs unpruned, from the median
    decode step over all rounds. Every variant, the unpruned one included, is a fresh copy of `model`, so all
    sit in memory allocated the same way (a freshly loaded model can be slower than its copy)."""
    depth = num_layers(model)
    ids = ids.to(next(model.parameters()).device)
    variants = {0: copy.deepcopy(model)}
    for k in ks:
        variants[k] = copy.deepcopy(model)
        remove_layers(variants[k], list(range(depth - 1 - k, depth - 1)))
    interleaved_decode(variants, ids, 2)  # warm-up: a model's first steps are slower (allocations, kernel choice)
    steps: dict[int, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        order = dict(sorted(variants.items(), reverse=r % 2 == 1))
        for k, times in interleaved_decode(order, ids, tokens).items():
            steps[k] += times
    figures = []
    for k in ks:
        speedup, ideal = statistics.median(steps[0]) / statistics.median(steps[k]), depth / (depth - k)
        figures += [Figure(f"pruned_decode_k{k}_speedup", speedup),
                    Figure(f"pruned_decode_k{k}_vs_ideal", speedup / ideal, ">= 0.9")]
    del variants
    return figures


# ---------------------------------------------------------------------------------------------------------------
# 5. Evaluation against lm-eval


def lm_eval_task_name(task: str, form: str) -> str:
    return f"gradual_bench_{task}_{'gen' if form == 'generative' else 'mc'}"


def export_lm_eval_tasks(tokenizer: Any, tasks: Sequence[str], n: int, max_new_tokens: int,
                         root: Path) -> dict[str, list[str]]:
    """Built-in tasks' evaluation items as local lm-eval tasks under `root`, one generate_until and one
    multiple_choice task per built-in task; returns the task names per form.

    Each jsonl row holds gradual's full few-shot prompt (`build_prompt`, so lm-eval runs with 0 shots on the very
    same text), the answer, the choices and the label. Generation: greedy, `max_gen_toks` = gradual's budget,
    `until` the first newline (a few-shot answer is one line), exact match ignoring surrounding whitespace. Choices:
    lm-eval joins context and choice with its default " ", as gradual's `choice_text` does after `A:`."""
    root.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {"generative": [], "classification": []}
    for name in tasks:
        task = get_task(name)
        rows = [{"prompt": build_prompt(task, p, tokenizer, "fewshot"), "answer": p.answer,
                 "choices": list(p.choices), "label": p.label} for p in task.problems("eval", n, 0)]
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
                  "test_split: test\ndoc_to_text: \"{{prompt}}\"\nnum_fewshot: 0\n")
        gen, mc = lm_eval_task_name(name, "generative"), lm_eval_task_name(name, "classification")
        (root / f"{gen}.yaml").write_text(
            f"task: {gen}\n{common}output_type: generate_until\ndoc_to_target: answer\n"
            f"generation_kwargs:\n  until: {json.dumps(LM_EVAL_STOP)}\n  max_gen_toks: {max_new_tokens}\n"
            "  do_sample: false\n  temperature: 0.0\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
            "    regexes_to_ignore: [\"^\\\\s+\", \"\\\\s+$\"]\n")
        (root / f"{mc}.yaml").write_text(
            f"task: {mc}\n{common}output_type: multiple_choice\ndoc_to_choice: \"{{{{choices}}}}\"\n"
            "doc_to_target: label\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
        names["generative"].append(gen)
        names["classification"].append(mc)
    return names


def gradual_items(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], n: int, max_new_tokens: int,
                  form: str, batch_size: int = 32) -> list[dict[str, Any]]:
    """gradual's `evaluate` in one form, as per-item records in task order: `outcome` (generative: answered
    correctly; classification: the chosen index) and what decided it (`reply` / `logprobs`)."""
    res = evaluate(model, tokenizer, tasks, n=n, forms=(form,), max_new_tokens=max_new_tokens,
                   batch_size=batch_size, progress=False, records=True)
    if form == "generative":
        return [{"task": t, "outcome": r["failure"] == "correct", "reply": r["reply"]}
                for t in tasks for r in res[t].records]
    return [{"task": t, "outcome": r["predicted"], "logprobs": r["logprobs"]}
            for t in tasks for r in res[f"mc_{t}"].records]


def lm_eval_items(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], n: int, form: str, root: Path,
                  batch_size: int) -> list[dict[str, Any]]:
    """lm-eval's HFLM on the live model over the exported tasks of one form (one `simple_evaluate` call, as
    `lm_eval --model hf --tasks ...` runs them), as per-item records in gradual's order. A generative outcome is
    gradual's own answer check applied to lm-eval's reply, so the two differ only where the replies do; `lm_eval_em`
    is lm-eval's own exact match of the item."""
    names = [lm_eval_task_name(t, form) for t in tasks]
    res = evaluate_lm_eval(model, tokenizer, names, include_path=str(root), batch_size=batch_size, records=True,
                           include_defaults=False)
    items = []
    for name, tname in zip(tasks, names, strict=True):
        task = get_task(name)
        problems = task.problems("eval", n, 0)
        records = sorted(res[tname].records, key=lambda r: r["doc_id"])
        for p, r in zip(problems, records, strict=True):
            response = r["response"]
            if form == "generative":
                reply = response[0] if isinstance(response, list | tuple) else response
                correct = classify_failure(task.kind, answer_text(reply, "fewshot"), p.answer, task.labels,
                                           p.brackets) == "correct"
                items.append({"task": name, "outcome": correct, "reply": reply, "lm_eval_em": r["score"],
                              "target": r["target"]})
            else:
                logprobs = [float(x[0]) if isinstance(x, list | tuple) else float(x) for x in response]
                items.append({"task": name, "outcome": max(range(len(logprobs)), key=logprobs.__getitem__),
                              "logprobs": logprobs, "target": r["target"]})
    return items


def explain_difference(form: str, ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """Why an item's outcomes differ, from what decided them."""
    if form == "classification":
        a, b = ours["logprobs"], theirs["logprobs"]
        gap = max(abs(x - y) for x, y in zip(a, b, strict=True))
        top = sorted(a, reverse=True)
        margin = top[0] - top[1] if len(top) > 1 else float("inf")
        return (f"near tie: gradual's top two choices differ by {margin:.2g} nats and the two log-likelihoods by up "
                f"to {gap:.2g} (numerics: padding and batch shape)" if margin <= 2 * gap else
                f"log-likelihoods differ by up to {gap:.2g} nats, more than gradual's margin {margin:.2g}: "
                "different token ids (tokenisation of the joined context and choice)")
    mine, other = ours["reply"], theirs["reply"]
    if mine.strip() and not other.strip() and mine.lstrip(" \t").startswith("\n"):
        return ("stop: the reply starts with a blank line; lm-eval's `until` newline ends it there, gradual's answer "
                "is its first non-blank line")
    if answer_text(mine, "fewshot") == answer_text(other, "fewshot"):
        return "same answer line: the answer check differs (should not happen)"
    first_a, first_b = answer_text(mine, "fewshot"), answer_text(other, "fewshot")
    if first_a.startswith(first_b) or first_b.startswith(first_a):
        return "length: one reply stopped earlier on the same tokens (token budget or stop string)"
    return ("greedy tokens differ: different logits at a near tie (numerics: left padding, batch shape and kernel "
            "order)")


def compare_items(form: str, ours: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]]
                  ) -> tuple[float, list[dict[str, Any]]]:
    """Agreement of per-item outcomes, and every differing item with both sides and the reason."""
    differ = []
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a["outcome"] != b["outcome"]:
            side = "reply" if form == "generative" else "logprobs"
            differ.append({"item": k, "task": a["task"], "gradual": a[side], "lm_eval": b[side],
                           "gradual_outcome": a["outcome"], "lm_eval_outcome": b["outcome"],
                           "why": explain_difference(form, a, b)})
    return agreement([a["outcome"] for a in ours], [b["outcome"] for b in theirs]), differ


def bench_evaluation(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], n: int, max_new_tokens: int,
                     batch_sizes: Sequence[int], rounds: int, workdir: Path) -> tuple[list[Figure], dict[str, Any]]:
    """Per form: gradual's evaluation vs lm-eval's HFLM on the same exported items, alternating: one round with every
    one of `batch_sizes`, then `rounds - 1` more with lm-eval's fastest, whose best time counts. Items/s ratios,
    per-item agreement (at that batch size) and, for the details file, the batch sizes' items/s and every differing
    item with its reason."""
    root = workdir / "lm_eval_tasks"
    export_lm_eval_tasks(tokenizer, tasks, n, max_new_tokens, root)
    items = len(tasks) * n
    figures: list[Figure] = []
    details: dict[str, Any] = {"tasks": list(tasks), "items_per_form": items, "lm_eval_stop": LM_EVAL_STOP}
    best_total = {"gradual": 0.0, "lm_eval": 0.0}
    for form in ("generative", "classification"):
        candidates: dict[Any, Callable[[], Any]] = {
            "gradual": lambda f=form: gradual_items(model, tokenizer, tasks, n, max_new_tokens, f)}
        for bs in batch_sizes:
            candidates[bs] = lambda f=form, b=bs: lm_eval_items(model, tokenizer, tasks, n, f, root, b)
        times, out = alternate(candidates, 1)  # every batch size once; the further rounds only at the fastest
        best_bs = min(batch_sizes, key=lambda b: times[b])
        if rounds > 1:
            more, last = alternate({"gradual": candidates["gradual"], best_bs: candidates[best_bs]}, rounds - 1)
            times.update({k: min(times[k], t) for k, t in more.items()})
            out.update(last)
        agree, differ = compare_items(form, out["gradual"], out[best_bs])
        figures += [Figure(f"evaluation_vs_lm_eval_{form}", times[best_bs] / times["gradual"]),
                    Figure(f"evaluation_agreement_{form}", agree),
                    Figure(f"evaluation_lm_eval_batch_size_{form}", best_bs)]
        best_total["gradual"] += times["gradual"]
        best_total["lm_eval"] += times[best_bs]
        em = [it["lm_eval_em"] for it in out[best_bs] if "lm_eval_em" in it]
        details[form] = {"gradual_items_per_s": items / times["gradual"],
                         "lm_eval_items_per_s": {str(b): items / times[b] for b in batch_sizes},
                         "lm_eval_best_batch_size": best_bs, "agreement": agree, "differences": differ}
        if em:  # lm-eval's own metric against gradual's answer check, on lm-eval's replies
            details[form]["lm_eval_exact_match_vs_gradual_check"] = agreement(
                [bool(x) for x in em], [it["outcome"] for it in out[best_bs]])
    figures.insert(0, Figure("evaluation_vs_lm_eval", best_total["lm_eval"] / best_total["gradual"]))
    return figures, details


# ---------------------------------------------------------------------------------------------------------------
# 6 and 7. A demo stage, in its own process


def demo_config(path: Path = DEMO_CONFIG) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def demo_stage_settings(path: Path = DEMO_CONFIG) -> dict[str, Any]:
    """What one stage of `make demo` does, read from its config: its recipe (LoRA, recovery loss, data sources),
    batches, calibration and evaluation."""
    config = demo_config(path)
    model, data = config["model"], config["data"]
    evals = [c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("TaskEvaluation")]
    lora = {k: v for k, v in model["lora"].items() if v is not None}
    recovery = {k: v for k, v in (model.get("recovery") or {}).items() if v is not None}
    return {"model": model["model"], "steps": model["schedule"]["steps_per_stage"],
            "batch_size": data["batch_size"], "max_length": data["max_length"], "lora": lora, "recovery": recovery,
            "sources": data.get("sources") or [{"kind": "sgr"}], "sgr": data.get("sgr") or {},
            "warmup_steps": model["warmup_steps"], "num_calibration": model["selection"]["num_calibration"],
            "calibration_max_length": model["selection"]["calibration_max_length"],
            "eval_tasks": evals[0]["tasks"], "eval_n": evals[0]["n"], "eval_tokens": evals[0]["max_new_tokens"],
            "eval_batch_size": evals[0].get("batch_size", 32)}


def demo_sgr_tasks(path: Path = DEMO_CONFIG) -> list[str]:
    """The built-in tasks whose training prompts the demo's SGR settings draw from."""
    return list(demo_config(path)["data"]["sgr"]["tasks"])


def demo_sgr_batch_size(path: Path = DEMO_CONFIG) -> int:
    """The batch size the demo's SGR teacher generates with (`data.sgr.batch_size`, else SGRConfig's default)."""
    return SGRConfig(**demo_config(path)["data"]["sgr"]).batch_size


def fp32_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's (shared-once) parameters and buffers at 4 bytes each."""
    return 4 * (sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()))


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec (ru_maxrss would inherit
    the parent's peak across fork + exec); elsewhere ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_cuda_bytes() -> int:
    """Peak GPU memory allocated by this process's tensors so far (0 without CUDA)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0


def stage_figures(timings: dict[str, float], steps_s: float, steps: int, demo_steps: int, eval_n: int,
                  demo_eval_n: int) -> list[Figure]:
    """Overhead share of the measured stage, and of the demo stage: recovery steps scaled to the demo's step
    count and evaluation to its problem count (linear, so an upper bound: larger batches are cheaper per item)."""
    total = sum(timings.values())
    demo_steps_s = steps_s * demo_steps / steps
    demo_total = total - steps_s + demo_steps_s + timings.get("tasks_s", 0.0) * (demo_eval_n / eval_n - 1)
    figures = [Figure("stage_overhead_share", 1 - demo_steps_s / demo_total),
               Figure("stage_overhead_share_measured", 1 - steps_s / total)]
    figures += [Figure(f"stage_share_{k.removesuffix('_s')}", v / total) for k, v in sorted(timings.items())]
    return figures


def stage_worker(spec_path: Path) -> None:
    """Subprocess entry: run one stage, write timings and memory next to the spec."""
    job = json.loads(spec_path.read_text())
    set_threads(job["threads"])
    rss_start = peak_rss_bytes()
    spec = StageSpec(**job["spec"])
    module, timer, fit_s = run_stage(spec, spec_path.parent / "stage_run")
    result = {"timings": module.history[-1].timings, "steps_s": timer.steps_s(), "fit_s": fit_s,
              "peak_rss": peak_rss_bytes(), "peak_rss_training": timer.peak_rss_training,
              "rss_after_imports": rss_start, "peak_cuda": peak_cuda_bytes(),
              "teacher": module.teacher is not None}
    (spec_path.parent / "result.json").write_text(json.dumps(result))


def bench_stage(spec: StageSpec, demo: dict[str, Any], threads: int, weight_bytes: int,
                workdir: Path) -> list[Figure]:
    """A demo stage (the demo's recipe, batches, LoRA, calibration and tasks; fewer steps and problems when asked)
    in a fresh process, so its peak RSS is the stage's own, the teacher's included."""
    job = workdir / "stage" / "job.json"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(json.dumps({"spec": asdict(spec), "threads": threads}))
    subprocess.run([sys.executable, __file__, "--stage-worker", str(job)], check=True)
    result = json.loads((job.parent / "result.json").read_text())
    figures = stage_figures(result["timings"], result["steps_s"], spec.steps, demo["steps"], spec.eval_n,
                            demo["eval_n"])
    figures.append(Figure("stage_teacher_loaded", float(result["teacher"])))
    figures.append(Figure("stage_fit_setup_share", 1 - sum(result["timings"].values()) / result["fit_s"]))
    figures += [Figure(f"stage_{key}_vs_fp32_weights", result[key] / weight_bytes)
                for key in ("peak_rss", "peak_rss_training", "rss_after_imports")]
    if result["peak_cuda"]:
        figures.append(Figure("stage_peak_cuda_memory_vs_fp32_weights", result["peak_cuda"] / weight_bytes))
    return figures


# ---------------------------------------------------------------------------------------------------------------
# 8. Distillation step vs SFT step


def kd_setup(spec: StageSpec) -> tuple[torch.nn.Module, Teacher, Batch, list[int]]:
    """A pruned student with fresh LoRA (one middle layer removed), the unpruned teacher, and the first batch of the
    spec's recovery data (the demo's: few-shot task documents, `batch_size` × up to `max_length` tokens)."""
    placement = Placement(spec.device, spec.dtype)
    data = stage_data(spec)
    data.setup("fit")
    batch = {k: v.to(placement.device) for k, v in next(iter(data.train_dataloader())).items()}
    teacher = Teacher(placement.load(spec.model))
    student = placement.load(spec.model)
    student.config.use_cache = False
    remove_layers(student, [num_layers(student) // 2])
    torch.manual_seed(0)
    student = attach_lora(student, LoraSettings(**spec.lora))
    student.train()
    return student, teacher, batch, list(student.config.gradual_original_layers)


def kd_step(student: torch.nn.Module, objective: RecoveryObjective, batch: Batch, original: list[int]) -> None:
    loss, _ = objective(student, batch, original)
    loss.backward()
    student.zero_grad(set_to_none=True)


def bench_kd_time(setup: tuple[torch.nn.Module, Teacher, Batch, list[int]], rounds: int) -> list[Figure]:
    """Best-of-rounds wall time of a KD step ÷ an SFT step (forward + backward) on the same batch, alternating."""
    student, teacher, batch, original = setup
    objectives = {loss: RecoveryObjective(Recovery(loss=loss), teacher) for loss in ("sft", "kd")}
    for loss in objectives:  # one warm-up step each
        kd_step(student, objectives[loss], batch, original)
    best, _ = alternate({loss: lambda o=o: kd_step(student, o, batch, original) for loss, o in objectives.items()},
                        rounds)
    return [Figure("kd_step_vs_sft_step", best["kd"] / best["sft"]), Figure("kd_step_s", best["kd"]),
            Figure("sft_step_s", best["sft"])]


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def kd_memory_worker(job_path: Path) -> None:
    """Subprocess entry: load student, teacher and batch, then one step of the job's loss; its peak memory above the
    memory before the step goes next to the job. CPU: RSS (Linux VmHWM, reset through /proc/self/clear_refs), with
    every weight paged in first (a memory-mapped teacher would otherwise be counted as the KD step's memory); CUDA:
    the allocator's peak."""
    job = json.loads(job_path.read_text())
    set_threads(job["threads"])
    spec = StageSpec(**job["spec"])
    placement = Placement(spec.device, spec.dtype)
    student, teacher, batch, original = kd_setup(spec)
    objective = RecoveryObjective(Recovery(loss=job["loss"]), teacher)
    with torch.no_grad():  # weights load memory-mapped: page them in now, or the step's peak would count them
        for p in [*student.parameters(), *teacher.model.parameters()]:
            p.sum()
    if placement.cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        kd_step(student, objective, batch, original)
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = current_rss_bytes()
        kd_step(student, objective, batch, original)
        peak = peak_rss_bytes() - before
    (job_path.parent / f"{job['loss']}.json").write_text(json.dumps({"peak_above_start": peak}))


def bench_kd_memory(spec: StageSpec, threads: int, workdir: Path) -> list[Figure]:
    """Peak memory of one KD step ÷ one SFT step, each in a fresh process with the same models and batch loaded."""
    if not Path("/proc/self/clear_refs").exists() and not Placement(spec.device).cuda:
        return []
    peaks = {}
    for loss in ("sft", "kd"):
        path = workdir / "kd" / f"job_{loss}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"spec": asdict(spec), "threads": threads, "loss": loss}))
        subprocess.run([sys.executable, __file__, "--kd-memory-worker", str(path)], check=True)
        peaks[loss] = json.loads((path.parent / f"{loss}.json").read_text())["peak_above_start"]
    return [Figure("kd_step_peak_memory_vs_sft", peaks["kd"] / max(1, peaks["sft"])),
            Figure("kd_step_peak_memory_mb", peaks["kd"] / 2**20), Figure("sft_step_peak_memory_mb",
                                                                         peaks["sft"] / 2**20)]


# ---------------------------------------------------------------------------------------------------------------
# Main


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def choose_threads(requested: str) -> int:
    """`auto`: one thread when the machine is busy (1-min load above half the cores), where extra OpenMP threads
    only spin against other processes; torch's default otherwise."""
    if requested != "auto":
        return int(requested)
    return 1 if os.getloadavg()[0] > (os.cpu_count() or 1) / 2 else torch.get_num_threads()


def machine_figures(start_load: float, runtime: float) -> list[Figure]:
    return [Figure("machine_cpus", float(os.cpu_count() or 0)),
            Figure("machine_torch_threads", float(torch.get_num_threads())),
            Figure("machine_cuda_devices", float(torch.cuda.device_count() if torch.cuda.is_available() else 0)),
            Figure("machine_load_1min_start", start_load), Figure("machine_load_1min_end", os.getloadavg()[0]),
            Figure("bench_runtime_s", runtime)]


def describe_machine(placement: Placement) -> str:
    where = platform.processor() or platform.machine()
    if placement.cuda:
        where += f", {torch.cuda.get_device_name(0)}"
    return (f"{where}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, {placement.device} "
            f"{placement.dtype}, torch {torch.__version__}, load {os.getloadavg()}")


def run(args: argparse.Namespace) -> tuple[list[Figure], dict[str, Any]]:
    """Every comparison; returns the figures and the details (differing items, batch sizes tried, machine)."""
    start, start_load = time.perf_counter(), os.getloadavg()[0]
    sizes = QUICK if args.quick else Sizes()
    placement = Placement(args.device, args.dtype)
    if placement.cuda and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda needs a CUDA device; torch.cuda.is_available() is False")
    threads = choose_threads(args.threads)
    set_threads(threads)
    demo = demo_stage_settings()
    machine = describe_machine(placement)
    print(f"bench: {args.model}, {'quick' if args.quick else 'full'}, {machine}", flush=True)
    details: dict[str, Any] = {"model": args.model, "mode": "quick" if args.quick else "full", "machine": machine}
    tokenizer = load_tokenizer(args.model)
    model = placement.load(args.model)
    figures: list[Figure] = []
    clock = [time.perf_counter()]

    def report(new: list[Figure]) -> None:
        figures.extend(new)
        for f in new:
            print(f.line(), flush=True)
        print(f"  [{time.perf_counter() - clock[0]:.0f} s, load {os.getloadavg()[0]:.1f}]", flush=True)
        clock[0] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="gradual-bench-") as tmp:
        batches = calibration_batches(tokenizer, calibration_texts(None, sizes.calib_texts), 8,
                                      sizes.calib_max_length)
        report(bench_scoring(model, batches, sizes.rounds))
        gen_batch = sizes.gen_batch_size or demo_sgr_batch_size()
        users, prompts = sgr_prompts(tokenizer, demo_sgr_tasks(), gen_batch * sizes.gen_batches)
        gen_figures, responses, details["generation"] = bench_generation(
            model, tokenizer, prompts, sizes.gen_tokens, gen_batch, sizes.slow_rounds, sizes.gen_batch1)
        report(gen_figures)
        ids = torch.tensor([encode_prompt(tokenizer, prompts[0])])
        ks = [k for k in sizes.prune if k < num_layers(model) - 1]  # a small test model keeps two layers
        report(bench_pruned_decode(model, ids, sizes.decode_tokens, ks, sizes.rounds))
        eval_figures, details["evaluation"] = bench_evaluation(
            model, tokenizer, sizes.eval_tasks, sizes.eval_n, sizes.eval_tokens, sizes.lm_eval_batch_sizes,
            sizes.slow_rounds, Path(tmp))
        report(eval_figures)
        weight_bytes = fp32_weight_bytes(model)
        del model
        pairs = [{"prompt": u, "response": r} for u, r in zip(users, responses, strict=True)]
        recovery = StageSpec(args.model, pairs, steps=sizes.train_steps, batch_size=sizes.train_batch,
                             max_length=sizes.train_max_length, lora=demo["lora"], warmup_steps=demo["warmup_steps"],
                             device=placement.device, dtype=placement.dtype)
        report(bench_recovery(recovery, sizes.slow_rounds, Path(tmp)))
        stage_settings = {**demo, "model": args.model, "pairs": [], "device": placement.device,
                          "dtype": placement.dtype}
        stage = StageSpec(**{**stage_settings, "steps": sizes.stage_steps or demo["steps"],
                             "eval_n": sizes.stage_eval_n or demo["eval_n"], "checkpoint": True})
        report(bench_stage(stage, demo, threads, weight_bytes, Path(tmp)))
        kd = StageSpec(**{**stage_settings, "batch_size": sizes.kd_batch or demo["batch_size"]})
        report(bench_kd_time(kd_setup(kd), sizes.rounds))
        report(bench_kd_memory(kd, threads, Path(tmp)))
        report(machine_figures(start_load, time.perf_counter() - start))
    return figures, details


def print_differences(details: dict[str, Any]) -> None:
    """The items whose outcomes differ between gradual and the baseline, with the reason (also in the details)."""
    gen = details.get("generation", {}).get("differences", [])
    if gen:
        print(f"sgr generation: {len(gen)} completion(s) differ from HF batched generate")
    for form in ("generative", "classification"):
        entry = details.get("evaluation", {}).get(form, {})
        for d in entry.get("differences", []):
            print(f"evaluation {form}: {d['task']} item {d['item']} differs: {d['why']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller inputs (a fast look)")
    parser.add_argument("--out", default="bench.json", help="where to write the figures (JSON)")
    parser.add_argument("--details", help="where to write differing items, batch sizes tried and the machine "
                                          "(JSON; default: next to --out as <name>.details.json)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name as gradual loads it")
    parser.add_argument("--threads", default="auto", help="torch threads; auto = 1 on a busy machine")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (scripts/gpu_check.py)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="weights dtype (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--stage-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kd-memory-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage_worker:
        stage_worker(args.stage_worker)
        return 0
    if args.kd_memory_worker:
        kd_memory_worker(args.kd_memory_worker)
        return 0
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # HFLM warns on every call that it got a model object
    figures, details = run(args)
    out = Path(args.out)
    out.write_text(json.dumps(figures_json(figures), indent=2) + "\n")
    details_path = Path(args.details) if args.details else out.with_name(f"{out.stem}.details.json")
    details_path.write_text(json.dumps(details, indent=2, default=str) + "\n")
    print_differences(details)
    missed = [f.name for f in figures if f.met() is False]
    print(f"wrote {out} and {details_path}; targets missed: {', '.join(missed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
