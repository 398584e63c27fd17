"""`gradual fit`: LightningCLI wiring of the module, the recovery data and the callbacks."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from gradual import models, sharding
from gradual.datamodule import GradualDataModule
from gradual.errors import UsageError
from gradual.module import GradualModule
from gradual.sgr import SGRConfig


class GradualCLI(LightningCLI):
    """LightningCLI with the links the loop needs: the data follows the model's name and seed, and its teacher dtype
    follows the model's dtype unless `data.dtype` is set. Every run has one `StageCheckpoint` and no Lightning
    checkpoint (`instantiate_trainer`)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False, "num_sanity_val_steps": 0,
                                               "enable_checkpointing": False, "max_epochs": -1,
                                               "limit_val_batches": 0, "reload_dataloaders_every_n_epochs": 1})
        with held_logs():
            super().__init__(GradualModule, GradualDataModule, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with the run's `StageCheckpoint`: the one the config lists, or `StageCheckpoint()` (keep:
        last_good) when it lists none, so no run goes without `state.json`, `final/` and resume. Lightning's own
        checkpointing stays off (its `ModelCheckpoint` would pickle the whole model and optimizer every stage);
        another checkpoint callback, a second `StageCheckpoint` or `enable_checkpointing: true` is refused. A value
        the Trainer's constructor refuses (an unknown strategy or accelerator name, `devices: -2`) is a one-line
        UsageError, not Lightning's traceback."""
        from gradual.callbacks import StageCheckpoint

        trainer_config = self._get(self.config_init, "trainer", default={})
        listed = trainer_config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        ours = [c for c in listed if isinstance(c, StageCheckpoint)]
        if len(ours) > 1:
            raise UsageError("trainer.callbacks lists StageCheckpoint twice; a run has one (it writes the run "
                             "directory)")
        foreign = [type(c).__name__ for c in listed if isinstance(c, Checkpoint) and c not in ours]
        if foreign or trainer_config.get("enable_checkpointing"):
            what = f"trainer.callbacks: {', '.join(foreign)}" if foreign else "trainer.enable_checkpointing=true"
            raise UsageError(f"{what} is not supported: Lightning's own checkpoints stay off, since StageCheckpoint "
                             "saves every stage in Hugging Face format and resumes from the run directory; remove it")
        try:
            trainer = super().instantiate_trainer(**{**kwargs, "callbacks": [c for c in listed if c not in ours]})
        except UsageError:
            raise
        except (ValueError, TypeError, MisconfigurationException) as e:
            raise UsageError(f"trainer: {' '.join(str(e).split())}{_strategy_hint(self.config)}") from None
        trainer.callbacks.append(ours[0] if ours else StageCheckpoint())
        return trainer

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.model", "data.model")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.link_arguments("model.seed", "data.seed")
        parser.link_arguments("model.run_dir", "trainer.default_root_dir")

    def instantiate_classes(self) -> None:
        """Build everything, then hand the module what else defines the run (data, callbacks, global seed), so a
        run directory is resumed only by the same run (`GradualModule.run_config`)."""
        super().instantiate_classes()
        check_strategy(self.trainer.strategy, self.model.recovery.params)
        check_settings(self.model, self.datamodule, self.trainer)
        in_data = self.datamodule.recovery_tasks() if hasattr(self.datamodule, "recovery_tasks") else []
        self.model.in_data_tasks = in_data
        for callback in self.trainer.callbacks:
            if hasattr(callback, "check_callbacks"):
                callback.check_callbacks(self.trainer.callbacks, in_data)
        config = self.config[self.subcommand] if self.subcommand else self.config
        data = _plain(config.get("data")) or {}
        if isinstance(data.get("sgr"), dict):
            data["sgr"] = _drop(data["sgr"], _RESULT_NEUTRAL)
            if _json(data["sgr"]) == _json(_drop(asdict(SGRConfig()), _RESULT_NEUTRAL)):
                data["sgr"] = None  # the default: null, as recorded by runs from before data.sgr's fields were listed
        if data.get("sources", ...) is None:  # the default (data.sgr alone): keep resuming runs started before sources
            del data["sources"]
        callbacks = [_plain(c) for c in (config.trainer.get("callbacks") or [])]
        for c in callbacks:  # TaskEvaluation reads `forms: []` as its default, both forms: say it is empty
            if isinstance(c, dict) and isinstance(c.get("init_args"), dict) and c["init_args"].get("forms") == []:
                raise UsageError(f"{c.get('class_path')}.forms is empty; allowed: generative, classification or "
                                 "both (or leave it out for both)")
        for c in callbacks:
            if isinstance(c, dict) and isinstance(c.get("init_args"), dict):
                c["init_args"] = _drop(c["init_args"], _RESULT_NEUTRAL)
        self.model.run_context = _json({"seed_everything": config.get("seed_everything"), "data": data,
                                        "callbacks": callbacks, "trainer": training_settings(self.trainer),
                                        "optimizer": _plain(config.model.get("optimizer")),
                                        "lr_scheduler": _plain(config.model.get("lr_scheduler"))})

    def before_instantiate_classes(self) -> None:
        """CSV logs in the run directory unless a logger is configured (TensorBoard, W&B, ...); the SGR teacher in the
        model's dtype unless `data.dtype` is set (a bf16 run would otherwise generate in float32)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key in _settings_groups():
            if not isinstance(config.get(key), Namespace):
                raise UsageError(f"{key}={_plain(config.get(key))!r} is invalid; give a mapping of its fields "
                                 "(`gradual fit --help` lists them)")
        if config.data.dtype is None:
            config.data.dtype = config.model.dtype
        if config.trainer.logger in (None, True):
            config.trainer.logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": config.model.run_dir, "name": "logs"}}


@contextmanager
def held_logs(replay: bool = True) -> Iterator[None]:
    """Hold back every log record ("Seed set to 0", "GPU available: ...", tips) until the block succeeds: a config
    the CLI refuses prints its one error line alone, a good one prints everything, in order (`replay=False`:
    nothing; for checks that build CLIs only to validate them). Records are held where loggers hand them to their
    handlers, so a handler added inside the block (an import that configures logging) is held too."""
    held: list[tuple[logging.Logger, logging.LogRecord]] = []
    call_handlers = logging.Logger.callHandlers

    def hold(self: logging.Logger, record: logging.LogRecord) -> None:
        held.append((self, record))

    logging.Logger.callHandlers = hold  # type: ignore[method-assign]
    try:
        yield
    finally:
        logging.Logger.callHandlers = call_handlers  # type: ignore[method-assign]
    for logger, record in held if replay else ():
        logger.callHandlers(record)


def _strategy_hint(config: Namespace) -> str:
    """A class path given as a strategy name (`--trainer.strategy lightning.pytorch.strategies.X`) is read as a
    registry name; say how to give a class."""
    try:
        strategy = (config.get("fit") or config).trainer.strategy
    except AttributeError:
        return ""
    if isinstance(strategy, str) and "." in strategy:
        return (f"; to give a strategy class, write --trainer.strategy '{{class_path: {strategy}}}' or "
                f"trainer.strategy: {{class_path: {strategy}}} in the config")
    return ""


def check_settings(module: GradualModule, datamodule: Any, trainer: Trainer) -> None:
    """Values the classes accept but the run would refuse only after a model loaded (or never): checked once
    everything is built, before anything is loaded or written.

    Raises:
        UsageError: naming the value and what is allowed.
    """
    from gradual.callbacks import LmEvalEvaluation, TaskEvaluation

    if module.dtype_name not in models.DTYPES:
        raise UsageError(f"model.dtype={module.dtype_name!r} is unknown; allowed: {', '.join(models.DTYPES)}")
    teacher_dtype = getattr(datamodule, "dtype_name", None)
    if teacher_dtype is not None and teacher_dtype not in models.DTYPES:
        raise UsageError(f"data.dtype={teacher_dtype!r} is unknown; allowed: {', '.join(models.DTYPES)} or null")
    if module.warmup_steps < 0:
        raise UsageError(f"model.warmup_steps={module.warmup_steps} is invalid; it must be >= 0")
    removals = [k for k, _ in module.plan if k] if module.schedule.layers is None else []
    module.selection.validate(module.depth0, removals)
    _check_optimizer(module)
    accumulate = trainer.accumulate_grad_batches
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise UsageError(f"trainer.accumulate_grad_batches={accumulate!r} is invalid; it must be an integer >= 1")
    clip = trainer.gradient_clip_val
    if clip is not None and not (math.isfinite(clip) and clip >= 0):
        raise UsageError(f"trainer.gradient_clip_val={clip!r} is invalid; it must be finite and >= 0, or null")
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if isinstance(callback, (TaskEvaluation, LmEvalEvaluation)) and callback.batch_size < 1:
            raise UsageError(f"{name} batch_size={callback.batch_size} is invalid; it must be >= 1")
        if isinstance(callback, TaskEvaluation):
            if not callback.tasks:
                raise UsageError("TaskEvaluation.tasks is empty; name at least one built-in task (see `gradual tasks`)")
            if callback.max_new_tokens is not None and callback.max_new_tokens < 1:
                raise UsageError(f"TaskEvaluation max_new_tokens={callback.max_new_tokens} is invalid; it must be "
                                 ">= 1 or null (each task's own budget)")
        if isinstance(callback, LmEvalEvaluation):
            if callback.limit is not None and callback.limit < 1:
                raise UsageError(f"LmEvalEvaluation limit={callback.limit} is invalid; it must be >= 1 or null")
            if callback.num_fewshot is not None and callback.num_fewshot < 0:
                raise UsageError(f"LmEvalEvaluation num_fewshot={callback.num_fewshot} is invalid; it must be >= 0 "
                                 "or null")
            if rank_zero_only.rank == 0:  # the rank that evaluates
                from gradual.cli import check_lm_eval_tasks

                check_lm_eval_tasks(callback.tasks, callback.include_path, "LmEvalEvaluation")


def training_settings(trainer: Trainer) -> dict[str, Any]:
    """The Trainer settings that decide which examples a stage trains on, how many steps it takes and what one step
    does: part of the run's identity, so a resume under other values (say `accumulate_grad_batches: 2` after 1, which
    would train twice the examples per step, some a finished stage already used) is refused, naming them. The world
    size (devices × nodes) splits every step across ranks; the precision and clipping change each update. Settings of
    speed or display (progress bar, logging, the accelerator) are left out."""
    return {"accumulate_grad_batches": trainer.accumulate_grad_batches,
            "world_size": trainer.num_devices * trainer.num_nodes,
            "limit_train_batches": trainer.limit_train_batches, "overfit_batches": trainer.overfit_batches,
            "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs, "min_epochs": trainer.min_epochs,
            "gradient_clip_val": trainer.gradient_clip_val, "gradient_clip_algorithm": trainer.gradient_clip_algorithm,
            "precision": str(trainer.precision)}


def _check_optimizer(module: GradualModule) -> None:
    """Build the configured optimizer and scheduler on one dummy parameter, as `configure_optimizers` builds them:
    torch refuses a bad `lr` or `betas` only then, after the model loaded."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    try:
        optimizer = module.optimizer_factory(params) if module.optimizer_factory else torch.optim.AdamW(params)
        if module.scheduler_factory is not None:
            module.scheduler_factory(optimizer)
    except (ValueError, TypeError) as e:
        raise UsageError(f"model.optimizer / model.lr_scheduler: {' '.join(str(e).split())}") from None


