"""`gradual fit` end to end on a tiny random Llama: stages, outputs, rollback, resume, modes, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gradual.cli import main
from gradual.lightning_cli import GradualCLI
from gradual.models import load_model
from gradual.surgery import remove_layers

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def write_config(tmp_path: Path, name: str = "run", **changes: object) -> tuple[Path, Path]:
    """The smoke config with dotted-key changes (e.g. `model.schedule.max_layers=2`), its run_dir in tmp_path."""
    config = yaml.safe_load(SMOKE.read_text())
    run_dir = tmp_path / name
    config["model"]["run_dir"] = str(run_dir)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = config
        for key in path:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, run_dir


def fit_in_process(config: Path) -> GradualCLI:
    cli = GradualCLI(args=["--config", str(config)], run=False)
    cli.model.check_run_dir()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[GradualCLI, Path]:
    config, run_dir = write_config(tmp_path_factory.mktemp("smoke"))
    return fit_in_process(config), run_dir


def test_stages_remove_one_layer_each_and_write_every_output(smoke_run: tuple[GradualCLI, Path]) -> None:
    cli, run_dir = smoke_run
    results = json.loads((run_dir / "results.json").read_text())
    stages = results["stages"]
    assert [s["depth"] for s in stages] == [6, 5, 4, 3]
    assert [len(s["removed_total"]) for s in stages] == [0, 1, 2, 3]
    for prev, cur in zip(stages, stages[1:], strict=False):
        assert set(prev["removed_total"]) < set(cur["removed_total"])
        assert sorted(cur["kept"] + cur["removed_total"]) == list(range(6))
        assert cur["steps"] == 2 and cur["loss"] is not None and cur["scores"] and cur["retention"]
    for k in range(4):
        metrics = json.loads((run_dir / f"stage_{k}" / "metrics.json").read_text())
        assert metrics["stage"] == k
    assert results["final_stage"] == 3 and results["stop_reason"] == "schedule complete"
    assert (run_dir / "stage_3" / "model.safetensors").is_file()
    assert not (run_dir / "stage_1" / "model.safetensors").exists()  # keep: last_good
    report = (run_dir / "report.md").read_text()
    assert "| stage | depth | removed |" in report and "wrong_value" in report
    assert (run_dir / "retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "logs" / "version_0" / "metrics.csv").is_file()
    assert json.loads((run_dir / "final" / "gradual.json").read_text())["removed"] == stages[-1]["removed_total"]


def test_final_loads_with_plain_transformers_and_matches_memory(smoke_run: tuple[GradualCLI, Path]) -> None:
    cli, run_dir = smoke_run
    loaded, info = AutoModelForCausalLM.from_pretrained(run_dir / "final", output_loading_info=True)
    assert not any(info.values())
    assert loaded.config.num_hidden_layers == 3
    assert loaded.config.gradual_original_layers == json.loads((run_dir / "results.json").read_text())[
        "stages"][-1]["kept"]
    assert torch.equal(logits(loaded.eval()), logits(cli.model.model.eval()))


def test_steps_zero_prunes_without_recovery(tmp_path: Path) -> None:
    config, run_dir = write_config(tmp_path, model__schedule__steps_per_stage=0, model__schedule__max_layers=2)
    cli = fit_in_process(config)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    reference = load_model("tiny:llama:6")
    kept = final.config.gradual_original_layers
    remove_layers(reference, [i for i in range(6) if i not in kept])
    assert torch.equal(logits(final), logits(reference))
    assert cli.trainer.global_step == 0


@pytest.mark.slow  # an end-to-end run of a minute or more; CI runs it (make test-slow)
def test_one_shot_and_gradual_share_depth_and_step_budget(tmp_path: Path) -> None:
    runs = {}
    for mode in ("gradual", "one_shot"):
        config, run_dir = write_config(tmp_path, mode, model__schedule__mode=mode, model__schedule__max_layers=2)
        cli = fit_in_process(config)
        stages = json.loads((run_dir / "results.json").read_text())["stages"]
        runs[mode] = (cli.trainer.global_step, len(stages[-1]["removed_total"]), len(stages) - 1)
    assert runs["gradual"] == (4, 2, 2)
    assert runs["one_shot"] == (4, 2, 1)


def test_threshold_stop_rolls_back_to_last_good_stage(tmp_path: Path) -> None:
    config, run_dir = write_config(
        tmp_path, trainer__callbacks__0__init_args__tasks=["successor"], trainer__callbacks__0__init_args__n=16,
        trainer__callbacks__1__init_args__threshold=0.7, trainer__callbacks__1__init_args__monitor="mc_successor",
        model__schedule__max_layers=4)
    fit_in_process(config)
    results = json.loads((run_dir / "results.json").read_text())
    oks = [s["meets_threshold"] for s in results["stages"]]
    assert oks == [None, True, False], "the tiny model's mc_successor drops below 0.7 retention at stage 2"
    assert results["final_stage"] == 1 and "rolled back to stage 1" in results["stop_reason"]
    final = load_file(run_dir / "final" / "model.safetensors")
    stage_1 = load_file(run_dir / "stage_1" / "model.safetensors")
    assert final.keys() == stage_1.keys() and all(torch.equal(final[k], stage_1[k]) for k in final)
    assert not (run_dir / "stage_2" / "model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final").config.num_hidden_layers == 5


def run_cli(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gradual", "fit", "--config", str(config), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # an end-to-end run of a minute or more; CI runs it (make test-slow)
def test_resume_after_kill_mid_stage_gives_same_final_weights(tmp_path: Path) -> None:
    """Through the real CLI: an uninterrupted run, and one killed during stage 2 then re-run with the same command."""
    changes = dict(model__schedule__steps_per_stage=6)
    whole_config, whole_dir = write_config(tmp_path, "whole", **changes)
    assert run_cli(whole_config).wait(timeout=600) == 0
    for name in ("final", "stage_3", "results.json", "report.md", "retention.png", "state.json"):
        assert (whole_dir / name).exists(), name

    config, run_dir = write_config(tmp_path, "killed", **changes)
    proc = run_cli(config)
    state = run_dir / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and len(json.loads(state.read_text())["history"]) == 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    saved = json.loads(state.read_text())
    assert not saved["finished"] and saved["resume_from"] == "stage_1"

    assert run_cli(config).wait(timeout=600) == 0
    a = load_file(whole_dir / "final" / "model.safetensors")
    b = load_file(run_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same = json.loads((whole_dir / "results.json").read_text())["stages"]
    resumed = json.loads((run_dir / "results.json").read_text())["stages"]
    assert [s["removed_total"] for s in same] == [s["removed_total"] for s in resumed]
    assert [s["scores"] for s in same] == [s["scores"] for s in resumed]


BAD_INPUTS = {
    "threshold": ({"trainer__callbacks__1__init_args__threshold": 1.5}, "threshold=1.5"),
    "threshold_zero": ({"trainer__callbacks__1__init_args__threshold": 0.0}, "threshold=0.0"),
    "max_layers_depth": ({"model__schedule__max_layers": 6}, "max_layers=6"),
    "max_layers_zero": ({"model__schedule__max_layers": 0}, "max_layers=0"),
    "metric": ({"model__selection__metric": "magic"}, "'magic'"),
    "task": ({"trainer__callbacks__0__init_args__tasks": ["poetry"]}, "'poetry'"),
    "architecture": ({"model__model": "tiny:bert"}, "'bert'"),
    "prompt_file": ({"data__sgr__source": "file", "data__sgr__path": "/nonexistent/prompts.jsonl"},
                    "/nonexistent/prompts.jsonl"),
    "code_not_enabled": ({"trainer__callbacks__0__init_args__tasks": ["humaneval"]}, "enable_code"),
    "zero_baseline": ({"trainer__callbacks__1__init_args__monitor": "successor"}, "zero baseline"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    changes, needle = BAD_INPUTS[case]
    config, run_dir = write_config(tmp_path, **changes)
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower()]
    assert errors == [err[-1]] and err[-1].startswith("gradual: error:") and needle in err[-1], err
    assert not run_dir.exists()


def test_empty_prompt_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("")
    config, run_dir = write_config(tmp_path, data__sgr__source="file", data__sgr__path=str(prompts))
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompts.jsonl" in err[0]
    assert not run_dir.exists()


def test_run_dir_holding_another_run_is_refused_and_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, run_dir = write_config(tmp_path)
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"config": {"model": "other"}}))
    (run_dir / "precious.txt").write_text("keep me")
    assert main(["fit", "--config", str(config)]) == 2
    assert "already holds a different run" in capsys.readouterr().err
    assert (run_dir / "precious.txt").read_text() == "keep me"


def test_console_script_exit_code(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path, model__schedule__max_layers=99)
    proc = subprocess.run([sys.executable, "-m", "gradual", "fit", "--config", str(config)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gradual: error: schedule.max_layers=99")


def test_gradient_accumulation_trains_steps_times_accumulation_batches(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path, model__schedule__max_layers=1, trainer__accumulate_grad_batches=2)
    cli = fit_in_process(config)
    assert cli.trainer.global_step == 2
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
