"""`gradual fit`: LightningCLI wiring of the module, the recovery data and the callbacks."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from gradual.datamodule import GradualDataModule
from gradual.module import GradualModule


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

    def before_instantiate_classes(self) -> None:
        """CSV logs in the run directory unless a logger is configured (TensorBoard, W&B, ...); the SGR teacher in the
        model's dtype unless `data.dtype` is set (a bf16 run would otherwise generate in float32)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.data.dtype is None:
            config.data.dtype = config.model.dtype
        if config.trainer.logger in (None, True):
            config.trainer.logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": config.model.run_dir, "name": "logs"}}
