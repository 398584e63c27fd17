"""Inputs `gradual fit` must refuse (or accept) before heavy work: original layer indices, run identity, the
retention monitor, and values the parser itself rejects."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from test_callbacks import bare_trainer
from test_fit import write_config

from gradual.callbacks import Report, RetentionStopping, StageCheckpoint, TaskEvaluation
from gradual.callbacks.stopping import log_retention
from gradual.cli import main, parser_error_line
from gradual.datamodule import GradualDataModule
from gradual.errors import UsageError
from gradual.generation import DecodingConfig
from gradual.lora import LoraSettings
from gradual.module import GradualModule
from gradual.sgr import SGRConfig
from gradual.stages import Schedule, Selection, StageHistory, StageRecord


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    errors = [line for line in err if "error" in line.lower()]
    assert errors == [err[-1]] and err[-1].startswith("gradual: error:"), err
    return err[-1]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny:llama:6 with original layer 1 removed: it keeps original layers 0, 2, 3, 4, 5."""
    out = tmp_path_factory.mktemp("pruned") / "A"
    assert main(["prune", "--model", "tiny:llama:6", "--layers", "1", "--out", str(out)]) == 0
    return out


def test_schedule_layers_are_original_indices_of_an_already_pruned_model(pruned: Path, tmp_path: Path) -> None:
    config, run_dir = write_config(tmp_path, model__model=str(pruned), model__schedule__layers=[5],
                                   model__schedule__max_layers=None, model__schedule__steps_per_stage=1)
    assert main(["fit", "--config", str(config)]) == 0
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    assert stages[0]["kept"] == [0, 2, 3, 4, 5]
    assert stages[1]["removed"] == [5] and stages[1]["kept"] == [0, 2, 3, 4]
    final = json.loads((run_dir / "final" / "config.json").read_text())
    assert final["gradual_original_layers"] == [0, 2, 3, 4]


@pytest.mark.parametrize(("layers", "needle"), [
    ([1], "layer index 1 is out of range (removed earlier); this model keeps original layers 0, 2-5"),
    ([9], "layer index 9 is out of range; this model keeps original layers 0, 2-5"),
    ([0, 2, 3, 4, 5], "removing 5 of 5 layers would leave none")])
def test_a_removed_or_unknown_index_is_refused_in_one_line_before_any_load(
        pruned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], layers: list[int], needle: str) -> None:
    config, run_dir = write_config(tmp_path, model__model=str(pruned), model__schedule__layers=layers,
                                   model__schedule__max_layers=None, data__sgr__cache_dir=str(tmp_path / "sgr"))
    assert main(["fit", "--config", str(config)]) == 2
    line = one_error_line(capsys)
    assert f"schedule.layers={layers}" in line and needle in line
    assert not run_dir.exists() and not (tmp_path / "sgr").exists()


