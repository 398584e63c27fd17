"""`gradual fit`: LightningCLI wiring of the module, the recovery data and the callbacks."""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from gradual import sharding
from gradual.datamodule import GradualDataModule
from gradual.errors import UsageError
from gradual.lightning_compat import tensor_parallel_size
from gradual.module import GradualModule


class GradualCLI(LightningCLI):
    """LightningCLI with the links the loop needs: the data follows the model's name and seed, and its teacher dtype
    follows the model's dtype unless `data.dtype` is set. Every run has one `StageCheckpoint` and no Lightning
    checkpoint (`instantiate_trainer`)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["parser_kwargs"] = {"prog": "gradual fit", **(kwargs.get("parser_kwargs") or {})}
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False, "num_sanity_val_steps": 0,
                                               "enable_checkpointing": False, "max_epochs": -1,
                                               "limit_val_batches": 0, "reload_dataloaders_every_n_epochs": 1})
        quiet_known_noise()
        with held_logs():
            super().__init__(GradualModule, GradualDataModule, **kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse `args`, or the command line when None. Lightning's version warns when `args` comes with a command
        line of its own, which is how every gradual command and test builds this CLI (from `main(argv)`)."""
        self.config = parser.parse_object(args) if isinstance(args, dict | Namespace) else parser.parse_args(args)

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
            trainer = super().instantiate_trainer(
                **self._progress_lines({**kwargs, "callbacks": [c for c in listed if c not in ours]}))
        except UsageError:
            raise
        except (ValueError, TypeError, MisconfigurationException) as e:
            raise UsageError(f"trainer: {' '.join(str(e).split())}{_strategy_hint(self.config)}") from None
        trainer.callbacks.append(ours[0] if ours else StageCheckpoint())
        return trainer

    def _progress_lines(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` with a `ProgressLog` appended to the callbacks when standard output is not a terminal (a log
        file, a cluster job): Lightning's bar redraws in place and shows nothing readable there. A progress bar the
        config lists, or `enable_progress_bar: false`, is left as configured."""
        from lightning.pytorch.callbacks.progress import ProgressBar

        from gradual.callbacks.progress import ProgressLog, stdout_is_terminal

        config = self._get(self.config_init, "trainer", default={})
        if config.get("enable_progress_bar") is False or stdout_is_terminal():
            return kwargs
        callbacks = kwargs.get("callbacks", config.get("callbacks"))
        listed = list(callbacks) if isinstance(callbacks, list) else [] if callbacks is None else [callbacks]
        if any(isinstance(c, ProgressBar) for c in listed):
            return kwargs
        return {**kwargs, "callbacks": [*listed, ProgressLog()]}

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.model", "data.model")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.link_arguments("model.seed", "data.seed")
        parser.link_arguments("model.run_dir", "trainer.default_root_dir")

    def instantiate_classes(self) -> None:
        """Build everything, then check what the classes accept but the run would refuse later (before any data or
        model loads). The run's identity needs nothing from here: the module reads it from what it is fitted with
        (`GradualModule.run_config`)."""
        super().instantiate_classes()
        check_strategy(self.trainer.strategy, self.model.recovery.params, self.model.recovery.on_policy)
        check_settings(self.model, self.datamodule, self.trainer)
        if isinstance(self.datamodule, GradualDataModule):
            self.datamodule.warn_on_difficulty_mismatch(self.trainer.callbacks)
            if not any(steps for _, steps in self.model.plan):  # pruning without recovery: no data to build
                self.datamodule.train_nothing()
        in_data = self.datamodule.recovery_tasks() if hasattr(self.datamodule, "recovery_tasks") else []
        for callback in self.trainer.callbacks:
            if hasattr(callback, "check_callbacks"):
                callback.check_callbacks(self.trainer.callbacks, in_data)

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


class PlanCLI(GradualCLI):
    """`gradual plan`: the `gradual fit` parser (the same config, defaults, links and overrides) without building
    anything: no module, data module or Trainer, so a GPU config plans on a CPU machine and a hub model plans
    offline (`gradual.footprint` reads only its config; a data module may read a dataset when built). The values
    the plan reads are checked as `fit` checks them. `self.config` holds the parsed config."""

    def instantiate_classes(self) -> None:
        """Check what the plan reads (dtypes, quantisation, the recovery, LoRA and schedule settings, the repair,
        batch size and length, the devices count); build nothing. The data sources and the callbacks' values are
        `fit`'s to check (its data module and callbacks refuse them before any weights load).

        Raises:
            UsageError: a value `gradual fit` would refuse, naming it and what is allowed.
        """
        from gradual import models, repair
        from gradual.distill import Recovery
        from gradual.lora import LoraSettings
        from gradual.stages import Schedule

        model, data = self.config.model, self.config.data
        models.check_dtype(model.dtype, "model.dtype")
        models.check_quantize(model.quantize, "model.quantize")
        recovery = Recovery(**_plain(model.recovery))  # each settings class checks its values when built
        models.check_trainable(model.quantize, recovery.params)
        repair.check_method(model.repair, model.quantize)
        LoraSettings(**_plain(model.lora))
        Schedule(**_plain(model.schedule)).validate()
        for key, least in (("batch_size", 1), ("max_length", 2)):
            if data[key] < least:
                raise UsageError(f"data.{key}={data[key]} is invalid; it must be >= {least}")
        devices = self.config.trainer.devices
        count = int(devices) if isinstance(devices, str) and devices.lstrip("-").isdigit() else devices
        if isinstance(count, int) and (count == 0 or count < -1) or count == []:
            raise UsageError(f"trainer.devices={devices!r} is invalid; allowed: a count >= 1, -1 or auto (every "
                             "visible device), or a list of device indices")


_ADVERT_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                   "lightning_utilities.core.rank_zero")
"""The loggers Lightning's `rank_zero_info` writes through (the last module imported decides which one)."""

PEFT_DEPRECATED_READ = "`is_gradient_checkpointing` is deprecated"
"""The start of transformers 5's FutureWarning each time peft (0.21) builds an adapter, i.e. every LoRA stage:
`PeftModel.__init__` reads the model's `is_gradient_checkpointing`, an alias transformers deprecated for
`is_activation_checkpointing`. peft's access, not gradual's (gradual reads neither)."""


class _NoLightningAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip" advertisements for its cloud services (litlogger, litmodels), printed at every
    `fit`; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip:") and ("litlogger" in message or "litmodels" in message))


def quiet_known_noise() -> None:
    """Silence the two messages every `gradual fit` printed that the user did not cause, and nothing else:
    Lightning's advertisements (a filter on its rank-zero loggers) and the FutureWarning peft triggers in
    transformers (a warnings filter for that message, category and module alone). Installed once per process: a
    warnings filter added again and again would make Python show every other warning again each time."""
    for name in _ADVERT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoLightningAdverts) for f in logger.filters):
            logger.addFilter(_NoLightningAdverts())
    module = r"transformers\.modeling_utils"
    if not any(f[0] == "ignore" and f[1] is not None and f[1].pattern == PEFT_DEPRECATED_READ and f[2] is FutureWarning
               and f[3] is not None and f[3].pattern == module for f in warnings.filters):
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATED_READ, category=FutureWarning, module=module)


class _Held(logging.Handler):
    """Keeps every record handed to it, once (a propagating record reaches it from each logger it passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not any(r is record for r in self.records):
            self.records.append(record)


@contextmanager
def held_logs(replay: bool = True) -> Iterator[None]:
    """Hold back every log record ("Seed set to 0", "GPU available: ...", tips) until the block succeeds: a config
    the CLI refuses prints its one error line alone, a good one prints everything, in order (`replay=False`:
    nothing; for checks that build CLIs only to validate them).

    While the block runs, every logger that would print a record (the root, any logger with handlers or that does
    not propagate) hands its records to one holding handler instead of its own; afterwards they are replayed through
    the loggers' own handlers. A handler first added inside the block prints at once and is kept (Lightning's and
    transformers' handlers exist once this module is imported)."""
    hold = _Held()
    root = logging.getLogger()
    loggers = [root, *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    saved = {lg: lg.handlers for lg in loggers if lg is root or lg.handlers or not lg.propagate}
    for logger in saved:
        logger.handlers = [hold]
    try:
        yield
    except BaseException:
        _release(saved, hold, replay=False)
        raise
    _release(saved, hold, replay)


def _release(saved: dict[logging.Logger, list[logging.Handler]], hold: _Held, replay: bool) -> None:
    """Give the loggers their own handlers back, replay the held records through them (not through handlers added
    inside the block, which printed them already), then keep the added handlers."""
    added = {lg: [h for h in lg.handlers if h is not hold and h not in handlers] for lg, handlers in saved.items()}
    for logger, handlers in saved.items():
        logger.handlers = handlers
    for record in hold.records if replay else ():
        logging.getLogger(None if record.name == "root" else record.name).handle(record)
    for logger, handlers in added.items():
        logger.handlers.extend(handlers)


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
    from gradual.callbacks import LmEvalEvaluation

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
        if isinstance(callback, LmEvalEvaluation) and rank_zero_only.rank == 0:  # the rank that evaluates
            from gradual.tasks.lm_eval_bridge import check_lm_eval_tasks

            check_lm_eval_tasks(callback.tasks, callback.include_path, "LmEvalEvaluation")


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


def check_strategy(strategy: Any, params: str, on_policy: float = 0.0) -> None:
    """FSDP (`ModelParallelStrategy`) shards full-weight recovery over its data-parallel dimension only; refused
    otherwise before the recovery data or any model loads.

    Raises:
        UsageError: LoRA or on-policy batches under FSDP (each rank's generation would run its own number of
            forwards, and every sharded forward is a collective), or a tensor-parallel size other than 1.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return
    sharding.check_params(params)
    if on_policy > 0:
        raise UsageError(f"recovery.on_policy={on_policy} with trainer.strategy ModelParallelStrategy (FSDP) is not "
                         "supported (ranks would generate different lengths through collective forwards); allowed: "
                         "on_policy 0, or strategy: ddp")
    tp = tensor_parallel_size(strategy)
    if tp != 1:
        raise UsageError(f"trainer.strategy: ModelParallelStrategy tensor_parallel_size={tp!r} is not supported; "
                         "gradual shards full-weight recovery over the data-parallel dimension only: set "
                         "data_parallel_size to the number of processes and tensor_parallel_size: 1")


def _plain(value: Any) -> Any:
    """A parsed config value (jsonargparse Namespace, lists of them) as plain dicts and lists."""
    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in vars(value).items() if not k.startswith("__")}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
