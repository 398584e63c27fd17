"""Performance of gradual as ratios measured side by side in one run, so a busy machine changes little.

Every comparison runs its candidates alternately (A B, B A, ...) for a few rounds and keeps each one's best time
(decode speed: all variants step in turn, one token each, and the median step counts). Absolute times on a shared
machine mean little; the ratios are what `bench.json` records. Everything runs on the CPU:

1. layer scoring (block influence, angular distance) ÷ one plain forward pass over the same batches (<= 1.3)
2. SGR generation: tokens/s of gradual's batched `generate` ÷ a batch-1 `model.generate` loop, greedy (>= 5)
3. recovery training: tokens/s of a real Lightning stage (GradualModule + RecoveryDataModule) ÷ a bare
   PyTorch + peft loop on the same batches with the same LoRA and optimizer (>= 0.9)
4. decode tokens/s with k of L layers removed ÷ unpruned, as a share of the ideal L / (L − k) (>= 0.9)
5. built-in task evaluation ÷ one-item-at-a-time evaluation (>= 5)
6. a demo stage's wall time not spent in recovery steps (<= 0.25), from a real one-stage fit in a subprocess
7. that subprocess's peak RSS ÷ the model's fp32 weight size (reported)
8. distillation: a KD recovery step (teacher forward + chunked forward KL) ÷ an SFT step on the same batch, in time
   (<= 1.5) and in the step's peak memory above the loaded models (<= 1.3; each measured in a fresh process)

Usage: `python scripts/bench.py [--quick] [--out bench.json] [--model NAME] [--threads N|auto]`; results and
their explanation: docs/bench.md.
"""

from __future__ import annotations

import argparse
import copy
import json
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
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from gradual.callbacks import StageCheckpoint, TaskEvaluation  # noqa: E402  # isort: skip
from gradual.datamodule import RecoveryDataModule  # noqa: E402
from gradual.distill import Recovery, RecoveryObjective, Teacher  # noqa: E402
from gradual.generation import DecodingConfig, end_ids, format_prompt, generate, truncate_at_stop  # noqa: E402
from gradual.importance import calibration_batches, calibration_texts, score_layers  # noqa: E402
from gradual.lora import LoraSettings, attach_lora  # noqa: E402
from gradual.models import load_model, load_tokenizer  # noqa: E402
from gradual.module import GradualModule  # noqa: E402
from gradual.sgr import SGRConfig, load_prompts  # noqa: E402
from gradual.stages import Schedule, Selection  # noqa: E402
from gradual.surgery import num_layers, remove_layers  # noqa: E402
from gradual.tasks.builtin import get_task  # noqa: E402
from gradual.tasks.evaluate import FEWSHOT_STOP, answer_text, build_prompt, choice_text, evaluate  # noqa: E402
from gradual.tasks.extract import classify_failure  # noqa: E402
from gradual.tasks.scoring import encode_pair  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
Batch = dict[str, torch.Tensor]
TARGETS: dict[str, str] = {
    "scoring_block_influence_vs_forward": "<= 1.3",
    "scoring_angular_distance_vs_forward": "<= 1.3",
    "sgr_generation_speedup": ">= 5",
    "recovery_tokens_per_s_vs_bare": ">= 0.9",
    "pruned_decode_k4_vs_ideal": ">= 0.9",
    "pruned_decode_k8_vs_ideal": ">= 0.9",
    "evaluation_speedup": ">= 5",
    "stage_overhead_share": "<= 0.25",
    "kd_step_vs_sft_step": "<= 1.5",
    "kd_step_peak_memory_vs_sft": "<= 1.3",
}
"""Figures with a target (the issue's); every other figure is reported only."""


# ---------------------------------------------------------------------------------------------------------------
# Figures and timing


@dataclass
class Figure:
    """One number of the bench; `target` like ">= 5" or "<= 1.3", None for a reported-only figure."""

    name: str
    value: float
    target: str | None = None

    def __post_init__(self) -> None:
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