def test_prune_takes_original_indices_too(pruned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", str(pruned), "--layers", "5", "--out", str(tmp_path / "B")]) == 0
    assert json.loads((tmp_path / "B" / "config.json").read_text())["gradual_original_layers"] == [0, 2, 3, 4]
    capsys.readouterr()
    assert main(["prune", "--model", str(pruned), "--layers", "1", "--out", str(tmp_path / "C")]) == 2
    assert "removed earlier" in one_error_line(capsys) and not (tmp_path / "C").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("identity")
    config, run_dir = write_config(tmp, model__schedule__max_layers=1, model__schedule__steps_per_stage=1,
                                   data__sgr__cache_dir=str(tmp / "sgr"))
    assert main(["fit", "--config", str(config)]) == 0
    return config, run_dir


@pytest.mark.parametrize("override", [["--trainer.callbacks", '[{"class_path": "gradual.callbacks.TaskEvaluation", '
                                       '"init_args": {"tasks": ["category"], "n": 8}}, {"class_path": '
                                       '"gradual.callbacks.RetentionStopping", "init_args": {"threshold": 0.3}}]'],
                                      ["--data.sgr.n_per_task", "5"],
                                      ["--data.max_length", "200"],
                                      ["--seed_everything", "1"]],
                         ids=["callbacks", "sgr_prompts", "data_max_length", "global_seed"])
def test_a_changed_run_is_refused_and_the_old_one_kept(finished_run: tuple[Path, Path], override: list[str],
                                                       capsys: pytest.CaptureFixture[str],
                                                       request: pytest.FixtureRequest) -> None:
    config, run_dir = finished_run
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert main(["fit", "--config", str(config), *override]) == 2
    line = one_error_line(capsys)
    assert "already holds a different run (changed: " in line
    changed = {"callbacks": "changed: callbacks", "sgr_prompts": "data.sgr.n_per_task",
               "data_max_length": "data.max_length", "global_seed": "seed_everything"}
    assert changed[request.node.callspec.id] in line
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


@pytest.mark.parametrize("override", [[], ["--data.sgr.batch_size", "3"]], ids=["same", "generation_batch_size"])
def test_the_same_run_is_recognised(finished_run: tuple[Path, Path], override: list[str],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    config, run_dir = finished_run
    assert main(["fit", "--config", str(config), *override]) == 0
    assert "already complete" in capsys.readouterr().out


def python_built(run_dir: Path, sgr_cache: Path, max_length: int = 384,
                 threshold: float = 0.5) -> tuple[GradualModule, GradualDataModule, L.Trainer]:
    """The `finished_run` config's module, data module and Trainer as Python code builds them, without the CLI."""
    L.seed_everything(0)  # the config's seed_everything
    module = GradualModule(model="tiny:llama:6", schedule=Schedule(max_layers=1, steps_per_stage=1),
                           selection=Selection(num_calibration=8, calibration_max_length=64),
                           lora=LoraSettings(r=4, alpha=8, dropout=0.0), warmup_steps=1, run_dir=str(run_dir))
    sgr = SGRConfig(tasks=["successor", "copy"], n_per_task=4, cache_dir=str(sgr_cache),
                    decoding=DecodingConfig(do_sample=False, max_new_tokens=8))
    data = GradualDataModule(model="tiny:llama:6", sgr=sgr, batch_size=2, max_length=max_length)
    callbacks = [TaskEvaluation(tasks=["successor", "category"], n=8, max_new_tokens=6),
                 RetentionStopping(threshold=threshold, monitor="classification_mean"), Report(), StageCheckpoint()]
    trainer = L.Trainer(accelerator="cpu", devices=1, gradient_clip_val=1.0, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, use_distributed_sampler=False,
                        reload_dataloaders_every_n_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
    return module, data, trainer


def test_a_run_built_in_python_with_the_same_settings_is_the_same_run(finished_run: tuple[Path, Path]) -> None:
    """No CLI: the module takes its identity from the Trainer, data module and callbacks it is given, before
    `trainer.fit` as during it."""
    _, run_dir = finished_run
    state = (run_dir / "state.json").read_bytes()
    module, data, trainer = python_built(run_dir, run_dir.parent / "sgr")
    with pytest.raises(RuntimeError, match="needs the Trainer and data module"):
        module.run_config()  # not fitting, and told nothing: no identity to give
    module.check_run_dir(trainer, data)  # resumes: no refusal
    assert module.run_config() == json.loads(state)["config"]
    module, data, trainer = python_built(run_dir, run_dir.parent / "sgr")
    trainer.fit(module, datamodule=data)  # checked as the fit starts; the run is complete: nothing left to train
    assert module.run_config() == json.loads(state)["config"] and data.parts, "accepted: the data were built"
    assert (run_dir / "state.json").read_bytes() == state


@pytest.mark.parametrize(("changes", "key"), [({"max_length": 200}, "data.max_length"),
                                              ({"threshold": 0.3}, "callbacks.1.init_args.threshold")],
                         ids=["data", "threshold"])
def test_a_run_built_in_python_with_other_settings_is_refused_in_one_line_when_it_fits(
        finished_run: tuple[Path, Path], changes: dict[str, Any], key: str) -> None:
    """Refused by `trainer.fit` itself, before the data module builds any data."""
    _, run_dir = finished_run
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    module, data, trainer = python_built(run_dir, run_dir.parent / "sgr", **changes)
    with pytest.raises(UsageError) as refused:
        trainer.fit(module, datamodule=data)
    assert str(refused.value).splitlines() == [str(refused.value)]
    assert f"already holds a different run (changed: {key})" in str(refused.value)
    assert data.parts == [], "no recovery data was built"
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def _callbacks_yaml(tmp_path: Path, monitor: str, forms: list[str]) -> Path:
    path = tmp_path / "callbacks.yaml"
    path.write_text(json.dumps({"trainer": {"callbacks": [
        {"class_path": "gradual.callbacks.TaskEvaluation", "init_args": {"tasks": ["successor"], "n": 4,
                                                                          "forms": forms}},
        {"class_path": "gradual.callbacks.RetentionStopping", "init_args": {"monitor": monitor}}]}}))
    return path


@pytest.mark.parametrize(("monitor", "forms", "needle"), [
    ("generativ_mean", ["generative", "classification"], "allowed: held_out_generative_mean, "
                                                         "held_out_classification_mean, in_data_generative_mean"),
    ("held_out_generative_mean", ["generative"], "needs a held-out generative score, but the evaluation callbacks "
                                                 "fill only: successor (in-data)"),
    ("generative_mean", ["classification"], "needs a generative score"),
    ("mc_successor", ["generative"], "'mc_successor' is not a score"),
])
def test_a_bad_monitor_is_refused_before_recovery_data_or_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monitor: str, forms: list[str], needle: str) -> None:
    config, run_dir = write_config(tmp_path, data__sgr__cache_dir=str(tmp_path / "sgr"))
    assert main(["fit", "--config", str(config), "--config", str(_callbacks_yaml(tmp_path, monitor, forms))]) == 2
    line = one_error_line(capsys)
    assert f"monitor={monitor!r}" in line and needle in line
    assert not run_dir.exists() and not (tmp_path / "sgr").exists()


def test_a_monitor_needs_an_evaluation_callback_before_it() -> None:
    stop = RetentionStopping(monitor="generative_mean")
    with pytest.raises(UsageError, match="no evaluation callback before it"):
        stop.check_callbacks([stop, TaskEvaluation(tasks=["successor"])])
    stop.check_callbacks([TaskEvaluation(tasks=["successor"]), stop])


def _stage_history(history: list[StageRecord], in_data_tasks: tuple[str, ...] | list[str] = ()) -> StageHistory:
    """What a callback sees of the module outside a fit: its records, and Lightning's `log` as a no-op."""
    module = StageHistory(history=history, in_data_tasks=in_data_tasks)
    module.log = lambda *a, **k: None
    return module


def test_a_missing_monitor_value_is_an_error_naming_it() -> None:
    """Before: a missing key read as retention 0.0 and rolled back with a misleading message."""
    baseline = StageRecord(stage=0, depth=4, scores={"successor": {"score": 0.5, "form": "generative"}})
    stage = StageRecord(stage=1, depth=3, scores={"mc_successor": {"score": 0.5, "form": "classification"}})
    module = _stage_history([baseline, stage])
    trainer = bare_trainer()
    log_retention(trainer, module)  # as the evaluations do once they recorded the stage's scores
    with pytest.raises(RuntimeError, match="retention monitor 'successor' has no value at stage 1"):
        RetentionStopping(monitor="successor").on_train_epoch_end(trainer, module)
    assert not trainer.should_stop and stage.meets_threshold is None


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model.schedule.mode", "sideways"], "model.schedule.mode='sideways' is invalid; allowed: 'gradual', "
                                            "'one_shot'"),
    (["--model.schedule.max_layers", "x"], "model.schedule.max_layers='x' is invalid; allowed: int or null"),
    (["--data.batch_size", "2.5"], "data.batch_size='2.5' is invalid; allowed: int"),
    (["--model.nope", "1"], "unrecognized arguments: --model.nope 1"),
])
def test_values_the_parser_rejects_end_in_one_line(argv: list[str], needle: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config, run_dir = write_config(tmp_path)
    assert main(["fit", "--config", str(config), *argv]) == 2
    captured = capsys.readouterr()
    assert "usage:" not in captured.err and needle in one_error_line_from(captured.err)
    assert not run_dir.exists()


def one_error_line_from(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len([line for line in lines if "error" in line.lower()]) == 1 and lines[-1].startswith("gradual: error:")
    return lines[-1]


def test_parser_error_line_keeps_the_innermost_alternatives() -> None:
    message = ('Parser key "model.schedule":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
               "    - Problem with given class_path 'gradual.stages.Schedule':\n        Parser key \"mode\":\n"
               "          Expected a typing.Literal['gradual', 'one_shot']. Got value: sideways\n"
               "    - Expected a <class 'NoneType'>\n  Given value: NestedArg(key='mode', val='sideways')")
    assert parser_error_line(message) == "model.schedule.mode='sideways' is invalid; allowed: 'gradual', 'one_shot'"


def test_in_data_and_held_out_labels_follow_the_recovery_data(tmp_path: Path) -> None:
    """Smoke: SGR prompts of successor and copy; successor and category evaluated. Successor is in-data (its
    training problems fed recovery), category held-out; results.json, report.md and the stop message say so."""
    config, run_dir = write_config(tmp_path, model__schedule__max_layers=1, model__schedule__steps_per_stage=1,
                                   trainer__callbacks__0__init_args__n=16)
    assert main(["fit", "--config", str(config)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["in_data_tasks"] == ["copy", "successor"] and results["held_out_tasks"] == ["category"]
    baseline, stage = results["stages"][0]["scores"], results["stages"][1]["retention"]
    for key, group in (("successor", "in_data"), ("mc_successor", "in_data"), ("category", "held_out"),
                       ("mc_category", "held_out")):
        form = baseline[key]["form"]
        if baseline[key]["score"] > 0:  # the group mean of one task is that task's retention
            assert stage[f"{group}_{form}_mean"] == stage[key], key
    report = (run_dir / "report.md").read_text()
    assert "held-out tasks (nothing of them fed recovery): category" in report
    assert " successor* |" in report and " category |" in report


def test_a_stop_on_an_in_data_monitor_says_so() -> None:
    scores = {"successor": {"score": 0.5, "form": "generative"}, "category": {"score": 0.5, "form": "generative"}}
    baseline = StageRecord(stage=0, depth=4, scores=scores)
    stage = StageRecord(stage=1, depth=3, scores={**scores, "successor": {"score": 0.1, "form": "generative"}})
    module = _stage_history([baseline, stage], in_data_tasks=["successor"])
    trainer = bare_trainer()
    log_retention(trainer, module)  # as the evaluations do once they recorded the stage's scores
    RetentionStopping(monitor="in_data_generative_mean", threshold=0.5).on_train_epoch_end(trainer, module)
    module.conclude()  # the verdict, decided once the stage's callbacks have run
    assert trainer.should_stop and stage.retention["held_out_generative_mean"] == 1.0
    assert module.stop_reason == ("stage 1: in_data_generative_mean (in-data: measured on tasks the recovery data "
                                  "taught) retention 0.200 < threshold 0.5; rolled back to stage 0")


def option_descriptions(help_text: str, prefixes: tuple[str, ...]) -> dict[str, str]:
    """Each option of an argparse help text whose name starts with one of `prefixes`, with its description (the
    text in the help column, jsonargparse's "(type: ..., default: ...)" note removed)."""
    lines = help_text.splitlines()
    column = min(len(line) - len(line.lstrip()) for line in lines  # the help column (not the usage's "[--x X]" lines)
                 if line.startswith(" " * 20) and line.strip() and not line.lstrip().startswith("["))
    options: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            current = options.setdefault(name, []) if name.startswith(prefixes) else None
            if current is not None and len(line) > column and line[:column].endswith("  "):
                current.append(line[column:])  # the description starts on the option's own line
        elif current is not None and line.startswith(" " * column):
            current.append(line.strip())
        else:
            current = None
    described = {}
    for name, parts in options.items():
        text = " ".join(parts).strip()
        described[name] = re.sub(r"\s*\(type: .*\)\s*$", "", text, flags=re.S).strip()
    return described


def test_fit_help_describes_every_model_and_data_option(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `--model.*` and `--data.*` option of `gradual fit --help` has a description, the fields of the settings
    dataclasses (schedule, selection, lora, recovery, sgr and its decoding) included, listed one by one."""
    monkeypatch.setenv("COLUMNS", "120")
    try:
        code = main(["fit", "--help"])
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    described = option_descriptions(capsys.readouterr().out, ("--model.", "--data."))
    for name in ("--model.schedule.mode", "--model.selection.metric", "--model.lora.r", "--model.recovery.loss",
                 "--data.sgr.responses", "--data.sgr.decoding.temperature", "--data.sources", "--data.batch_size"):
        assert name in described, name
    assert len(described) > 60
    assert [name for name, text in described.items() if not text] == []
