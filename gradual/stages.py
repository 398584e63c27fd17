"""The run's plan and its record: which layers go in which stage (`Schedule`, `Selection`), what each stage did
(`StageRecord`), `StageHistory`, the one API through which callbacks record scores and propose verdicts, and
`StageLoop`, what callbacks may use of the module.

`GradualModule` executes the plan; these classes hold no model and need no Trainer, so the stop rule's
bookkeeping can be exercised without one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from gradual import importance, surgery
from gradual.errors import UsageError


@dataclass
class Schedule:
    """Which layers go, and how much recovery each stage gets.

    The run removes min(`max_layers`, round(`target_ratio` × depth), depth − `min_depth`, len(`layers`)) layers,
    counting only the limits that are set.

    Attributes:
        mode: `gradual` (`layers_per_stage` layers per stage) or `one_shot` (every layer in one stage, trained with
            the recovery steps of all the gradual stages it replaces). Default `gradual`.
        layers_per_stage: layers removed per stage in `gradual` mode (>= 1, default 1).
        max_layers: the most layers the run removes (>= 1 and below the model's depth; null, the default = no
            limit of its own).
        target_ratio: the share of the model's layers to remove, 0 < ratio < 1 (0.25 of 32 layers = 8; null, the
            default = no limit of its own).
        min_depth: the fewest layers the model keeps (>= 1, default 1).
        layers: exactly these layers, as *original* indices (a pruned model's config records them), removed in
            this order instead of choosing by `selection.metric` (null, the default = chosen by the metric).
        steps_per_stage: recovery steps (optimizer steps) per removal stage (>= 0; 0 = prune without recovery;
            default 50).
        final_steps: recovery steps of a consolidation stage after the last removal, which removes nothing and
            distils (`kd`) from the original model (>= 0; 0, the default = no consolidation stage).
        steps_growth: `gradual` mode: how the removal stages share their steps (> 0; 1, the default = equally).
            Stage k's share grows as growth^(k−1), scaled so the removal stages still train `steps_per_stage` ×
            stages in all (the budget `gradual compare` keeps equal): 1.25 gives later stages, which remove layers
            from an already shallower model, more steps; below 1, earlier ones. `removal_steps` rounds the shares
            so that the total is exact and every stage is within one step of its share.
    """

    mode: Literal["gradual", "one_shot"] = "gradual"
    layers_per_stage: int = 1
    max_layers: int | None = None
    target_ratio: float | None = None
    min_depth: int = 1
    layers: list[int] | None = None
    steps_per_stage: int = 50
    final_steps: int = 0
    steps_growth: float = 1.0

    def __post_init__(self) -> None:
        """The settings added since `validate` was written, checked once when the schedule is built."""
        growth = self.steps_growth
        if isinstance(growth, bool) or not isinstance(growth, int | float) or not (math.isfinite(growth)
                                                                                     and growth > 0):
            raise UsageError(f"schedule.steps_growth={growth!r} is invalid; allowed: a finite number > 0 (1 = equal "
                             "steps per stage)")
        if growth != 1 and self.mode == "one_shot":
            raise UsageError(f"schedule.steps_growth={growth!r} shares steps between gradual stages; a one_shot "
                             "run has one stage: allowed there: 1")

    def total_to_remove(self, depth: int, protected: int = 0) -> int:
        """How many layers the whole run may remove from a model of `depth` layers. Without a count of its own
        (`max_layers`, `target_ratio`), it stops at the `protected` layers the layer choice never removes
        (`Selection.protect_first + protect_last`); an explicit count that protection cannot meet is refused by
        `Selection.validate` instead."""
        limits = [depth - self.min_depth]
        if self.max_layers is None and self.target_ratio is None:
            limits.append(depth - protected)
        if self.layers is not None:
            limits.append(len(self.layers))
        if self.max_layers is not None:
            limits.append(self.max_layers)
        if self.target_ratio is not None:
            limits.append(int(round(self.target_ratio * depth)))
        return max(0, min(limits))

    def stage_sizes(self, depth: int, protected: int = 0) -> list[int]:
        """Layers removed per stage. One-shot removes everything in one stage (with the same total steps)."""
        total = self.total_to_remove(depth, protected)
        if self.mode == "one_shot":
            return [total] if total else []
        sizes, left = [], total
        while left > 0:
            sizes.append(min(self.layers_per_stage, left))
            left -= sizes[-1]
        return sizes

    def steps_for_stage(self, n_removed: int) -> int:
        """Recovery steps of a stage: one-shot gets the budget of all the gradual stages it replaces."""
        if self.mode == "one_shot":
            return self.steps_per_stage * max(1, -(-n_removed // self.layers_per_stage))
        return self.steps_per_stage

    def removal_steps(self, n: int) -> list[int]:
        """Steps of each of `n` gradual removal stages: `steps_per_stage` × n in all, shared as growth^(k−1).
        Each stage takes its share rounded down and the steps left go one each to the largest remainders (later
        stages first on a tie), so the total is exact, no stage is a step or more off its share, and a growing
        share never gives an earlier stage more steps than a later one."""
        if self.steps_growth == 1:
            return [self.steps_per_stage] * n
        total = self.steps_per_stage * n
        weights = [self.steps_growth ** k for k in range(n)]
        shares = [total * w / sum(weights) for w in weights]
        steps = [math.floor(share) for share in shares]
        by_remainder = sorted(range(n), key=lambda k: (shares[k] - steps[k], k), reverse=True)
        for k in by_remainder[:total - sum(steps)]:
            steps[k] += 1
        return steps

    def stages(self, depth: int, protected: int = 0) -> list[tuple[int, int]]:
        """The run's plan, one (layers removed, recovery steps) pair per stage: the removals (without a count of
        their own, down to the `protected` layers, `total_to_remove`), then, with `final_steps`, a consolidation
        stage that removes nothing and distils from the original model (Minitron's advice: most of the budget in a
        final pass from the original teacher)."""
        sizes = self.stage_sizes(depth, protected)
        steps = [self.steps_for_stage(k) for k in sizes] if self.mode == "one_shot" else self.removal_steps(len(sizes))
        plan = list(zip(sizes, steps, strict=True))
        if self.final_steps and plan:
            plan.append((0, self.final_steps))
        return plan

    def total_steps(self, depth: int) -> int:
        """Recovery steps of the whole run, consolidation included (what `gradual compare` keeps equal)."""
        return sum(steps for _, steps in self.stages(depth))

    def validate(self, original: Sequence[int] | None = None) -> None:
        """Check the settings; with the input model's original layer indices, also the ones that depend on it.

        `layers` are original indices (as recorded by `gradual_original_layers` in a pruned model's config), so
        an index the input model no longer has, or never had, is refused here, before any model loads.
        """
        if self.mode not in ("gradual", "one_shot"):
            raise UsageError(f"schedule.mode={self.mode!r} is unknown; allowed: 'gradual', 'one_shot'")
        if self.layers_per_stage < 1:
            raise UsageError(f"schedule.layers_per_stage={self.layers_per_stage} is invalid; it must be >= 1")
        if self.steps_per_stage < 0:
            raise UsageError(f"schedule.steps_per_stage={self.steps_per_stage} is invalid; it must be >= 0")
        if self.final_steps < 0:
            raise UsageError(f"schedule.final_steps={self.final_steps} is invalid; it must be >= 0")
        if self.target_ratio is not None and not 0 < self.target_ratio < 1:
            raise UsageError(f"schedule.target_ratio={self.target_ratio} is invalid; allowed: 0 < ratio < 1")
        if self.max_layers is not None and self.max_layers < 1:
            raise UsageError(f"schedule.max_layers={self.max_layers} is invalid; it must be >= 1")
        if self.min_depth < 1:
            raise UsageError(f"schedule.min_depth={self.min_depth} is invalid; it must be >= 1")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise UsageError(f"schedule.layers={self.layers} has duplicates; list each original index once")
        if self.layers is not None and not self.layers:
            raise UsageError("schedule.layers=[] removes no layer; give original indices, or null to choose by "
                             "selection.metric")
        if original is None:
            return
        depth = len(original)
        if self.max_layers is not None and self.max_layers >= depth:
            raise UsageError(f"schedule.max_layers={self.max_layers} is invalid for a model of {depth} layers; "
                             f"allowed: 1..{depth - 1}")
        if self.min_depth >= depth:
            raise UsageError(f"schedule.min_depth={self.min_depth} leaves nothing to remove from {depth} layers; "
                             f"allowed: 1..{depth - 1}")
        if self.layers is not None:
            try:
                surgery.current_positions(self.layers, original)
            except UsageError as e:
                raise UsageError(f"schedule.layers={self.layers}: {e}") from None
        if self.total_to_remove(depth) == 0:
            raise UsageError(f"schedule.target_ratio={self.target_ratio} removes no layer of {depth} "
                             f"(round({self.target_ratio} × {depth}) = 0); allowed: > {0.5 / depth:.3g}")


@dataclass
class Selection:
    """How the layers to remove are chosen on the *current* model at every stage (`gradual.importance`).

    Attributes:
        metric: the importance metric (`gradual.importance`; a higher score keeps a layer longer):
            `block_influence` (default, ShortGPT: 1 − mean cosine of a layer's input and output hidden states),
            `angular_distance` (Gromov et al., over blocks of `span` layers), `reverse` (deepest first, the last
            layer kept for last), `calibration_loss` (the calibration loss with the layer skipped), `taylor`
            (Σ |w · ∂L/∂w| of its weights), `random` (seeded by `model.seed` and the stage) or `task_ablation`
            (the seed paper's greedy search, arXiv 2602.01997: the layer whose skip lowers the score on `tasks`
            least, one scoring per unprotected layer per layer removed; `gradual.tasks.selection`).
        span: `angular_distance`: how many consecutive layers one score covers (>= 1, default 1).
        protect_first: the first layers the metric never removes (>= 0, default 1: layer 0).
        protect_last: the last layers the metric never removes (>= 0, default 1: the last layer).
        calibration: the calibration texts the metric runs on: a .txt (one text a line) or .jsonl (field `text`)
            file; null (default) = the built-in texts (`gradual/resources/calibration.txt`).
        num_calibration: calibration texts used (a seeded subset; default 32).
        calibration_batch_size: calibration texts per forward pass (default 8).
        calibration_max_length: tokens per calibration text (longer texts are cut; capped at the model's
            positions; default 256).
        tasks: `task_ablation`: the built-in generative tasks it scores (required there, refused with another
            metric); their problems come from the `select` split, which shares no question with the evaluation
            or training (recovery data) splits (`gradual.tasks.base`). A task named here is not held out from the
            choice, though none of its evaluation problems is: for a held-out group that nothing was tuned on,
            evaluate other tasks there.
        n: `task_ablation`: problems per task (>= 1, default 16; the same problems at every stage, scored in one
            batch per task). Each scoring costs n forward passes per task on the shared few-shot prefix, and a stage
            of k layers runs about 1 + k × (unprotected layers) of them (SmolLM2-135M: ~8 s per scoring of 2 tasks ×
            16 on one busy CPU thread, ~4 min a stage).
        fmt: `task_ablation`: `fewshot` (default, 5 worked examples) or `chat` (the model's chat template).
        task_score: `task_ablation`: `loglik` (default: the reference answers' mean per-token log-likelihood,
            continuous and without decoding) or `accuracy` (greedy exact match; `gradual.tasks.selection` says why
            `loglik` is the default).
        difficulty: `task_ablation`: the tasks' `small` (default) or `large` problems.
        rescore: true (default): every stage scores the current, healed model. false: the unpruned model is ranked
            once, at stage 1, and every later stage removes the next layers of that ranking still in the model
            (kept in stage 1's record, so a resumed run follows it), which separates the schedule's effect from the
            choice's.
    """

    metric: str = "block_influence"
    span: int = 1
    protect_first: int = 1
    protect_last: int = 1
    calibration: str | None = None
    num_calibration: int = 32
    calibration_batch_size: int = 8
    calibration_max_length: int = 256
    tasks: list[str] | None = None
    n: int = 16
    fmt: str = "fewshot"
    task_score: str = "loglik"
    difficulty: str = "small"
    rescore: bool = True

    def __post_init__(self) -> None:
        """Each setting on its own, checked once, when the selection is built."""
        from gradual.tasks.builtin import DIFFICULTIES, TASKS
        from gradual.tasks.evaluate import FORMATS
        from gradual.tasks.selection import TASK_SCORES

        if self.metric not in importance.METRICS:
            raise UsageError(f"selection.metric={self.metric!r} is unknown; allowed: {', '.join(importance.METRICS)}")
        if self.metric == "task_ablation" and not self.tasks:
            raise UsageError(f"selection.tasks={self.tasks!r}: metric 'task_ablation' scores built-in generative "
                             f"tasks; name at least one of: {', '.join(TASKS)}")
        if self.metric != "task_ablation" and self.tasks is not None:
            raise UsageError(f"selection.tasks={self.tasks!r} is used only by metric 'task_ablation', not "
                             f"{self.metric!r}; set metric: task_ablation or remove tasks")
        unknown = [t for t in self.tasks or [] if t not in TASKS]
        if unknown:
            raise UsageError(f"selection.tasks has unknown task(s) {', '.join(map(repr, unknown))}; allowed: "
                             f"{', '.join(TASKS)}")
        if self.fmt not in FORMATS:
            raise UsageError(f"selection.fmt={self.fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
        if self.task_score not in TASK_SCORES:
            raise UsageError(f"selection.task_score={self.task_score!r} is unknown; allowed: {', '.join(TASK_SCORES)}")
        if self.difficulty not in DIFFICULTIES:
            raise UsageError(f"selection.difficulty={self.difficulty!r} is unknown; allowed: {', '.join(DIFFICULTIES)}")
        if not isinstance(self.rescore, bool):
            raise UsageError(f"selection.rescore={self.rescore!r} is invalid; allowed: true, false")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise UsageError(f"selection.calibration={self.calibration!r} does not exist; give a .txt/.jsonl file "
                             "or leave it empty for the built-in prompts")
        if self.protect_first < 0 or self.protect_last < 0:
            raise UsageError("selection.protect_first/protect_last must be >= 0")
        for name in ("span", "num_calibration", "calibration_batch_size", "calibration_max_length", "n"):
            if getattr(self, name) < 1:
                raise UsageError(f"selection.{name}={getattr(self, name)} is invalid; it must be >= 1")

    def validate(self, depth: int, removals: Sequence[int] = ()) -> None:
        """With the model's depth and the layers each stage chooses by the metric (in order): that every stage finds
        a span and enough unprotected layers on the model it scores."""
        for k in removals:
            if self.metric in ("block_influence", "angular_distance") and self.span > depth:
                raise UsageError(f"selection.span={self.span} is invalid: a stage scores a model of {depth} layers; "
                                 f"allowed: 1..{depth}")
            free = depth - self.protect_first - self.protect_last
            if free < k:
                raise UsageError(f"selection.protect_first={self.protect_first} and protect_last="
                                 f"{self.protect_last} leave {max(free, 0)} of {depth} layers to choose from, but "
                                 f"the stage removes {k}; protect fewer layers or remove fewer")
            depth -= k


TRAINING = "training"
"""The `StageRecord.errors` key of a stage whose training broke down (a non-finite loss or weights)."""


@dataclass
class StageRecord:
    """What happened in one stage (`stage_<k>/metrics.json`). The module fills the first fields when the stage
    starts and `loss` when it ends; callbacks add `scores`, `retention`, timings and `errors` through
    `StageHistory`'s methods, never by writing here; `meets_threshold` is the verdict `StageHistory.conclude`
    decides from what the callbacks proposed.

    `errors` names what could not be measured or trained, with the error: a score key whose evaluation raised, or
    `training` for a stage abandoned on a non-finite loss or weights (`TRAINING`). A retention value of None means
    undefined: the key's baseline score is 0 or missing.
    """

    stage: int
    depth: int
    removed: list[int] = field(default_factory=list)
    removed_total: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    importance: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    consolidation: bool = False
    loss: float | None = None
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    retention: dict[str, float | None] = field(default_factory=dict)
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)
    meets_threshold: bool | None = None
    timings: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def abandoned(self) -> bool:
        """Whether training broke down in this stage (non-finite loss or weights): its model is not evaluated or
        saved."""
        return TRAINING in self.errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        return cls(**d)


class StageHistory:
    """The stage records of a run and the verdicts taken on them: the API callbacks record through.

    `GradualModule` is a `StageHistory`. Callbacks read `history`, `record`, `stage`, `in_data_tasks` and
    `stop_reason` freely, and write only through the `record_*` methods and `propose`. Any number of callbacks
    propose a verdict on the current stage, in any hook order (`gradual.callbacks` documents it): the evaluations
    (a task that raised under `on_error: stop`), the stop rules, the module itself (a stage whose loss or weights
    became non-finite). `conclude` then decides it, once, after every callback of the stage has run; `decide` only
    writes what `conclude` decided.
    """

    def __init__(self, *args: Any, history: Sequence[StageRecord] = (), in_data_tasks: Sequence[str] = (),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[StageRecord] = list(history)
        self.in_data_tasks: list[str] = list(in_data_tasks)
        self.stop_reason: str | None = None
        self.proposals: dict[int, list[tuple[bool, str | None]]] = {}

    @property
    def record(self) -> StageRecord:
        """The current stage's record: stage 0 (the unpruned baseline) at train start, then the stage that
        just trained."""
        return self.history[-1]

    @property
    def stage(self) -> int:
        """The stage in progress (or last finished); stage 0 is the unpruned baseline."""
        return max(0, len(self.history) - 1)

    def record_scores(self, scores: Mapping[str, dict[str, Any]]) -> None:
        """Evaluation callbacks: add `{key: {"score", "form", "n", "failures", "truncated"}}` of the current model
        to the current record (at train start that is stage 0, the baseline every retention divides by)."""
        self.record.scores.update(scores)

    def record_retention(self, retention: Mapping[str, float | None],
                         intervals: Mapping[str, dict[str, Any]] | None = None) -> None:
        """The current record's retention against stage 0, per score key and its group means
        (`gradual.retention.retention`), and their 95% intervals (`gradual.retention.intervals`)."""
        self.record.retention = dict(retention)
        self.record.intervals = dict(intervals or {})

    def record_error(self, key: str, message: str) -> None:
        """What could not be measured or trained in the current stage: a score key whose evaluation raised (the
        other keys' scores are kept), or `TRAINING` for a stage whose loss or weights became non-finite."""
        self.record.errors[key] = message

    def record_timing(self, name: str, seconds: float) -> None:
        """Wall-clock seconds a callback spent on the current stage (`timings` of its record)."""
        self.record.timings[name] = seconds

    def propose(self, meets_threshold: bool, reason: str | None = None) -> None:
        """A callback's verdict on the current stage: keep it (True) or roll it back (False, saying why). Nothing is
        decided yet, so a callback's place in the hook order cannot pre-empt another's: `conclude` weighs every
        proposal once the stage's callbacks have run. A callback that proposes a rollback also stops the trainer
        (`trainer.should_stop`), as Lightning's stopping callbacks do."""
        self.proposals.setdefault(self.record.stage, []).append((meets_threshold, reason))

    def proposed(self) -> bool | None:
        """What the current stage's proposals say so far: False once any callback proposed a rollback, True if some
        proposed to keep it and none a rollback, None if none judged it."""
        votes = self.proposals.get(self.record.stage)
        return None if not votes else all(ok for ok, _ in votes)

    def conclude(self, plan_done: bool = False) -> bool:
        """The verdict on the current stage, decided here and nowhere else, after every callback proposed: rolled
        back for the first reason proposed if any callback proposed a rollback, kept if one proposed to keep it,
        left undecided (None) if none judged it. A stage that is not rolled back when the plan is done (`plan_done`)
        ends the run with "schedule complete". Returns whether the run stops here."""
        votes = self.proposals.pop(self.record.stage, [])
        rollbacks = [reason for ok, reason in votes if not ok]
        if rollbacks:
            self.decide(False, rollbacks[0])
            return True
        if votes:
            self.decide(True)
        if plan_done:
            self.stop_reason = "schedule complete"
        return plan_done

    def decide(self, meets_threshold: bool, stop_reason: str | None = None) -> None:
        """Write the verdict on the current stage (`conclude` calls it). A stage that misses the threshold is rolled
        back to `chosen_stage`; `stop_reason` (given on a miss) is recorded with "; rolled back to stage <k>"
        appended."""
        self.record.meets_threshold = meets_threshold
        if not meets_threshold:
            reason = stop_reason or f"stage {self.record.stage} missed the retention threshold"
            self.stop_reason = f"{reason}; rolled back to stage {self.chosen_stage()}"

    def chosen_stage(self) -> int:
        """The stage whose model is the result: the last one that did not fail the retention threshold."""
        return max(r.stage for r in self.history if r.meets_threshold is not False)


class StageLoop(Protocol):
    """What callbacks may use of the module that runs the stages (`GradualModule`).

    Read: `history`, `record`, `stage`, `in_data_tasks`, `stop_reason`, `model`, `tokenizer`, `run_dir`,
    `run_config()`, `chosen_stage()`, `proposed()`, `baseline_model()` (stage 0 as it was scored). Write: the
    `record_*` methods and `propose`, and metrics through Lightning's `log`. `export` writes the current model.
    `conclude_stage` decides the current stage's verdict; only `StageCheckpoint`, the callback Lightning runs last,
    calls it.
    """

    history: list[StageRecord]
    in_data_tasks: list[str]
    stop_reason: str | None
    model: Any
    tokenizer: Any
    run_dir: Path

    @property
    def record(self) -> StageRecord: ...

    @property
    def stage(self) -> int: ...

    def record_scores(self, scores: Mapping[str, dict[str, Any]]) -> None: ...

    def record_retention(self, retention: Mapping[str, float | None],
                         intervals: Mapping[str, dict[str, Any]] | None = None) -> None: ...

    def record_error(self, key: str, message: str) -> None: ...

    def record_timing(self, name: str, seconds: float) -> None: ...

    def propose(self, meets_threshold: bool, reason: str | None = None) -> None: ...

    def proposed(self) -> bool | None: ...

    def chosen_stage(self) -> int: ...

    def run_config(self) -> dict[str, Any]: ...

    def baseline_model(self) -> Any: ...

    def export(self, path: str | Path) -> None: ...

    def conclude_stage(self) -> None: ...

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None: ...