def alternate(candidates: dict[Any, Callable[[], Any]], rounds: int) -> tuple[dict[Any, float], dict[Any, Any]]:
    """Best wall time of each candidate over `rounds`, running them in turn and reversing the order every round,
    so a load change hits all of them alike. Also returns each candidate's last result."""
    best = dict.fromkeys(candidates, float("inf"))
    results: dict[str, Any] = {}
    names = list(candidates)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            results[name] = candidates[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


@dataclass
class Sizes:
    """How much work each comparison does; `quick` is for a fast look, the default for the committed figures."""

    rounds: int = 3  # best-of rounds of the cheap comparisons (scoring, decode)
    slow_rounds: int = 2  # best-of rounds of the comparisons whose baseline is slow (generation, training, eval)
    calib_texts: int = 8
    calib_max_length: int = 64
    gen_prompts: int = 32  # one batch of the demo's SGR generation batch size
    gen_tokens: int = 24
    decode_tokens: int = 24
    prune: tuple[int, ...] = (4, 8)
    train_steps: int = 6  # steps 1.. are timed: 5 steps keep one slow step from deciding the ratio
    train_batch: int = 4
    train_max_length: int = 128
    eval_tasks: tuple[str, ...] = ("successor", "copy")
    eval_n: int = 20
    eval_rounds: int = 1  # the one-item-at-a-time baseline takes minutes
    eval_tokens: int = 16
    stage_steps: int | None = None  # None: the demo's own steps per stage, so the stage is measured, not projected
    stage_eval_n: int | None = None  # None: the demo's own problems per task


QUICK = Sizes(rounds=2, slow_rounds=1, calib_texts=8, gen_prompts=6, gen_tokens=16, decode_tokens=12,
              train_steps=2, train_batch=2, train_max_length=96, eval_tasks=("successor",), eval_n=2,
              eval_rounds=1, stage_steps=2, stage_eval_n=1)


# ---------------------------------------------------------------------------------------------------------------
# 1. Layer scoring


@torch.inference_mode()
def plain_forward(model: torch.nn.Module, batches: Sequence[Batch]) -> None:
    """The reference: one forward pass over the batches, nothing captured."""
    model.eval()
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)


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
def plain_generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                   stop: Sequence[str] = ()) -> list[str]:
    """The baseline: each prompt alone through `model.generate`, greedy, cut at the first end id."""
    model.eval()
    ends = end_ids(model, tokenizer)
    extra = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    texts = []
    for p in prompts:
        enc = tokenizer(p, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id, **extra)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in ends), len(new))
        texts.append(truncate_at_stop(tokenizer.decode(new[:cut], skip_special_tokens=True), stop))
    return texts


