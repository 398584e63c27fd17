"""`gradual fit`: LightningCLI wiring of the module, the recovery data and the callbacks."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from gradual import sharding
from gradual.datamodule import GradualDataModule
from gradual.errors import UsageError
from gradual.module import GradualModule
from gradual.sgr import SGRConfig


class GradualCLI(LightningCLI):
    """LightningCLI with the links the loop needs: the data follows the model's name and seed, and its teacher dtype
    follows the model's dtype unless `data.dtype` is set."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False, "num_sanity_val_steps": 0,
                                               "enable_checkpointing": True, "max_epochs": -1,
                                               "limit_val_batches": 0, "reload_dataloaders_every_n_epochs": 1})
        super().__init__(GradualModule, GradualDataModule, **kwargs)

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
        for c in callbacks:
            if isinstance(c, dict) and isinstance(c.get("init_args"), dict):
                c["init_args"] = _drop(c["init_args"], _RESULT_NEUTRAL)
        self.model.run_context = _json({"seed_everything": config.get("seed_everything"), "data": data,
                                        "callbacks": callbacks})

    def before_instantiate_classes(self) -> None:
        """CSV logs in the run directory unless a logger is configured (TensorBoard, W&B, ...); the SGR teacher in the
        model's dtype unless `data.dtype` is set (a bf16 run would otherwise generate in float32)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.data.dtype is None:
            config.data.dtype = config.model.dtype
        if config.trainer.logger in (None, True):
            config.trainer.logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": config.model.run_dir, "name": "logs"}}


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
