"""What a stage trains (`recovery.params`), whom it distils from (`recovery.teacher`) and the budget schedule
(`schedule.final_steps`, `schedule.steps_growth`), on a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_fit import SMOKE, fit_in_process, logits, write_config

from gradual import runplan, surgery
from gradual.cli import main
from gradual.lightning_cli import GradualCLI
from gradual.models import load_model
from gradual.stages import Schedule
from gradual.surgery import near_cuts


def original_weights() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model("tiny:llama:6").state_dict().items()}


def layer_key(key: str, position: int) -> bool:
    return key.startswith(f"model.layers.{position}.")


def test_near_cuts_are_the_kept_layers_next_to_each_gap() -> None:
    assert near_cuts([0, 1, 4, 5, 6], 1) == [1, 2]
    assert near_cuts([0, 1, 4, 5, 6], 2) == [0, 1, 2, 3]
    assert near_cuts([0, 2, 3, 6, 7], 1) == [0, 1, 2, 3]
    assert near_cuts([1, 2, 3], 1) == [0]
    assert near_cuts([0, 1, 2], 1, depth=5) == [2] and near_cuts([0, 1, 2], 1, depth=3) == []


def test_full_trains_every_decoder_weight_and_the_final_norm_only(tmp_path: Path) -> None:
    config, run_dir = write_config(tmp_path, model__schedule__layers=[2], model__schedule__max_layers=None,
                                   model__schedule__steps_per_stage=2, model__recovery={"params": "full"},
                                   model__warmup_steps=1)
    fit_in_process(config)
    final, before = load_file(run_dir / "final" / "model.safetensors"), original_weights()
    kept = [0, 1, 3, 4, 5]
    assert torch.equal(final["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(final["model.norm.weight"], before["model.norm.weight"])
    for position, orig in enumerate(kept):
        name = "self_attn.q_proj.weight"
        assert not torch.equal(final[f"model.layers.{position}.{name}"], before[f"model.layers.{orig}.{name}"])


def test_near_cut_trains_only_the_layers_bordering_the_cut(tmp_path: Path) -> None:
    config, run_dir = write_config(tmp_path, model__schedule__layers=[2], model__schedule__max_layers=None,
                                   model__schedule__steps_per_stage=2, model__recovery={"params": "near_cut"},
                                   model__warmup_steps=1)
    fit_in_process(config)
    final, before = load_file(run_dir / "final" / "model.safetensors"), original_weights()
    kept = [0, 1, 3, 4, 5]  # original layer 2 removed: the cut lies between positions 1 and 2
    for position, orig in enumerate(kept):
        keys = [k for k in final if layer_key(k, position)]
        same = all(torch.equal(final[k], before[k.replace(f"layers.{position}.", f"layers.{orig}.")]) for k in keys)
        assert same == (position not in (1, 2)), (position, orig)
    assert not torch.equal(final["model.norm.weight"], before["model.norm.weight"])
    assert torch.equal(final["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_final_steps_add_a_consolidation_stage_that_distils(tmp_path: Path) -> None:
    config, run_dir = write_config(tmp_path, model__schedule__max_layers=2, model__schedule__steps_per_stage=1,
                                   model__schedule__final_steps=3)
    cli = fit_in_process(config)
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    assert [(len(s["removed"]), s["steps"], s["consolidation"]) for s in stages[1:]] == [(1, 1, False),
                                                                                            (1, 1, False), (0, 3, True)]
    assert stages[3]["removed_total"] == stages[2]["removed_total"] and stages[3]["depth"] == 4
    assert cli.trainer.global_step == 5
    assert cli.model.teacher is not None and cli.model.objective.settings.loss == "kd"
    assert Schedule(max_layers=2, steps_per_stage=1, final_steps=3).total_steps(6) == 5
    assert Schedule(mode="one_shot", max_layers=2, steps_per_stage=1, final_steps=3).total_steps(6) == 5


def test_a_consolidation_that_fails_the_threshold_rolls_back(tmp_path: Path) -> None:
    callbacks = yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"]
    callbacks[1] = {"class_path": "rank_probe.RejectConsolidation"}
    config, run_dir = write_config(tmp_path, model__schedule__max_layers=1, model__schedule__steps_per_stage=1,
                                   model__schedule__final_steps=2, trainer__callbacks=callbacks)
    fit_in_process(config)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final_stage"] == 1 and results["stages"][2]["meets_threshold"] is False
    final, stage_1 = (load_file(run_dir / d / "model.safetensors") for d in ("final", "stage_1"))
    assert final.keys() == stage_1.keys() and all(torch.equal(final[k], stage_1[k]) for k in final)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model.quantize", "nf4", "--model.recovery.params", "full"], "recovery.params='full' trains full weights"),
    (["--model.recovery.params", "half"], "recovery.params='half' is unknown"),
    (["--model.schedule.final_steps", "-1"], "schedule.final_steps=-1 is invalid"),
    (["--model.schedule.steps_growth", "0"], "schedule.steps_growth=0.0 is invalid"),
    (["--model.schedule.mode", "one_shot", "--model.schedule.steps_growth", "1.5"], "a one_shot run has one stage"),
    (["--model.recovery.teacher", "student"], "recovery.teacher='student' is unknown; allowed: original, previous"),
    (["--model.recovery.teacher", "previous"], "recovery.teacher='previous' is used only by distillation"),
])
def test_bad_recovery_settings_are_one_line(argv: list[str], needle: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config, run_dir = write_config(tmp_path)
    assert main(["fit", "--config", str(config), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gradual: error:") and needle in err[-1], err
    assert not run_dir.exists()


class TeacherProbe(L.Callback):
    """Logits, on fixed inputs, of each stage's teacher as its first batch meets it, and of each stage's final
    (merged) model."""

    def __init__(self) -> None:
        self.teacher: dict[int, torch.Tensor] = {}
        self.final: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if batch_idx == 0:
            self.teacher[pl_module.record.stage] = logits(pl_module.objective.teacher.model)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.final[pl_module.record.stage] = logits(pl_module.model)


def probed_fit(tmp_path: Path, **changes: object) -> tuple[GradualCLI, TeacherProbe, Path]:
    """A kd fit of the smoke config without its stop rule (every planned stage runs), probed by `TeacherProbe`."""
    callbacks = [c for c in yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"]
                 if not c["class_path"].endswith("RetentionStopping")]
    config, run_dir = write_config(tmp_path, trainer__callbacks=callbacks, model__recovery__loss="kd", **changes)
    cli, probe = GradualCLI(args=["--config", str(config)], run=False), TeacherProbe()
    cli.trainer.callbacks.insert(0, probe)
    cli.model.check_run_dir(cli.trainer, cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, probe, run_dir


def test_teacher_previous_distils_each_stage_from_the_model_it_started_from(tmp_path: Path) -> None:
    """`recovery.teacher: previous`: stage 2's teacher is stage 1's final model (exactly), stage 1's the unpruned
    model, and the consolidation stage still distils from the original."""
    cli, probe, run_dir = probed_fit(tmp_path, model__schedule__max_layers=2, model__schedule__steps_per_stage=1,
                                     model__schedule__final_steps=1, model__recovery__teacher="previous")
    unpruned = logits(load_model("tiny:llama:6"))
    assert sorted(probe.teacher) == [1, 2, 3]
    assert torch.equal(probe.teacher[1], unpruned)
    assert torch.equal(probe.teacher[2], probe.final[1]) and not torch.equal(probe.final[1], unpruned)
    assert torch.equal(probe.teacher[3], unpruned), "the consolidation stage distils from the original"
    assert cli.model.stage_teacher is None and surgery.num_layers(cli.model.teacher.model) == 6
    results = json.loads((run_dir / "results.json").read_text())
    assert [s["steps"] for s in results["stages"]] == [0, 1, 1, 1] and results["config"]["recovery"]["teacher"] \
        == "previous"


def test_steps_growth_trains_each_stage_its_planned_steps_from_the_original(tmp_path: Path) -> None:
    """`schedule.steps_growth: 2` over 3 stages of the smoke config's 2 steps: 1 + 2 + 3 = 6 steps, each stage
    trains its own (results.json, the optimizer's count, the `plan:` line); the default teacher is the original
    at every stage."""
    cli, probe, run_dir = probed_fit(tmp_path, model__schedule__steps_growth=2.0)
    unpruned = logits(load_model("tiny:llama:6"))
    assert sorted(probe.teacher) == [1, 2, 3] and all(torch.equal(t, unpruned) for t in probe.teacher.values())
    assert not torch.equal(probe.final[1], unpruned)
    results = json.loads((run_dir / "results.json").read_text())
    assert [s["steps"] for s in results["stages"]] == [0, 1, 2, 3] and cli.trainer.global_step == 6
    config = results["config"]
    assert config["schedule"]["steps_growth"] == 2.0 and config["recovery"]["teacher"] == "original"
    removal = runplan.plan_lines(cli.model, cli.datamodule, cli.trainer)[1]
    assert "3 stages = 1 x (1 layer, 1 steps) + 1 x (1 layer, 2 steps) + 1 x (1 layer, 3 steps) (steps_growth 2: " \
           "6 removal steps, as 3 x 2)" in removal, removal
