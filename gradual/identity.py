"""What identifies a run: the settings that decide its results, gathered from the objects it is fitted with, so a run
directory is resumed only by the same run whether `gradual fit` or Python code built them.

`run_identity` reads each part from the object that holds it: the module's own settings, the data module's and each
callback's `settings()` (`HasSettings`), the Trainer's training settings, the optimizer and scheduler the module
builds, and the global seed Lightning's `seed_everything` recorded. Settings of speed or display stay out: the
generation and evaluation batch sizes and progress bars (`RESULT_NEUTRAL`), and callbacks that only show or write
what the run did (progress bars, `Report`, `StageCheckpoint`), which define no `settings()`. A run may therefore
resume with a smaller batch after running out of memory, or with progress lines on.

A setting added to the project after runs were recorded would otherwise make every such run "another run". A
setting's default changes nothing (the project's convention), so `added_settings` lists the settings added since
the identity took its present form, with their defaults, and `recorded_form` drops each from a new identity where
the recorded one lacks it and it holds its default: the recorded run resumes; with any other value it is refused,
naming the setting. Add a new setting there when you add it to a config class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping

RESULT_NEUTRAL = frozenset({"batch_size", "chunk_size", "progress"})
"""Generation/evaluation settings that change speed or display, not results (the training batch size,
`data.batch_size`, is not among them)."""

SEED_ENV = "PL_GLOBAL_SEED"
"""Where `lightning.seed_everything` (and `seed_everything:` of `gradual fit`) records the global seed."""


@runtime_checkable
class HasSettings(Protocol):
    """A data module or callback whose settings are part of the run's identity.

    `settings()` returns the constructor settings that decide the run's results, as JSON values, leaving out those
    of speed or display (`RESULT_NEUTRAL`). A callback of your own that changes results (a stop rule, a baseline)
    joins the identity by defining it; one without it is left out of the identity.
    """

    def settings(self) -> dict[str, Any]: ...


def without_neutral(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` less the result-neutral keys (`RESULT_NEUTRAL`)."""
    return {k: v for k, v in settings.items() if k not in RESULT_NEUTRAL}


def class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def callback_settings(callbacks: Iterable[Any]) -> list[dict[str, Any]]:
    """The callbacks that decide results, in the order Lightning holds them: each with `settings()`, and any other
    `EarlyStopping` (a stop rule written the Lightning way) by its monitor and thresholds."""
    out = []
    for callback in callbacks:
        if isinstance(callback, HasSettings):
            out.append({"class_path": class_path(callback), "init_args": callback.settings()})
        elif isinstance(callback, EarlyStopping):
            out.append({"class_path": class_path(callback), "init_args": {
                "monitor": callback.monitor, "mode": callback.mode, "patience": callback.patience,
                "min_delta": float(callback.min_delta), "stopping_threshold": callback.stopping_threshold,
                "divergence_threshold": callback.divergence_threshold, "check_finite": callback.check_finite}})
    return out


def training_settings(trainer: Trainer, stages: int) -> dict[str, Any]:
    """The Trainer settings that decide which examples a stage trains on, how many steps it takes and what one step
    does: a resume under other values (say `accumulate_grad_batches: 2` after 1, which would train twice the examples
    per step, some a finished stage already used) is refused, naming them. The world size (devices × nodes) splits
    every step across ranks; the precision and clipping change each update. The epoch limits are recorded as they
    act, the same before `trainer.fit` and during it (where Lightning fills in what was left unset): the maximum as
    the number of stages it allows of the `stages` planned (`GradualModule.on_fit_start` caps it there, so -1, None
    and 1000 are one setting), an unset minimum as Lightning's (1 with `min_steps`, else 0). Settings of speed or
    display (progress bar, logging, the accelerator) are left out."""
    max_epochs, min_epochs = trainer.max_epochs, trainer.min_epochs
    if min_epochs is None:
        min_epochs = 0 if trainer.min_steps is None else 1
    return {"accumulate_grad_batches": trainer.accumulate_grad_batches,
            "world_size": trainer.num_devices * trainer.num_nodes,
            "limit_train_batches": trainer.limit_train_batches, "overfit_batches": trainer.overfit_batches,
            "max_steps": trainer.max_steps,
            "max_epochs": stages if max_epochs is None or max_epochs < 0 else min(max_epochs, stages),
            "min_epochs": min_epochs,
            "gradient_clip_val": trainer.gradient_clip_val, "gradient_clip_algorithm": trainer.gradient_clip_algorithm,
            "precision": str(trainer.precision)}


OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def _plain_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The public entries of an object's state that are JSON values (numbers, strings, lists and maps of them)."""

    def plain(v: Any) -> bool:
        if isinstance(v, list | tuple):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return v is None or isinstance(v, bool | int | float | str)

    return {k: v for k, v in values.items() if not k.startswith("_") and plain(v)}


def optimizer_settings(optimizer: OptimizerFactory | None, scheduler: SchedulerFactory | None
                       ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The optimizer's and the scheduler's class and settings (None for the module's defaults), read from what the
    factories build on one dummy parameter: the same for `class_path`/`init_args` in a config, a
    `functools.partial` or a lambda that builds the same thing. The scheduler is built on the configured optimizer
    (torch's AdamW when there is none) and described by its public state at step 0."""
    built = optimizer([torch.nn.Parameter(torch.zeros(1))]) if optimizer is not None else None
    described = {"class_path": class_path(built), "init_args": _plain_values(built.defaults)} if built else None
    if scheduler is None:
        return described, None
    sched = scheduler(built or torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    return described, {"class_path": class_path(sched), "init_args": _plain_values(sched.state_dict())}


def global_seed() -> int | None:
    """The global seed `seed_everything` last set in this process (None when it was never called)."""
    value = os.environ.get(SEED_ENV)
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def run_identity(own: Mapping[str, Any], trainer: Trainer, datamodule: Any, optimizer: OptimizerFactory | None,
                 scheduler: SchedulerFactory | None, stages: int) -> dict[str, Any]:
    """The run's identity as `state.json` holds it: the module's `own` settings, then `seed_everything`, `data`,
    `callbacks`, `trainer`, `optimizer` and `lr_scheduler` (JSON values: tuples as lists)."""
    described_optimizer, described_scheduler = optimizer_settings(optimizer, scheduler)
    identity = {**own, "seed_everything": global_seed(),
                "data": datamodule.settings() if isinstance(datamodule, HasSettings) else None,
                "callbacks": callback_settings(trainer.callbacks), "trainer": training_settings(trainer, stages),
                "optimizer": described_optimizer, "lr_scheduler": described_scheduler}
    return json.loads(json.dumps(identity, default=str))


def added_settings() -> dict[tuple[str, ...], Any]:
    """Settings added to the identity after runs were recorded without them → their default, the value under which
    such a run behaved. Paths are identity keys; `*` stands for every item of a list (`data.sources`). Defaults are
    read from the config classes, so they cannot drift from them."""
    from gradual.distill import Recovery
    from gradual.mixture import SELF_TEXT_FIELDS

    recovery = Recovery()
    return {("recovery", "on_policy"): recovery.on_policy,
            ("recovery", "on_policy_tokens"): recovery.on_policy_tokens,
            **{("data", "sources", "*", name): default for name, default in SELF_TEXT_FIELDS.items()}}


def recorded_form(recorded: Any, identity: Any) -> Any:
    """`identity` as a run recorded before the `added_settings` would have recorded it: each added setting that
    `recorded` lacks (at the same place) and `identity` holds at its default is left out. Compare the result with
    `recorded` to tell whether a run directory holds this run."""
    added = added_settings()

    def strip(old: Any, new: Any, path: tuple[str, ...]) -> Any:
        if isinstance(old, dict) and isinstance(new, dict):
            return {k: strip(old[k], v, (*path, k)) if k in old else v for k, v in new.items()
                    if k in old or (*path, k) not in added or v != added[(*path, k)]}
        if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            return [strip(o, n, (*path, "*")) for o, n in zip(old, new, strict=True)]
        return new

    return strip(recorded, identity, ())