def _settings_groups() -> list[str]:
    """Dotted keys of the settings dataclasses (`model.schedule`, `data.sgr.decoding`, ...). In a config file
    jsonargparse lets a list or a number through for one of them and fails while building it (a TypeError of its
    own, or the defaults used silently), so they are checked to be mappings first."""
    keys: list[str] = []

    def walk(prefix: str, hints: dict[str, Any]) -> None:
        for name, hint in hints.items():
            if dataclasses.is_dataclass(hint):
                keys.append(f"{prefix}.{name}")
                walk(f"{prefix}.{name}", typing.get_type_hints(hint))

    walk("model", typing.get_type_hints(GradualModule.__init__))
    walk("data", typing.get_type_hints(GradualDataModule.__init__))
    return keys


def check_strategy(strategy: Any, params: str) -> None:
    """FSDP (`ModelParallelStrategy`) shards full-weight recovery over its data-parallel dimension only; refused
    otherwise before the recovery data or any model loads.

    Raises:
        UsageError: LoRA under FSDP, or a tensor-parallel size other than 1.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return
    sharding.check_params(params)
    tp = getattr(strategy, "_tensor_parallel_size", 1)
    if tp != 1:
        raise UsageError(f"trainer.strategy: ModelParallelStrategy tensor_parallel_size={tp!r} is not supported; "
                         "gradual shards full-weight recovery over the data-parallel dimension only: set "
                         "data_parallel_size to the number of processes and tensor_parallel_size: 1")


_RESULT_NEUTRAL = frozenset({"batch_size", "chunk_size", "progress"})
"""Generation/evaluation settings that change speed or display, not results: a run may resume with other values
(e.g. a smaller batch after running out of memory). The training batch size (`data.batch_size`) is not among them."""


def _drop(d: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists, unknown objects as strings), as `state.json` holds it."""
    return json.loads(json.dumps(value, default=str))


def _plain(value: Any) -> Any:
    """A parsed config value (jsonargparse Namespace, lists of them) as plain dicts and lists."""
    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in vars(value).items() if not k.startswith("__")}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
