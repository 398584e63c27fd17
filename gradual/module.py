"""The LightningModule that owns the model through the prune → heal cycle: the Lightning hooks and the stage logic.

One Lightning epoch is one pruning stage: at its start the module scores the current layers (the layer choice:
`choose_layers`), removes the chosen ones, makes the chosen weights trainable and rebuilds the optimizer; it trains
the stage's steps on the recovery objective (`gradual.distill`) and, after the stage's last batch, merges the
adapters into the base weights. Callbacks then observe the merged model and record through the module's
`StageHistory` API (evaluate, propose a verdict, checkpoint; contract in `gradual.callbacks`); the verdict is
decided once, in `conclude_stage`, after all of them. Stage 0 is the unpruned model, evaluated by the callbacks at
train start.

Elsewhere: the plan and the records in `gradual.stages`, the run directory and resume in `gradual.rundir`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch.nn.parallel import DistributedDataParallel

from gradual import identity, models, onpolicy, pipeline, rundir, sharding, surgery
from gradual.datamodule import GradualDataModule, RecoveryDataModule
from gradual.distill import Recovery, RecoveryObjective, Teacher
from gradual.errors import UsageError
from gradual.lightning_compat import rewrap_ddp, start_at_epoch
from gradual.lora import LoraSettings, dequantize, has_4bit
from gradual.repair import check_settings
from gradual.retention import METRIC
from gradual.stages import TRAINING, Schedule, Selection, StageHistory, StageRecord


class GradualModule(StageHistory, L.LightningModule):
    """Owns the HF model, its LoRA life cycle and the stage history (`StageHistory`: the API callbacks record through;
    `gradual.stages.StageLoop` names what callbacks may use of it).

    Args:
        model: HF hub id, local path, an offline alias (`smollm2-135m-instruct`, `gemma3-270m`) or `tiny:<arch>`
            (tests).
        dtype: weights dtype for loading and saving (`float32`, `bfloat16`, `float16`, `auto`).
        quantize: `nf4` for QLoRA (4-bit base through bitsandbytes); merged stages are saved de-quantised.
        trust_remote_code: run the model repository's own code (off unless you trust it).
        schedule: how many layers go per stage and in total, and the recovery steps per stage.
        selection: the importance metric and its data, used on the current model at every stage (or once, on the
            unpruned model, with `rescore: false`).
        lora: LoRA adapter settings (fresh adapters every stage, merged at its end).
        recovery: how a stage heals: what a recovery step minimises (`sft`, the data's tokens as in the paper; `kd`,
            forward KL to the original model, loaded once as a frozen teacher, or with `teacher: previous` to a
            frozen copy of the model each stage starts from; `kd+sft`), which weights train (`lora`, `full`,
            `near_cut`), and the share of on-policy batches (`on_policy`: the student samples, the teacher scores
            every generated token; `gradual.onpolicy`).
        optimizer: optimizer factory (defaults to the paper's AdamW: lr 2e-4, betas (0.9, 0.99), wd 1e-4).
        lr_scheduler: scheduler factory (defaults to linear warm-up over `warmup_steps`, then constant).
        warmup_steps: warm-up steps of the default scheduler, restarted with every stage's fresh adapters.
        run_dir: where stages, the final model and reports go.
        overwrite: allow replacing a run directory that holds a different run.
        seed: seeds scoring ties, LoRA init and dropout per stage, so a resumed run matches an uninterrupted one.
        repair: `lstsq` repairs every cut before training by a least-squares map folded into the down projection
            of the block before it (ReplaceMe, `gradual.repair`), on the selection's calibration data; or null.
    """

    def __init__(self, model: str = "smollm2-135m-instruct", dtype: str = "float32", quantize: str | None = None,
                 trust_remote_code: bool = False, schedule: Schedule = Schedule(), selection: Selection = Selection(),
                 lora: LoraSettings = LoraSettings(), recovery: Recovery = Recovery(),
                 optimizer: OptimizerCallable | None = None, lr_scheduler: LRSchedulerCallable | None = None,
                 warmup_steps: int = 50, run_dir: str = "runs/gradual", overwrite: bool = False,
                 seed: int = 0, repair: str | None = None) -> None:
        super().__init__()
        self.model_name = model
        self.dtype_name = models.check_dtype(dtype, "model.dtype")
        self.quantize = quantize
        self.trust_remote_code = trust_remote_code
        # copies: the defaults are shared instances (dataclass defaults make `gradual fit --help` list every field)
        self.schedule, self.selection = copy.deepcopy(schedule), copy.deepcopy(selection)
        self.lora, self.recovery = copy.deepcopy(lora), copy.deepcopy(recovery)
        self.teacher: Teacher | None = None  # the original model
        self.stage_teacher: Teacher | None = None  # `recovery.teacher: previous`: the current stage's starting model
        self.objective: RecoveryObjective | None = None
        self.on_policy = onpolicy.OnPolicy(self.recovery, seed) if self.recovery.on_policy > 0 else None
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.warmup_steps = warmup_steps
        self.run_dir = Path(run_dir)
        self.overwrite = overwrite
        self.seed = seed
        self.repair = repair
        self.schedule.validate()
        models.check_quantize(quantize, "model.quantize")
        self.original0 = models.original_layers(model, trust_remote_code=trust_remote_code)
        self.depth0 = len(self.original0)
        check_settings(repair, model, quantize, trust_remote_code=trust_remote_code)
        self.schedule.validate(self.original0)
        protected = self.selection.protect_first + self.selection.protect_last if schedule.layers is None else 0
        self.plan = self.schedule.stages(self.depth0, protected)
        if not self.plan:
            raise UsageError(f"selection.protect_first={self.selection.protect_first} and protect_last="
                             f"{self.selection.protect_last} leave 0 of {self.depth0} layers to choose from; protect "
                             "fewer layers")
        models.check_trainable(self.quantize, self.recovery.params)
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.chooser: pipeline.LayerChooser | None = None  # built with the tokenizer, at the first choice
        self._stage_start = 0.0
        self._losses: list[float] = []
        self._rollout: dict[str, float] = {}  # the stage's on-policy generation time (`rollout_s`)
        self._identity: dict[str, Any] | None = None  # what `check_run_dir` checked the run directory under

    # ----------------------------------------------------------------- identity and resume
    def run_config(self, trainer: L.Trainer | None = None, datamodule: L.LightningDataModule | None = None
                   ) -> dict[str, Any]:
        """What defines a run: a different one in the same directory is refused unless `overwrite` is set.

        The module's own settings, and what it is fitted with (`gradual.identity.run_identity`): the data module's
        and the callbacks' `settings()` (tasks, threshold, monitor, ...), the Trainer's training settings, the
        optimizer and scheduler, the global seed. A run with other data or another stop rule would otherwise
        resume this one and mix two histories. Read from `trainer` and `datamodule` when given (before fit: the
        ones the run will be fitted with), else, once `check_run_dir` ran, the identity it checked (what
        `state.json` records), else from the Trainer the module is attached to and its data module.
        """
        if trainer is None and datamodule is None and self._identity is not None:
            return self._identity
        if trainer is None:
            try:
                trainer = self.trainer
            except RuntimeError:
                raise RuntimeError("GradualModule.run_config needs the Trainer and data module of the run: pass "
                                   "them, or call it during fit") from None
        own = {"model": self.model_name, "dtype": self.dtype_name, "quantize": self.quantize,
               "schedule": asdict(self.schedule), "selection": asdict(self.selection), "lora": asdict(self.lora),
               "recovery": asdict(self.recovery), "warmup_steps": self.warmup_steps, "seed": self.seed,
               "repair": self.repair}
        return identity.run_identity(own, trainer, trainer.datamodule if datamodule is None else datamodule,
                                     self.optimizer_factory, self.scheduler_factory, len(self.plan))

    def saved_state(self) -> dict[str, Any] | None:
        """The run directory's `state.json` (None for a fresh directory)."""
        return rundir.read_state(self.run_dir)

    def check_run_dir(self, trainer: L.Trainer | None = None, datamodule: L.LightningDataModule | None = None
                      ) -> None:
        """Refuse to mix runs (`gradual.rundir.check_run_dir`) under the run's identity (`run_config` of `trainer`
        and `datamodule`, or during fit of those the module is attached to), which is then kept for `state.json`.
        Once per module, before anything is written: `gradual fit` calls it before `trainer.fit`, and `prepare_data`
        at the start of any fit. Checked on rank 0 as the launcher numbered it (before any process group exists)."""
        if self._identity is not None:
            return
        config = self.run_config(trainer, datamodule)
        if rank_zero_only.rank == 0:
            rundir.check_run_dir(self.run_dir, config, self.overwrite)
        self._identity = config

    # ----------------------------------------------------------------- model life cycle
    def configure_model(self) -> None:
        """Load the model, or on resume the last saved stage. A saved stage is loaded as the float weights it was
        saved as, never quantised here: the uninterrupted run scores that merged float model at the next stage's
        start and quantises only before attaching adapters, and a resumed run must be that run."""
        if self.model is not None:
            return
        source, quantize = self.model_name, self.quantize
        resume = rundir.resume_point(self.run_dir)
        if resume is not None:
            folder, self.history = resume
            source, quantize = str(folder), None
        self.tokenizer = models.load_tokenizer(self.model_name, trust_remote_code=self.trust_remote_code)
        self.model = models.load_model(source, dtype=self.dtype_name, quantize=quantize,
                                       trust_remote_code=self.trust_remote_code)
        self.model.config.use_cache = False
        if not self.history:
            self.history = [StageRecord(stage=0, depth=self.depth, kept=surgery.original_indices(self.model))]

    def prepare_data(self) -> None:
        """Check the run directory (`check_run_dir`) before any data is built: Lightning calls this hook (on each
        node's first process) after the data module's `prepare_data`, which gradual's data modules do not define,
        and before any `setup`, where `GradualDataModule` has the teacher answer its prompts."""
        self.check_run_dir()

    def setup(self, stage: str) -> None:
        """Take the run's identity (on every rank; checked in `prepare_data`), the data's in-data tasks, and size
        every stage's data: `steps × accumulation` batches per rank."""
        self.check_run_dir()
        dm = self.trainer.datamodule
        if isinstance(dm, GradualDataModule):
            self.in_data_tasks = dm.recovery_tasks()
        if isinstance(dm, RecoveryDataModule):  # each stage `steps × accumulation` batches per rank
            per_batch = self.trainer.accumulate_grad_batches * dm.batch_size * self.trainer.world_size
            dm.plan_stages([max(1, steps) * per_batch for _, steps in self.plan] or [per_batch])

    def on_fit_start(self) -> None:
        """On resume, continue Lightning's epoch count at the stage reached, so data and logs line up. The epoch
        limit becomes the planned number of stages (unless the Trainer's is lower), so the progress bar reads
        "Epoch 1/3" rather than the open-ended loop's "Epoch 1/-2". A run that distils from the original model (its
        removal stages under `recovery.teacher: original`, or a consolidation stage) loads it once here, also on
        resume; `teacher: previous` copies its teachers at each stage's start (`on_train_epoch_start`)."""
        previous = self.recovery.teacher == "previous"
        original = (self.recovery.needs_teacher and not previous) or self.schedule.final_steps
        if original and self.teacher is None:
            self.teacher = Teacher.load(self.model_name, dtype=self.recovery.teacher_dtype or self.dtype_name,
                                        quantize=self.recovery.teacher_quantize,
                                        trust_remote_code=self.trust_remote_code)
        self.objective = None if previous else RecoveryObjective(self.recovery, self.teacher)
        loop = self.trainer.fit_loop
        if loop.max_epochs is None or loop.max_epochs < 0 or loop.max_epochs > len(self.plan):
            loop.max_epochs = max(1, len(self.plan))
        start_at_epoch(self.trainer, len(self.history) - 1)
        self._share_model()

    def _share_model(self) -> None:
        """Tell the data module the model the finished stages left (`RecoveryDataModule.use_model`)."""
        dm = self.trainer.datamodule
        if isinstance(dm, RecoveryDataModule):
            dm.use_model(self.model, self.tokenizer, len(self.history) - 1, self.run_dir)

    @property
    def depth(self) -> int:
        return surgery.num_layers(self.model)

    def next_stage(self) -> tuple[int, int] | None:
        """(layers to remove, recovery steps) of the next planned stage; None when the plan is done."""
        done = len(self.history) - 1 if self.history else 0
        return self.plan[done] if done < len(self.plan) else None

    def choose_layers(self, k: int) -> tuple[list[int], dict[str, Any]]:
        """Current indices of the `k` layers to remove now, and the scores that chose them (`pipeline.LayerChooser`:
        chosen on rank 0, shared by every rank; under `selection.rescore: false` the first stage's ranking)."""
        if self.chooser is None:
            self.chooser = pipeline.LayerChooser(self.selection, self.tokenizer, self.seed, self.schedule.layers)
        return self.chooser.choose(self.model, k, self.history, self.device)

    def on_train_epoch_start(self) -> None:
        """Start a stage (`gradual.pipeline`, steps 1-4): choose, repair, remove, record, make the chosen weights
        trainable and rebuild the optimizer around them. A consolidation stage (`schedule.final_steps`) removes
        nothing and distils from the original model; a removal stage distils from it too, or under
        `recovery.teacher: previous` from a copy of the model taken here, before anything changes it (the choice
        leaves it as it is; a repair would not). The previous stage's `retention/` metrics go first: a stage
        that is never evaluated (abandoned) publishes none, and a stop rule must not judge it on another stage's."""
        metrics = self.trainer.callback_metrics
        for name in [name for name in metrics if name.startswith(METRIC)]:
            del metrics[name]
        k, steps = self.next_stage()
        stage = len(self.history)
        L.seed_everything(self.seed + stage, verbose=False)
        self._stage_start, self._losses, timings, self._rollout = time.perf_counter(), [], {}, {}
        self.stage_teacher = None  # the last stage's copied teacher goes first: at most one copy is alive
        self.objective, self.stage_teacher = pipeline.stage_objective(self.recovery, self.teacher, k, steps,
                                                                      self.model, self.baseline_model)
        with pipeline.timed(timings, "scoring_s"):
            chosen, scores = self.choose_layers(k) if k else ([], {"metric": "consolidation"})
        if self.repair is not None and chosen:
            with pipeline.timed(timings, "repair_s"):
                scores["repair"] = pipeline.repair_cuts(self.model, chosen, self.repair,
                                                        self.chooser.calibration(self.device))
        with pipeline.timed(timings, "surgery_s"):
            removed = surgery.remove_layers(self.model, chosen)
        self.history.append(StageRecord(stage=stage, depth=self.depth, removed=removed,
                                        removed_total=sorted(self.history[-1].removed_total + removed),
                                        kept=surgery.original_indices(self.model), importance=scores, steps=steps,
                                        consolidation=k == 0, timings=timings))
        if steps > 0:
            self.model = pipeline.make_trainable(self.model, self.recovery, self.lora, self.quantize,
                                                 max(self.original0) + 1)
            self._rebuild_optimizer()
        self.model.train()
        self.log_dict({"stage": float(stage), "depth": float(self.depth)}, prog_bar=True, on_epoch=True)

    def _rebuild_optimizer(self) -> None:
        """New adapters are new parameters: rebuild the optimizer (and the DDP wrapper, or the FSDP sharding of
        `gradual.sharding`) around them."""
        strategy = self.trainer.strategy
        mesh = sharding.data_parallel_mesh(strategy)
        if mesh is not None:
            self.model = sharding.shard(self.model, mesh)
        elif isinstance(strategy.model, DistributedDataParallel):
            rewrap_ddp(strategy, self)
        strategy.setup_optimizers(self.trainer)

    def _stage_batches(self) -> int:
        return self.history[-1].steps * self.trainer.accumulate_grad_batches

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """`steps_per_stage: 0` prunes without recovery: the stage ends before its first (placeholder) batch. A
        stage never trains more than its own steps, and none after it was abandoned."""
        if self.record.abandoned:
            return -1
        if batch_idx >= self._stage_batches():
            if self._stage_batches() == 0:
                self.end_stage()
            return -1
        return None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """One recovery micro-batch. The loss back-propagated is normalised over the whole optimizer step
        (`RecoveryObjective`); the one logged is this batch's per-position mean. An on-policy batch
        (`recovery.on_policy`, `gradual.onpolicy`) is replaced by the student's own continuations of its prompts and
        trains on the forward KL of the generated tokens, logged as `loss/on_policy`; the stage's `rollout_s` is the
        time its generations took (part of `train_s`). A non-finite loss (on any rank) abandons the stage before its
        backward pass: no optimizer step is taken on it, and the stage is rolled back (`abandon`)."""
        stage = self.record.stage
        if self.on_policy is not None and self.on_policy.chooses(stage, batch_idx):
            with pipeline.timed(self._rollout, "rollout_s"):
                rollout = self.on_policy.rollout(self.model, self.tokenizer, batch, stage, batch_idx)
            loss, mean = self.on_policy.loss(self.model, self.objective.teacher, rollout)
            parts = {"on_policy": mean}
        else:
            loss, parts = self.objective(self.model, batch, surgery.original_indices(self.model))
            mean = self.objective.mean(parts)
        value = float(loss.detach())
        if self.trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False):
            self.abandon(f"loss is {value if not math.isfinite(value) else 'non-finite on another rank'} at "
                         f"step {batch_idx // self.trainer.accumulate_grad_batches + 1}")
            return None
        self._losses.append(mean)
        self.log("loss", mean, prog_bar=True, on_step=True)
        if len(parts) > 1 or "on_policy" in parts:
            self.log_dict({f"loss/{k}": v for k, v in parts.items()}, on_step=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.record.abandoned or batch_idx + 1 == min(self._stage_batches(), self.trainer.num_training_batches):
            self.end_stage()

    def abandon(self, why: str) -> None:
        """Give up the current stage because its training broke down (a non-finite loss or weights): record it
        (`record_error`), propose rolling it back and stop. The evaluations and the stop rule skip the stage,
        `conclude_stage` rolls it back to the last good stage and `StageCheckpoint` never saves its model; `final/`
        is the stage rolled back to."""
        stage = self.record.stage
        self.record_error(TRAINING, why)
        self.propose(False, f"stage {stage} abandoned: {why}")
        self.trainer.should_stop = True

    def end_stage(self) -> None:
        """Merge the stage's adapters (if any) so callbacks see (and save) a plain HF model."""
        record = self.history[-1]
        train_s = time.perf_counter() - self._stage_start - sum(record.timings.values())
        t = time.perf_counter()
        if record.steps > 0:
            self.model = pipeline.merge_trained(self.model, self.recovery)
        else:  # pruned without recovery: a 4-bit model is still saved as float weights
            self.model = _as_float(self.model)
        self._share_model()
        record.loss = sum(self._losses) / len(self._losses) if self._losses else None
        record.timings.update(train_s=train_s, merge_s=time.perf_counter() - t, **self._rollout)
        self.model.eval()
        if not record.abandoned:  # e.g. the last step's update overflowed: its loss was finite, the weights are not
            bad = models.nonfinite_parameters(self.model)
            if bad:
                self.abandon(f"non-finite weights after the stage's training ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''})")

    def conclude_stage(self) -> None:
        """Decide the stage's verdict (`StageHistory.conclude`) and stop on a rollback or when the plan is done.
        `StageCheckpoint` calls it first thing in its `on_train_epoch_end`, on every rank: Lightning runs that
        callback after every other one and after the module's own hook, so every proposal is in, whichever base
        class or place in the config its callback has."""
        if self.conclude(plan_done=self.next_stage() is None):
            self.trainer.should_stop = True

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        """The stage's optimizer (rebuilt with every stage's new trainable weights) and its warm-up, stepped per
        optimizer step. The default warm-up is torch's `LinearLR`, not transformers'
        `get_constant_schedule_with_warmup`: that one runs the first step at lr 0, and importing it loads peft and
        bitsandbytes (seconds) into every run."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            params = [torch.nn.Parameter(torch.zeros(1))]
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.99), weight_decay=1e-4)
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:  # optimizer step k (from 0) at lr × min(1, (k + 1) / warmup): a linear warm-up that starts at lr / warmup
            warmup = max(1, self.warmup_steps)
            scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- plain model export
    def export(self, path: str | Path) -> None:
        """Save the current (merged) model and tokenizer in HF safetensors format, in the model's own dtype."""
        models.save_model(self.model, self.tokenizer, path)

    def baseline_model(self) -> torch.nn.Module:
        """Stage 0 as it was evaluated, in float weights: with `quantize: nf4` the de-quantised NF4 load (loading
        is deterministic and no forward changes 4-bit weights), not the original, so a rollback to stage 0
        writes the model its scores describe."""
        return _as_float(models.load_model(self.model_name, dtype=self.dtype_name, quantize=self.quantize,
                                           trust_remote_code=self.trust_remote_code))


def _as_float(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its 4-bit layers de-quantised to the dtype of its float weights (the dtype stages are saved in)."""
    return dequantize(model, dtype=model.get_input_embeddings().weight.dtype) if has_4bit(model) else model
