"""`gradual fit` end to end on a tiny random Llama: stages, outputs, rollback, resume, modes, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import gradual.datamodule
from gradual.cli import main
from gradual.lightning_cli import GradualCLI
from gradual.models import load_model
from gradual.sgr import build_pairs
from gradual.sgr.fingerprint import weights_digest
from gradual.surgery import remove_layers
from gradual.training_examples import tokenize_pair

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
    cli.model.check_run_dir(cli.trainer, cli.datamodule)
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
    """...and builds no recovery data: the smoke config's SGR source would have the teacher answer its prompts."""
    config, run_dir = write_config(tmp_path, model__schedule__steps_per_stage=0, model__schedule__max_layers=2,
                                   data__sgr__cache_dir=str(tmp_path / "sgr"))
    cli = fit_in_process(config)
    assert not (tmp_path / "sgr").exists() or not any((tmp_path / "sgr").iterdir()), "answers generated for nothing"
    assert [p.name for p in cli.datamodule.parts] == ["placeholder"]
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


def kill_during_stage_2(config: Path, run_dir: Path) -> None:
    """Start `gradual fit` on `config` and SIGKILL it once stage 2 has begun (stage 1 saved, resumable)."""
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


@pytest.mark.slow  # an end-to-end run of a minute or more; CI runs it (make test-slow)
def test_resume_after_kill_mid_stage_gives_same_final_weights(tmp_path: Path) -> None:
    """Through the real CLI: an uninterrupted run, and one killed during stage 2 then re-run with the same command."""
    changes = dict(model__schedule__steps_per_stage=6)
    whole_config, whole_dir = write_config(tmp_path, "whole", **changes)
    assert run_cli(whole_config).wait(timeout=600) == 0
    for name in ("final", "stage_3", "results.json", "report.md", "retention.png", "state.json"):
        assert (whole_dir / name).exists(), name

    config, run_dir = write_config(tmp_path, "killed", **changes)
    kill_during_stage_2(config, run_dir)
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
    "task_ablation_tasks": ({"model__selection__metric": "task_ablation"}, "selection.tasks=None"),
    "selection_task": ({"model__selection__metric": "task_ablation", "model__selection__tasks": ["poetry"]},
                       "'poetry'"),
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


class _StageRecorder(Callback):
    """Per stage: the examples trained on (padding stripped) and the digest of the model the stage left (merged)."""

    def __init__(self) -> None:
        self.trained: dict[int, set[tuple[int, ...]]] = {}
        self.left: dict[int, str] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.left.setdefault(pl_module.stage, weights_digest(pl_module.model))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        rows = self.trained.setdefault(pl_module.stage, set())
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            rows.add(tuple(ids[: int(mask.sum())].tolist()))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.left[pl_module.stage] = weights_digest(pl_module.model)