def sgr_prompts(tokenizer: Any, tasks: Sequence[str], n: int) -> tuple[list[str], list[str]]:
    """`n` recovery prompts mixed across `tasks` (training split): (user messages, chat-formatted prompts)."""
    items = load_prompts(SGRConfig(tasks=list(tasks), n_per_task=max(1, -(-n // len(tasks)))))
    step = max(1, len(items) // n)
    users = [it.prompt for it in items[::step][:n]]
    return users, [format_prompt(tokenizer, u) for u in users]


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def bench_generation(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                     rounds: int) -> tuple[list[Figure], list[str]]:
    """Batched (one batch of all prompts) vs batch-1 greedy; returns the figures and the batched completions."""
    config = DecodingConfig(do_sample=False, max_new_tokens=max_new_tokens)
    times, out = alternate({
        "batched": lambda: [r[0] for r in generate(model, tokenizer, prompts, config, batch_size=len(prompts),
                                                    progress=False)],
        "single": lambda: plain_generate(model, tokenizer, prompts, max_new_tokens),
    }, rounds)
    rate = {k: count_tokens(tokenizer, out[k]) / times[k] for k in times}
    agree = sum(a == b for a, b in zip(out["batched"], out["single"], strict=True)) / len(prompts)
    lengths = [count_tokens(tokenizer, [t]) for t in out["batched"]]
    return [Figure("sgr_generation_speedup", rate["batched"] / max(rate["single"], 1e-9)),
            Figure("sgr_generation_agreement", agree),
            Figure("sgr_generation_batch_fill", sum(lengths) / max(1, len(lengths) * max(lengths)))], out["batched"]


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

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Batch,
                             batch_idx: int) -> None:
        self.batches.append({k: v.detach().clone() for k, v in batch.items()})
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Batch,
                           batch_idx: int) -> None:
        self.ends.append(time.perf_counter())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Runs before the evaluation and checkpoint callbacks: the peak so far is that of scoring + training."""
        self.peak_rss_training = peak_rss_bytes()

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
    """One pruning stage: what a demo stage does, with steps and evaluation size as given."""

    model: str
    pairs: list[dict[str, str]]
    steps: int
    batch_size: int
    max_length: int
    lora: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 3
    num_calibration: int = 8
    calibration_max_length: int = 32
    eval_tasks: list[str] = field(default_factory=list)
    eval_n: int = 1
    eval_tokens: int = 16
    eval_batch_size: int = 32
    checkpoint: bool = False


def run_stage(spec: StageSpec, run_dir: Path) -> tuple[GradualModule, StepTimer]:
    """One stage through the real Lightning path: score, remove one layer, LoRA steps, merge, and optionally the
    evaluation and checkpoint callbacks of a `gradual fit` run."""
    module = GradualModule(model=spec.model, schedule=Schedule(max_layers=1, steps_per_stage=spec.steps),
                           selection=Selection(num_calibration=spec.num_calibration,
                                               calibration_max_length=spec.calibration_max_length),
                           lora=LoraSettings(**spec.lora), warmup_steps=spec.warmup_steps, run_dir=str(run_dir),
                           overwrite=True)
    data = RecoveryDataModule(pairs=spec.pairs, batch_size=spec.batch_size, samples_per_epoch=spec.batch_size,
                              max_length=spec.max_length)
    data.set_tokenizer(load_tokenizer(spec.model))
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if spec.eval_tasks:
        callbacks.append(StageEvaluation(spec.eval_tasks, n=spec.eval_n, max_new_tokens=spec.eval_tokens,
                                         batch_size=spec.eval_batch_size, progress=False))
    if spec.checkpoint:
        callbacks.append(StageCheckpoint())
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=1, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=spec.checkpoint, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        limit_val_batches=0, reload_dataloaders_every_n_epochs=1, callbacks=callbacks)
    module.check_run_dir()
    trainer.fit(module, datamodule=data)
    return module, timer


def bare_loop(spec: StageSpec, removed: Sequence[int], batches: Sequence[Batch], seed: int = 1) -> float:
    """The same steps by hand: same model, same removed layer, same LoRA, AdamW, warm-up, clipping and batches.

    Returns tokens/s over steps 1.. (as `StepTimer.steady_rate`)."""
    model = load_model(spec.model)
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
        starts.append(time.perf_counter())
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
                module, timer = run_stage(spec, workdir / f"recovery_{r}")
                rates["lightning"] = max(rates["lightning"], timer.steady_rate())
                batches, removed = timer.batches, module.history[-1].removed
            else:
                rates["bare"] = max(rates["bare"], bare_loop(spec, removed, batches))
    return [Figure("recovery_tokens_per_s_vs_bare", rates["lightning"] / rates["bare"])]


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
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            state[k] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
            steps[k].append(time.perf_counter() - start)
    return steps


def bench_pruned_decode(model: torch.nn.Module, ids: torch.Tensor, tokens: int, ks: Sequence[int],
                        rounds: int) -> list[Figure]:
    """Decode tokens/s with k layers removed (the layers just below the last one) vs unpruned, from the median
    decode step over all rounds. Every variant, the unpruned one included, is a fresh copy of `model`, so all
    sit in memory allocated the same way (a freshly loaded model can be slower than its copy)."""
    depth = num_layers(model)
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
    return figures


# ---------------------------------------------------------------------------------------------------------------
# 5. Evaluation


@torch.inference_mode()
def choice_logprob(model: torch.nn.Module, tokenizer: Any, context: str, continuation: str) -> float:
    """Summed log-probability of a continuation from one full forward pass of context + continuation."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    logits = model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]
    return float(F.log_softmax(logits.float(), dim=-1)[torch.arange(len(cont)), torch.tensor(cont)].sum())


def _problems(tasks: Sequence[str], n: int) -> list[tuple[Any, Any]]:
    return [(get_task(name), p) for name in tasks for p in get_task(name).problems("eval", n, 0)]


def single_generative(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], n: int,
                      max_new_tokens: int) -> list[bool]:
    """Baseline, generative form: each problem alone through `model.generate`, with gradual's prompt and answer
    check. Per problem: answered correctly."""
    out = []
    for task, p in _problems(tasks, n):
        prompt = build_prompt(task, p, tokenizer, "fewshot")
        reply = plain_generate(model, tokenizer, [prompt], max_new_tokens, FEWSHOT_STOP)[0]
        out.append(classify_failure(task.kind, answer_text(reply, "fewshot"), p.answer, task.labels,
                                    p.brackets) == "correct")
    return out


def single_classification(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], n: int) -> list[int]:
    """Baseline, classification form: every choice of every problem scored by its own forward pass.
    Per problem: the chosen index."""
    model.eval()
    out = []
    for task, p in _problems(tasks, n):
        prompt = build_prompt(task, p, tokenizer, "fewshot")
        scores = [choice_logprob(model, tokenizer, prompt, choice_text(prompt, c)) for c in p.choices]
        out.append(max(range(len(scores)), key=scores.__getitem__))
    return out


def builtin_eval(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], n: int, max_new_tokens: int,
                 form: str) -> list[bool] | list[int]:
    """gradual's `evaluate` in one form (batched generation, or prefix-cached choices), as per-problem outcomes."""
    res = evaluate(model, tokenizer, tasks, n=n, forms=(form,), max_new_tokens=max_new_tokens, batch_size=32,
                   progress=False, records=True)
    if form == "generative":
        return [r["failure"] == "correct" for t in tasks for r in res[t].records]
    return [r["predicted"] for t in tasks for r in res[f"mc_{t}"].records]


