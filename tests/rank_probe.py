"""Test helpers for `gradual fit` runs: a callback that records what each rank saw, and a local lm-eval task.

`RankProbe` is listed after the evaluating callbacks of a run; every rank writes `rank<k>.json` into `out_dir` at
train end: per step the local loss, the (DDP-synchronised) adapter gradients and the number of 4-bit layers, per
stage the removed layers, a checksum of the merged weights and the verdicts, and the recovery pairs the rank
trained on. Subprocess runs import it with `tests/` on PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import lightning as L
import torch
from helpers import pairs_of
from lightning.pytorch.callbacks import Callback

LM_EVAL_TASK = "gradual_fit_mc"


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_4bit(model: torch.nn.Module) -> int:
    """bitsandbytes 4-bit layers (not peft's LoRA wrappers of them, which share the class name)."""
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


class RankProbe(Callback):
    """Record per rank what the loop did; `out_dir` gets `rank<k>.json` at train end."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.steps: list[dict[str, Any]] = []
        self.stages: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        ids = batch["input_ids"].contiguous().numpy().tobytes()
        self.steps.append({"stage": pl_module.stage, "batch": hashlib.sha256(ids).hexdigest()})

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under FSDP the gradients are shards: gathered here (every rank calls this hook) to compare them whole."""
        from torch.distributed.tensor import DTensor

        trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        whole = [(n, p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in trainable]
        self.steps[-1].update(
            loss=pl_module._losses[-1], wrapper=type(trainer.strategy.model).__name__, trainable=len(trainable),
            sharded=sum(isinstance(p, DTensor) for _, p in trainable), linear4bit=count_4bit(pl_module.model),
            grads={n: None if g is None else float(g.double().sum()) for n, g in whole})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Runs before the module's own hook merges the adapters, so lora_B is still there (0 at init)."""
        b = [p.detach().abs().max() for n, p in pl_module.named_parameters() if "lora_B" in n]
        if b and "loss" in self.steps[-1]:
            self.steps[-1]["lora_b_max"] = float(torch.stack(b).max())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = pl_module.history[-1]
        self.stages.append({"stage": record.stage, "removed": record.removed, "kept": record.kept,
                            "checksum": weights_checksum(pl_module.model),
                            "linear4bit": count_4bit(pl_module.model),
                            "scores": {k: v["score"] for k, v in record.scores.items()},
                            "retention": record.retention, "should_stop": trainer.should_stop})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Each stage's verdict is decided after every callback's `on_train_epoch_end`: read here, all concluded."""
        for row in self.stages:
            row["meets_threshold"] = pl_module.history[row["stage"]].meets_threshold
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pairs = pairs_of(trainer.datamodule)
        data = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": self.steps,
                "stages": self.stages, "num_pairs": len(pairs),
                "pairs": hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest(),
                "baseline": {k: v["score"] for k, v in pl_module.history[0].scores.items()},
                "stop_reason": pl_module.stop_reason, "chosen_stage": pl_module.chosen_stage()}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(data, indent=1))


def probe_callback(out_dir: Path) -> dict[str, Any]:
    """The config entry of a RankProbe writing into `out_dir`."""
    return {"class_path": "rank_probe.RankProbe", "init_args": {"out_dir": str(out_dir)}}


def write_successor_rows(root: Path) -> Path:
    """`root/data.jsonl`: 8 "what comes after n" questions with 2 choices (the right one first), for local tasks."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"What number comes after {n}?", "choices": [str(n + 1), str(n + 5)], "label": 0}
            for n in range(1, 9)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def write_lm_eval_task(root: Path) -> Path:
    """A tiny offline multiple-choice lm-eval task (`LM_EVAL_TASK`): 8 "what comes after n" questions, 2 choices."""
    data = write_successor_rows(root)
    (root / "fit_mc.yaml").write_text(
        f"task: {LM_EVAL_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return root


def lm_eval_callback(include_path: Path) -> dict[str, Any]:
    """The config entry of an LmEvalEvaluation on the local task."""
    return {"class_path": "gradual.callbacks.LmEvalEvaluation",
            "init_args": {"tasks": [LM_EVAL_TASK], "include_path": str(include_path), "batch_size": 8}}


class RejectEveryStage(Callback):
    """A stop rule that fails every pruned stage (the loop then rolls back to stage 0), independent of how a random
    tiny model happens to score."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.propose(False, f"stage {pl_module.stage} rejected")
        trainer.should_stop = True


class RejectConsolidation(Callback):
    """Accept every removal stage and reject the consolidation stage (`schedule.final_steps`)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.record.consolidation:
            pl_module.propose(True)
            return
        pl_module.propose(False, "consolidation rejected")
        trainer.should_stop = True


class FirstStepGradients(Callback):
    """Write the first optimizer step's accumulated (and, under DDP, all-reduced) gradients of the trainable weights,
    before clipping, to `out_dir/grads_rank<k>.safetensors`, and the counted targets of each micro-batch of that step
    to `out_dir/targets_rank<k>.json`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.targets: list[int] = []
        self.done = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.done:
            self.targets.append(int((batch["labels"][:, 1:] != -100).sum()))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        from safetensors.torch import save_file

        if self.done:
            return
        self.done = True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        grads = {n: p.grad.detach().clone().contiguous() for n, p in pl_module.named_parameters()
                 if p.requires_grad and p.grad is not None}
        save_file(grads, str(self.out_dir / f"grads_rank{trainer.global_rank}.safetensors"))
        (self.out_dir / f"targets_rank{trainer.global_rank}.json").write_text(json.dumps(self.targets))
