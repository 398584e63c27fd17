"""The module's bookkeeping without a Trainer: the recovery optimizer's warm-up, the API callbacks record through,
the run directory's state and resume point, and the schedule's split of the recovery steps over the stages."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import pytest
import torch

from gradual import rundir
from gradual.errors import UsageError
from gradual.module import GradualModule
from gradual.stages import Schedule, StageHistory, StageRecord


def _rates(module: GradualModule, steps: int) -> list[float]:
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_is_linear_from_the_first_step_then_constant():
    """Step k (from 0) runs at lr × min(1, (k + 1) / warmup_steps): no step at lr 0 (the rates of the earlier
    hand-written schedule, to within float rounding)."""
    module = GradualModule("tiny:llama:4", warmup_steps=4, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    rates = _rates(module, 6)
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rel=1e-12)
    for warmup in (1, 2, 50):
        rates = _rates(GradualModule("tiny:llama:4", warmup_steps=warmup), warmup + 3)
        today = [2e-4 * min(1.0, (step + 1) / warmup) for step in range(warmup + 3)]
        assert rates == pytest.approx(today, rel=1e-12)
        at = {0: 2e-4 / warmup, 1: 2e-4 * min(1.0, 2 / warmup), warmup: 2e-4}  # steps 0, 1 and warmup
        assert {step: rates[step] for step in at} == pytest.approx(at, rel=1e-12)
    assert _rates(GradualModule("tiny:llama:4", warmup_steps=0), 3) == [2e-4] * 3


def test_default_optimizer_is_the_papers_adamw():
    optimizer = GradualModule("tiny:llama:4").configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (optimizer.defaults["lr"], optimizer.defaults["betas"], optimizer.defaults["weight_decay"]) == (
        2e-4, (0.9, 0.99), 1e-4)


def _history() -> StageHistory:
    return StageHistory(history=[StageRecord(stage=0, depth=4), StageRecord(stage=1, depth=3),
                                 StageRecord(stage=2, depth=2)])


def test_callbacks_record_on_the_current_stage_and_a_miss_names_the_rollback():
    history = _history()
    history.record_scores({"copy": {"score": 0.5}})
    history.record_retention({"copy": 0.4})
    history.record_timing("tasks_s", 1.5)
    assert history.record.stage == 2 and history.record.scores == {"copy": {"score": 0.5}}
    assert history.record.retention == {"copy": 0.4} and history.record.timings == {"tasks_s": 1.5}
    history.history[1].meets_threshold = True
    history.decide(False, "stage 2: copy retention 0.400 < threshold 0.5")
    assert history.record.meets_threshold is False and history.chosen_stage() == 1
    assert history.stop_reason == "stage 2: copy retention 0.400 < threshold 0.5; rolled back to stage 1"
    accepted = _history()
    accepted.decide(True)
    assert accepted.record.meets_threshold is True and accepted.stop_reason is None and accepted.chosen_stage() == 2


def test_a_run_directory_resumes_only_the_same_run(tmp_path: Path):
    run = tmp_path / "run"
    config = {"model": "m", "schedule": {"max_layers": 2, "layers": [1, 2]}}
    rundir.check_run_dir(run, config, overwrite=False)  # absent: fine
    run.mkdir()
    records = _history().history
    records[2].meets_threshold = False
    for record in records[:2]:
        rundir.write_stage(run, record, export=lambda path: path.mkdir() or (path / "config.json").write_text("{}"))
    rundir.write_stage(run, records[2], export=None)
    rundir.write_state(run, config, records, stop_reason="stopped")
    state = rundir.read_state(run)
    assert state["resume_from"] == "stage_1" and not state["finished"] and state["stop_reason"] == "stopped"
    folder, resumed = rundir.resume_point(run)
    assert folder == run / "stage_1" and [r.stage for r in resumed] == [0, 1]
    rundir.check_run_dir(run, config, overwrite=False)  # the same run: resumes
    other = {"model": "m", "schedule": {"max_layers": 3, "layers": [1, 3]}}
    with pytest.raises(UsageError, match=r"changed: schedule\.max_layers, schedule\.layers\.1\)"):
        rundir.check_run_dir(run, other, overwrite=False)
    rundir.check_run_dir(run, other, overwrite=True)
    assert not run.exists() and rundir.resume_point(run) is None


@pytest.mark.parametrize("growth", [0.5, 0.8, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("per", [0, 1, 7, 12])
def test_steps_growth_shares_the_same_total_exactly(growth: float, per: int) -> None:
    """At every depth the removal stages train `steps_per_stage` × stages in all (what `gradual compare` keeps
    equal), each stage within one step of its share growth^(k−1), none negative; 1 is today's equal split."""
    for layers in [1, 2, 3, 4, 5, 8, 12, 29]:
        schedule = Schedule(max_layers=layers, steps_per_stage=per, final_steps=3, steps_growth=growth)
        plan = schedule.stages(30)
        steps = [s for k, s in plan[:-1]]
        assert [k for k, _ in plan] == [1] * layers + [0] and plan[-1] == (0, 3)
        assert sum(steps) == per * layers and schedule.total_steps(30) == per * layers + 3
        shares = [growth ** k for k in range(layers)]
        ideal = [per * layers * w / sum(shares) for w in shares]
        assert all(s >= 0 and abs(s - i) < 1 for s, i in zip(steps, ideal, strict=True)), (steps, ideal)
        if growth == 1:
            assert steps == [per] * layers
        if growth > 1:
            assert steps == sorted(steps)
        if growth < 1:
            assert steps == sorted(steps, reverse=True)
    assert Schedule(max_layers=4, steps_per_stage=12, steps_growth=1.25).stages(30) == [(1, 8), (1, 11), (1, 13),
                                                                                         (1, 16)]
    uneven = Schedule(max_layers=5, layers_per_stage=2, steps_per_stage=6, steps_growth=2.0)
    assert uneven.stages(30) == [(2, 3), (2, 5), (1, 10)] and uneven.total_steps(30) == 18


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"steps_growth": 0}, "schedule.steps_growth=0 is invalid; allowed: a finite number > 0"),
    ({"steps_growth": -1.5}, "schedule.steps_growth=-1.5 is invalid"),
    ({"steps_growth": float("inf")}, "schedule.steps_growth=inf is invalid"),
    ({"steps_growth": float("nan")}, "schedule.steps_growth=nan is invalid"),
    ({"steps_growth": True}, "schedule.steps_growth=True is invalid"),
    ({"steps_growth": 1.25, "mode": "one_shot"}, "a one_shot run has one stage: allowed there: 1"),
])
def test_bad_steps_growth_is_refused_in_one_line(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=re.escape(needle)) as e:
        Schedule(**kwargs)
    assert "\n" not in str(e.value)
    assert Schedule(mode="one_shot", steps_growth=1).steps_growth == 1