def bench_evaluation(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], n: int, max_new_tokens: int,
                     rounds: int) -> list[Figure]:
    """Both forms, built-in vs one item at a time; the speedup of the whole and of each form, and how often the
    two agree on an item's outcome (should be 1 in fp32)."""
    times, out = alternate({
        "builtin_gen": lambda: builtin_eval(model, tokenizer, tasks, n, max_new_tokens, "generative"),
        "single_gen": lambda: single_generative(model, tokenizer, tasks, n, max_new_tokens),
        "builtin_mc": lambda: builtin_eval(model, tokenizer, tasks, n, max_new_tokens, "classification"),
        "single_mc": lambda: single_classification(model, tokenizer, tasks, n),
    }, rounds)
    pairs = [*zip(out["builtin_gen"], out["single_gen"], strict=True),
             *zip(out["builtin_mc"], out["single_mc"], strict=True)]
    total = (times["single_gen"] + times["single_mc"]) / (times["builtin_gen"] + times["builtin_mc"])
    return [Figure("evaluation_speedup", total),
            Figure("evaluation_speedup_generative", times["single_gen"] / times["builtin_gen"]),
            Figure("evaluation_speedup_classification", times["single_mc"] / times["builtin_mc"]),
            Figure("evaluation_agreement", sum(a == b for a, b in pairs) / len(pairs))]


# ---------------------------------------------------------------------------------------------------------------
# 6 and 7. A demo stage, in its own process