def fit_recording_teachers(config: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[_StageRecorder,
                                                                                    list[tuple[str, set]]]:
    """Fit in process; record every set of recovery pairs the data module builds, keyed by its teacher's digest
    (the real `build_pairs`, wrapped), as the tokenised examples a stage would train on."""
    produced: list[tuple[str, set[tuple[int, ...]]]] = []

    def recording(model: torch.nn.Module, tokenizer: Any, cfg: Any, **kwargs: Any) -> list[dict[str, str]]:
        pairs = build_pairs(model, tokenizer, cfg, **kwargs)
        examples = {tuple(tokenize_pair(tokenizer, p["prompt"], p["response"], cfg.system_prompt, 384,
                                        cfg.chat)["input_ids"]) for p in pairs}
        produced.append((weights_digest(model), examples))
        return pairs

    monkeypatch.setattr(gradual.datamodule, "build_pairs", recording)
    recorder = _StageRecorder()
    cli = GradualCLI(args=["--config", str(config)], run=False)
    cli.trainer.callbacks.append(recorder)
    cli.model.check_run_dir(cli.trainer, cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return recorder, produced


def test_teacher_previous_trains_stage_k_on_answers_of_stage_k_minus_1(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning builds a stage's loader before the stage starts; the answers must already be those of the model the
    last stage left (merged), not of the one before it. A run resumed after stage 1 gets the same stage 2."""
    config, run_dir = write_config(tmp_path, data__sgr__teacher="previous", data__sgr__cache_dir=str(tmp_path / "sgr"),
                                   trainer__callbacks__3__init_args__keep="all")
    recorder, produced = fit_recording_teachers(config, monkeypatch)
    assert sorted(recorder.trained) == [1, 2, 3]
    teachers = [digest for digest, _ in produced]
    assert teachers == [recorder.left[0], recorder.left[1], recorder.left[2]], "original, then each stage's result"
    answers = [examples for _, examples in produced]
    for k in (1, 2, 3):
        assert recorder.trained[k] <= answers[k - 1], f"stage {k} trained on answers of another model"
        if k > 1:
            assert not recorder.trained[k] <= answers[k - 2], f"stage {k} trained on stage {k - 2}'s answers"

    state = json.loads((run_dir / "state.json").read_text())
    (run_dir / "state.json").write_text(json.dumps({**state, "resume_from": "stage_1", "finished": False}))
    resumed, produced = fit_recording_teachers(config, monkeypatch)
    assert sorted(resumed.trained) == [2, 3]
    assert produced[1][0] == recorder.left[1], "on resume, the answers come from the saved stage 1"
    assert resumed.trained[2] == recorder.trained[2]


@pytest.mark.parametrize(("model_dtype", "data_dtype", "expected"), [
    ("bfloat16", None, "bfloat16"), ("float16", "float32", "float32"), ("float32", None, "float32")])
def test_teacher_dtype_follows_the_model_unless_set(model_dtype: str, data_dtype: str | None, expected: str,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 run must not generate its SGR answers in float32; an explicit `data.dtype` still wins."""
    changes: dict[str, object] = {"model__dtype": model_dtype, "data__sgr__cache_dir": str(tmp_path / "sgr")}
    if data_dtype is not None:
        changes["data__dtype"] = data_dtype
    config, _ = write_config(tmp_path, **changes)
    cli = GradualCLI(args=["--config", str(config)], run=False)
    assert cli.datamodule.dtype_name == expected
    loaded: list[torch.dtype] = []
    real = gradual.datamodule.models.load_model
    monkeypatch.setattr(gradual.datamodule.models, "load_model",
                        lambda *a, **k: loaded.append((model := real(*a, **k)).dtype) or model)
    cli.datamodule.setup("fit")
    assert loaded == [getattr(torch, expected)], "the teacher that answered was loaded in that dtype"


GPU_CONFIGS = [ROOT / "configs" / f"{name}.yaml" for name in
               ("llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "mistral-7b-instruct")]


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda path: path.stem)
def test_gpu_configs_parse_with_a_long_ddp_timeout_and_large_tasks(config: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`--print_config` parses everything and loads no model, so the paper-scale configs are checked on a CPU."""
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    hours, minutes, seconds = map(int, strategy["init_args"]["timeout"].split(":"))
    assert timedelta(hours=hours, minutes=minutes, seconds=seconds) >= timedelta(hours=2), "default 30 min is short"
    evaluations = [c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("TaskEvaluation")]
    assert [c["init_args"]["difficulty"] for c in evaluations] == ["large"]
    assert printed["data"]["sgr"]["difficulty"] == "large"
    assert printed["model"]["dtype"] == "bfloat16" and printed["data"]["dtype"] is None, "the teacher follows bf16"


def test_fsdp_gpu_config_parses_full_weight_distillation_sharded_over_every_gpu(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The commented FSDP config (configs/llama-3.1-8b-instruct-fsdp.yaml) parses: ModelParallelStrategy with every
    rank data-parallel, full-weight KD from a bf16 teacher, large task problems, a long collective timeout."""
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(ROOT / "configs" / "llama-3.1-8b-instruct-fsdp.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert strategy["init_args"]["tensor_parallel_size"] == 1
    processes = printed["trainer"]["devices"] * printed["trainer"]["num_nodes"]
    assert strategy["init_args"]["data_parallel_size"] == processes
    assert strategy["init_args"]["timeout"] == "4:00:00"
    recovery = printed["model"]["recovery"]
    assert (recovery["params"], recovery["loss"], recovery["teacher_dtype"]) == ("full", "kd", "bfloat16")
    assert printed["model"]["quantize"] is None and printed["data"]["sgr"]["difficulty"] == "large"


def test_ddp_timeout_from_yaml_reaches_the_strategy(tmp_path: Path) -> None:
    """The GPU configs' strategy block, on the CPU smoke run: jsonargparse turns "4:00:00" into the timedelta DDP
    passes to `init_process_group`."""
    strategy = yaml.safe_load(GPU_CONFIGS[0].read_text())["trainer"]["strategy"]
    config, _ = write_config(tmp_path, trainer__strategy=strategy)
    cli = GradualCLI(args=["--config", str(config)], run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert cli.trainer.strategy._timeout == timedelta(hours=4)


@pytest.mark.parametrize(("changes", "key"), [
    ({"trainer__accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches"),
    ({"trainer__limit_train_batches": 0.5}, "trainer.limit_train_batches"),
    ({"trainer__gradient_clip_val": 0.5}, "trainer.gradient_clip_val"),
    ({"trainer__precision": "bf16-mixed"}, "trainer.precision"),
    ({"model__optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}}, "optimizer"),
])
def test_resume_under_trainer_settings_that_change_the_training_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], key: str) -> None:
    """The run used accumulate_grad_batches 1: a resume with 2 would train 8 examples per stage instead of 4, some of
    them the finished stage's. Refused in one line naming the key, and nothing in the run directory changes."""
    config, run_dir = write_config(tmp_path, model__schedule__max_layers=2)
    assert main(["fit", "--config", str(config)]) == 0
    capsys.readouterr()
    state = (run_dir / "state.json").read_bytes()
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    changed, _ = write_config(tmp_path, "run", model__schedule__max_layers=2, **changes)
    assert main(["fit", "--config", str(changed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a different run" in err[0] and key in err[0], err
    assert (run_dir / "state.json").read_bytes() == state
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == files


def test_the_default_schedule_plans_down_to_the_protected_layers_and_runs(tmp_path: Path) -> None:
    """No `max_layers`/`target_ratio` (the defaults): the plan removes layers until only the protected first and
    last ones are left, instead of planning stages that no layer choice can fill and refusing the run."""
    config, run_dir = write_config(tmp_path, model__schedule__max_layers=None, model__schedule__steps_per_stage=0,
                                   trainer__callbacks=[{"class_path": "gradual.callbacks.Report"},
                                                       {"class_path": "gradual.callbacks.StageCheckpoint"}])
    assert main(["fit", "--config", str(config)]) == 0
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    assert [s["depth"] for s in stages] == [6, 5, 4, 3, 2]
    assert [s["kept"] for s in stages][-1] == [0, 5]


def test_task_ablation_from_fit_chooses_on_selection_problems_only(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`selection.metric: task_ablation` runs end to end, and the problems it scores are the `select` split's: none is
    a problem the evaluation scored, though both use `successor`."""
    import gradual.tasks.selection as selection_module
    from gradual.tasks.base import Task

    drawn: dict[str, set[str]] = {"eval": set(), "train": set(), "select": set()}
    real_problems = Task.problems

    def problems(self: Task, split: str = "eval", n: int = 100, seed: int = 0) -> list:
        out = real_problems(self, split, n, seed)
        drawn[split] |= {p.question for p in out}
        return out

    scored: list[str] = []
    real_logprobs = selection_module.continuation_logprobs

    def logprobs(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], **kwargs: Any) -> Any:
        scored.extend(context.rsplit("Q: ", 1)[1].removesuffix("\nA:") for context, _ in pairs)
        return real_logprobs(model, tokenizer, pairs, **kwargs)

    monkeypatch.setattr(Task, "problems", problems)
    monkeypatch.setattr(selection_module, "continuation_logprobs", logprobs)
    config, run_dir = write_config(tmp_path, model__selection__metric="task_ablation",
                                   model__selection__tasks=["successor", "category"], model__selection__n=4,
                                   model__schedule__max_layers=2)
    assert main(["fit", "--config", str(config)]) == 0
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    assert len(stages) == 3 and (run_dir / "final" / "model.safetensors").is_file()
    for stage in stages[1:]:
        record = stage["importance"]
        assert record["metric"] == "task_ablation" and stage["removed"] == record["ranking"][:1]
        scores = [s for s in record["scores"] if s is not None]
        assert len(scores) == stage["depth"] + 1 - 2 and record["scores"][0] is None, "protected layers not scored"
        layer = record["original"][record["scores"].index(min(scores))]
        assert stage["removed"] == [layer], "the layer whose skip lowers the score least goes"
    # per stage: the baseline and one scoring per unprotected layer (4, then 3), each of 4 problems of 2 tasks
    assert len(scored) == (1 + 4 + 1 + 3) * 4 * 2
    assert set(scored) == drawn["select"] and len(drawn["select"]) == 8
    assert drawn["eval"] and drawn["train"], "the evaluation and the recovery data drew their own problems"
    assert not set(scored) & drawn["eval"]


def _ranked_config(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """`random` layer choice (a new permutation every stage when re-scored), the ranking kept, every stage saved."""
    return write_config(
        tmp_path, name, model__selection__metric="random", model__selection__rescore=False,
        trainer__callbacks=[{"class_path": "gradual.callbacks.TaskEvaluation",
                             "init_args": {"tasks": ["successor"], "n": 4, "forms": ["classification"]}},
                            {"class_path": "gradual.callbacks.Report"},
                            {"class_path": "gradual.callbacks.StageCheckpoint", "init_args": {"keep": "all"}}])


def test_rescore_false_removes_layers_in_the_unpruned_rankings_order_also_after_a_resume(tmp_path: Path) -> None:
    from gradual.importance import score_layers
    from gradual.surgery import original_indices

    unpruned = load_model("tiny:llama:6")
    ranking = score_layers(unpruned, None, "random", seed=0, progress=False).order(1, 1)  # stage 1 scores with seed 0
    pruned = load_model("tiny:llama:6")
    remove_layers(pruned, [ranking[0]])
    rescored = score_layers(pruned, None, "random", seed=1, progress=False).order(1, 1)
    assert original_indices(pruned)[rescored[0]] != ranking[1], "re-scoring would choose another layer at stage 2"

    config, run_dir = _ranked_config(tmp_path, "kept")
    assert main(["fit", "--config", str(config)]) == 0
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    assert stages[1]["importance"]["ranking"] == ranking
    assert [s["removed"] for s in stages[1:]] == [[r] for r in ranking[:3]]
    assert [s["importance"].get("rescored") for s in stages[1:]] == [None, False, False]

    # interrupted after stage 1: the resumed run reads the ranking from state.json (here altered, so nothing but the
    # saved ranking can produce the order it follows) rather than scoring the healed stage-1 model
    state = json.loads((run_dir / "state.json").read_text())
    altered = [ranking[0], *reversed(ranking[1:])]
    state["history"][1]["importance"]["ranking"] = altered
    (run_dir / "state.json").write_text(json.dumps({**state, "resume_from": "stage_1", "finished": False}))
    assert main(["fit", "--config", str(config)]) == 0
    resumed = json.loads((run_dir / "results.json").read_text())["stages"]
    assert [s["removed"] for s in resumed[1:]] == [[r] for r in altered[:3]]
    assert resumed[1]["timings"] == stages[1]["timings"], "stage 1 was not redone"
