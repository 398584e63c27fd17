"""`gradual plan` (`gradual.footprint`): the estimate against measured peak memory on CPU, every config parses and
plans, and the refusals.

The measured side (`gradual.peak.measure_cpu`) runs one real recovery step — the project's LoRA / QLoRA, teacher,
`RecoveryObjective` and AdamW on random models of the config — in a fresh process, and reads the resident set's
high-water mark (`ru_maxrss`) less the resident set after imports. Chosen over torch's profiler because it also sees
allocations outside torch's allocator (bitsandbytes' NF4 codes) and, with glibc serving every allocation above 64 KiB
by mmap (`MALLOC_MMAP_THRESHOLD_`, set by `measure_cpu`), freed tensors leave the resident set at once: repeated
runs on this 2-core machine agree within a few MiB. A tiny model's memory is mostly interpreter and library overhead,
so the models here are sized (hidden 512-1024, vocab 8-32k, 4-6 layers, 1024 tokens a step) for the estimated terms
to be ~0.7-1.8 GiB: the logits-heavy case is dominated by the KD logits, the activation-heavy one by the layers'
saved tensors, the NF4 one by quantised weights beside activations.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig

from gradual import footprint
from gradual.cli import main

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))
GPU_CONFIGS = {"llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "mistral-7b-instruct", "llama-3.1-8b-instruct-fsdp"}

CASES = {
    "kd_logits": (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=32000),
                  dict(batch=4, length=256, loss="kd", teacher="original", distils=True)),
    "sft_activations": (dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=16000),
                        dict(batch=4, length=256, loss="sft")),
    "qlora_kd_nf4_teacher": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=8000),
                             dict(batch=2, length=256, loss="kd", teacher="original", distils=True, quantize="nf4",
                                  teacher_quantize="nf4")),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.startswith("qlora") else c
                                  for c in CASES])  # the NF4 case quantises on CPU: ~40-70 s
def test_the_estimate_is_within_20_percent_of_the_measured_cpu_peak(case, tmp_path):
    from gradual.peak import measure_cpu

    config, settings = CASES[case]
    LlamaConfig(max_position_embeddings=1024, **config).save_pretrained(tmp_path)
    s = footprint.RunSettings(plan=((0, 1),), accelerator="cpu", **settings)
    estimated = sum(footprint.estimate(footprint.model_shape(str(tmp_path)), s).training.values())
    measured = measure_cpu(tmp_path, s)["peak_bytes"]
    print(f"{case}: estimated {estimated / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, "
          f"ratio {estimated / measured:.3f}")
    assert measured > 500 * 2**20, "the step is too small for the estimated terms to dominate"
    assert abs(estimated / measured - 1) <= 0.2


def test_the_parameter_count_and_weights_are_the_meta_models():
    from gradual.tiny import tiny_model

    shape = footprint.model_shape("tiny:llama:4")
    model = tiny_model("llama", 4)
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    assert footprint.weight_bytes(shape, 4, 4, None) == 4 * shape.parameters()
    three = tiny_model("llama", 3)
    assert shape.parameters(3) == sum(p.numel() for p in three.parameters())
    nf4 = footprint.weight_bytes(shape, 4, 4, "nf4")
    assert nf4 < footprint.weight_bytes(shape, 4, 4, None)
    assert math.isclose(footprint.nf4_bytes(64 * 256), 64 * 256 / 2 + 256 + 4)


def test_the_offline_aliases_plan_before_their_conversion(monkeypatch, tmp_path):
    """With an empty cache (nothing converted yet) every offline alias plans from the built-in table, at the
    parameter count of its converted model (268,098,176 for Gemma 3 270M, 134,515,008 for SmolLM2-135M)."""
    from gradual import models

    monkeypatch.setenv("GRADUAL_CACHE", str(tmp_path))
    assert set(models.GGUF_ALIASES) <= set(footprint.BUILTIN_CONFIGS)
    shapes = {name: footprint.model_shape(name) for name in models.GGUF_ALIASES}
    assert {name: shape.source for name, shape in shapes.items()} == {name: "built-in table" for name in shapes}
    assert shapes["gemma3-270m"].parameters() == 268_098_176 and shapes["gemma3-270m"].layers == 18
    assert shapes["smollm2-135m-instruct"].parameters() == 134_515_008

def test_the_three_7_8b_models_plan_offline_from_the_built_in_table():
    sizes = {"meta-llama/Llama-3.1-8B-Instruct": 8.03e9, "Qwen/Qwen2.5-7B-Instruct": 7.62e9,
             "mistralai/Mistral-7B-Instruct-v0.3": 7.25e9}
    for name, params in sizes.items():
        shape = footprint.model_shape(name)
        assert abs(shape.parameters() / params - 1) < 0.005, name


def _config_path(path: Path, tmp_path: Path) -> Path:
    """compare.yaml is a fit config with a `compare:` section, which `gradual compare` reads and `fit` refuses."""
    data = yaml.safe_load(path.read_text())
    if "compare" not in data:
        return path
    data.pop("compare")
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_parses_and_plans(path, tmp_path, capsys):
    args = ["plan", "--config", str(_config_path(path, tmp_path))]
    if path.stem in GPU_CONFIGS:
        args += ["--device-memory", "80"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "plan: peak per device" in out and "fits:" in out
    assert "recovery tokens per stage" in out and "disk per saved stage" in out


def test_the_7_8b_configs_distil_from_an_nf4_teacher_and_fit_80_gib(capsys):
    for stem in ("llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "mistral-7b-instruct"):
        assert main(["plan", "--config", f"configs/{stem}.yaml", "--device-memory", "80"]) == 0
        out = capsys.readouterr().out
        assert "teacher weights (nf4)" in out and "KD logits" in out, stem
        peak = float(out.split("plan: peak per device ")[1].split(" GiB")[0])
        assert 30 < peak < 0.9 * 80, stem


def test_a_plan_that_does_not_fit_is_one_line_and_exit_2(capsys):
    assert main(["plan", "--config", "configs/llama-3.1-8b-instruct.yaml", "--device-memory", "24"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradual: error: plan does not fit: needs")
    assert "of 24.0 GiB" in err[0]
    assert "plan: peak per device" in captured.out  # the table says why


@pytest.mark.parametrize(("override", "named"), [(["--data.batch_size", "0"], "data.batch_size=0"),
                                                 (["--data.max_length", "1"], "data.max_length=1"),
                                                 (["--model.quantize", "nf5"], "model.quantize='nf5'"),
                                                 (["--model.recovery.loss", "kx"], "recovery.loss='kx'"),
                                                 (["--trainer.devices", "0"], "trainer.devices='0'"),
                                                 (["--model.recovery.params", "full"], "recovery.params='full'"),
                                                 (["--model.repair", "lstsq"], "repair='lstsq' folds a map")])
def test_a_value_fit_would_refuse_is_refused_by_the_plan_too(override, named, capsys):
    """`plan` builds nothing, but checks what it reads as `fit` does: no plan is printed for a run that cannot run."""
    assert main(["plan", "--config", "configs/llama-3.1-8b-instruct.yaml", "--device-memory", "80", *override]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "plan:" not in captured.out


def test_a_comparison_config_is_refused_with_what_plan_takes(capsys):
    assert main(["plan", "--config", "configs/compare.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configs/compare.yaml is a `gradual compare` config" in err[0]

@pytest.mark.parametrize("value", ["0", "-3", "nan", "many"])
def test_a_bad_device_memory_is_one_line_and_exit_2(value, capsys):
    assert main(["plan", "--config", "configs/smoke.yaml", "--device-memory", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--device-memory {value!r} is invalid" in err[0]


def test_fit_with_plan_is_the_plan_and_trains_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["fit", "--config", "configs/smoke.yaml", "--plan", "--model.run_dir", str(run_dir)]) == 0
    fit_out = capsys.readouterr().out
    assert main(["plan", "--config", "configs/smoke.yaml", "--model.run_dir", str(run_dir)]) == 0
    assert capsys.readouterr().out == fit_out
    assert not run_dir.exists()


def test_a_bad_override_is_refused_like_fit_refuses_it(capsys):
    assert main(["plan", "--config", "configs/smoke.yaml", "--model.schedule.mode", "sideways"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sideways" in err[0]


def test_a_model_without_a_config_is_one_line(tmp_path, capsys):
    assert main(["plan", "--config", "configs/smoke.yaml", "--model.model", "nobody/no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nobody/no-such-model" in err[0]


def test_the_gpu_checks_dry_run_lists_every_step_and_names_what_is_missing(tmp_path):
    """On this CPU machine the dry run runs nothing, names CUDA (and vLLM where absent) as missing and exits 1."""
    import importlib.util
    import subprocess
    import sys

    import torch

    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--dry-run", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    for step in ("bench", "fit", "sgr_vllm", "plan", "vllm_final", "lm_eval_vllm"):
        assert f"[{step}]" in done.stdout
    assert not (tmp_path / "out").exists()
    missing = [line for line in done.stdout.splitlines() if line.startswith("gpu_check: missing: ")]
    assert any("CUDA" in line for line in missing) == (not torch.cuda.is_available())
    assert any("vLLM" in line for line in missing) == (importlib.util.find_spec("vllm") is None)
    assert done.returncode == (1 if missing else 0)