def demo_stage_settings(path: Path = DEMO_CONFIG) -> dict[str, Any]:
    """What one stage of `make demo` does, read from its config."""
    config = yaml.safe_load(path.read_text())
    model, data = config["model"], config["data"]
    evals = [c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("TaskEvaluation")]
    lora = {k: v for k, v in model["lora"].items() if v is not None}
    return {"model": model["model"], "steps": model["schedule"]["steps_per_stage"],
            "batch_size": data["batch_size"], "max_length": data["max_length"], "lora": lora,
            "warmup_steps": model["warmup_steps"], "num_calibration": model["selection"]["num_calibration"],
            "calibration_max_length": model["selection"]["calibration_max_length"],
            "eval_tasks": evals[0]["tasks"], "eval_n": evals[0]["n"], "eval_tokens": evals[0]["max_new_tokens"],
            "eval_batch_size": evals[0].get("batch_size", 32)}


def demo_sgr_tasks(path: Path = DEMO_CONFIG) -> list[str]:
    """The built-in tasks whose training prompts the demo's recovery data comes from."""
    return list(yaml.safe_load(path.read_text())["data"]["sgr"]["tasks"])


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
    module, timer = run_stage(spec, spec_path.parent / "stage_run")
    result = {"timings": module.history[-1].timings, "steps_s": timer.steps_s(), "peak_rss": peak_rss_bytes(),
              "peak_rss_training": timer.peak_rss_training, "rss_after_imports": rss_start}
    (spec_path.parent / "result.json").write_text(json.dumps(result))


def bench_stage(spec: StageSpec, demo: dict[str, Any], threads: int, weight_bytes: int,
                workdir: Path) -> list[Figure]:
    """A demo stage (the demo's batches, LoRA, calibration and tasks; fewer steps and problems) in a fresh
    process, so its peak RSS is the stage's own."""
    job = workdir / "stage" / "job.json"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(json.dumps({"spec": asdict(spec), "threads": threads}))
    subprocess.run([sys.executable, __file__, "--stage-worker", str(job)], check=True)
    result = json.loads((job.parent / "result.json").read_text())
    figures = stage_figures(result["timings"], result["steps_s"], spec.steps, demo["steps"], spec.eval_n,
                            demo["eval_n"])
    return figures + [Figure(f"stage_{key}_vs_fp32_weights", result[key] / weight_bytes)
                      for key in ("peak_rss", "peak_rss_training", "rss_after_imports")]


# ---------------------------------------------------------------------------------------------------------------
# 8. Distillation step vs SFT step


def kd_setup(model_name: str, pairs: list[dict[str, str]], batch_size: int, max_length: int,
             lora: dict[str, Any]) -> tuple[torch.nn.Module, Teacher, Batch, list[int]]:
    """A pruned student with fresh LoRA (one middle layer removed), the unpruned teacher, one recovery batch."""
    data = RecoveryDataModule(pairs=pairs, batch_size=batch_size, samples_per_epoch=batch_size,
                              max_length=max_length)
    data.set_tokenizer(load_tokenizer(model_name))
    batch = next(iter(data.train_dataloader()))
    teacher = Teacher(load_model(model_name))
    student = load_model(model_name)
    student.config.use_cache = False
    remove_layers(student, [num_layers(student) // 2])
    torch.manual_seed(0)
    student = attach_lora(student, LoraSettings(**lora))
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
    """Subprocess entry: load student, teacher and batch, then one step of the job's loss; its peak RSS above the
    RSS before the step (Linux VmHWM, reset through /proc/self/clear_refs) goes next to the job."""
    job = json.loads(job_path.read_text())
    set_threads(job["threads"])
    student, teacher, batch, original = kd_setup(job["model"], job["pairs"], job["batch_size"], job["max_length"],
                                                 job["lora"])
    objective = RecoveryObjective(Recovery(loss=job["loss"]), teacher)
    Path("/proc/self/clear_refs").write_text("5")
    before = current_rss_bytes()
    kd_step(student, objective, batch, original)
    (job_path.parent / f"{job['loss']}.json").write_text(json.dumps({"peak_above_start": peak_rss_bytes() - before}))


def bench_kd_memory(job: dict[str, Any], workdir: Path) -> list[Figure]:
    """Peak memory of one KD step ÷ one SFT step, each in a fresh process with the same models loaded."""
    if not Path("/proc/self/clear_refs").exists():
        return []
    peaks = {}
    for loss in ("sft", "kd"):
        path = workdir / "kd" / f"job_{loss}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**job, "loss": loss}))
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
    return [Figure("machine_cpus", float(os.cpu_count() or 0)), Figure("machine_torch_threads",
                                                                       float(torch.get_num_threads())),
            Figure("machine_load_1min_start", start_load), Figure("machine_load_1min_end", os.getloadavg()[0]),
            Figure("bench_runtime_s", runtime)]


def run(args: argparse.Namespace) -> list[Figure]:
    start, start_load = time.perf_counter(), os.getloadavg()[0]
    sizes = QUICK if args.quick else Sizes()
    threads = choose_threads(args.threads)
    set_threads(threads)
    demo = demo_stage_settings()
    print(f"bench: {args.model}, {'quick' if args.quick else 'full'}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, load {os.getloadavg()}", flush=True)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    figures: list[Figure] = []

    clock = [time.perf_counter()]

    def report(new: list[Figure]) -> None:
        figures.extend(new)
        for f in new:
            print(f.line(), flush=True)
        print(f"  [{time.perf_counter() - clock[0]:.0f} s, load {os.getloadavg()[0]:.1f}]", flush=True)
        clock[0] = time.perf_counter()

    batches = calibration_batches(tokenizer, calibration_texts(None, sizes.calib_texts), 8, sizes.calib_max_length)
    report(bench_scoring(model, batches, sizes.rounds))
    users, prompts = sgr_prompts(tokenizer, demo_sgr_tasks(), sizes.gen_prompts)
    gen_figures, responses = bench_generation(model, tokenizer, prompts, sizes.gen_tokens, sizes.slow_rounds)
    report(gen_figures)
    ids = tokenizer(prompts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    report(bench_pruned_decode(model, ids, sizes.decode_tokens, sizes.prune, sizes.rounds))
    report(bench_evaluation(model, tokenizer, sizes.eval_tasks, sizes.eval_n, sizes.eval_tokens, sizes.eval_rounds))
    weight_bytes = fp32_weight_bytes(model)
    del model
    pairs = [{"prompt": u, "response": r} for u, r in zip(users, responses, strict=True)]
    with tempfile.TemporaryDirectory(prefix="gradual-bench-") as tmp:
        recovery = StageSpec(args.model, pairs, steps=sizes.train_steps, batch_size=sizes.train_batch,
                             max_length=sizes.train_max_length, lora=demo["lora"], warmup_steps=demo["warmup_steps"])
        report(bench_recovery(recovery, sizes.slow_rounds, Path(tmp)))
        stage = StageSpec(**{**demo, "model": args.model, "pairs": pairs, "steps": sizes.stage_steps or demo["steps"],
                             "eval_n": sizes.stage_eval_n or demo["eval_n"], "checkpoint": True})
        report(bench_stage(stage, demo, threads, weight_bytes, Path(tmp)))
        kd_job = {"model": args.model, "pairs": pairs, "batch_size": sizes.train_batch,
                  "max_length": sizes.train_max_length, "lora": demo["lora"], "threads": threads}
        report(bench_kd_time(kd_setup(args.model, pairs, sizes.train_batch, sizes.train_max_length, demo["lora"]),
                             sizes.rounds))
        report(bench_kd_memory(kd_job, Path(tmp)))
    report(machine_figures(start_load, time.perf_counter() - start))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller inputs (a fast look)")
    parser.add_argument("--out", default="bench.json", help="where to write the figures (JSON)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name as gradual loads it")
    parser.add_argument("--threads", default="auto", help="torch threads; auto = 1 on a busy machine")
    parser.add_argument("--stage-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kd-memory-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage_worker:
        stage_worker(args.stage_worker)
        return 0
    if args.kd_memory_worker:
        kd_memory_worker(args.kd_memory_worker)
        return 0
    figures = run(args)
    Path(args.out).write_text(json.dumps(figures_json(figures), indent=2) + "\n")
    missed = [f.name for f in figures if f.met() is False]
    print(f"wrote {args.out}; targets missed: {', '.join(missed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
