"""QLoRA in the pruning loop (`model.quantize: nf4`, CPU): 4-bit base while healing, float weights on disk, the
model written is the model scored, and a resumed run is the uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from rank_probe import probe_callback, weights_checksum
from safetensors.torch import load_file
from test_fit import SMOKE, fit_in_process, kill_during_stage_2, run_cli, write_config
from transformers import AutoModelForCausalLM

from gradual.lora import dequantize
from gradual.models import load_model
from gradual.surgery import remove_layers

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pruned_without_recovery(kept: list[int]) -> dict[str, torch.Tensor]:
    """The NF4-loaded model with the same layers removed, de-quantised: what a stage is before its adapters (all
    of them kept: the unpruned model as it was scored)."""
    model = load_model("tiny:llama:6", quantize="nf4")
    remove_layers(model, [i for i in range(6) if i not in kept])
    return {k: v.detach().clone() for k, v in dequantize(model).state_dict().items()}


def assert_plain_float_checkpoint(path: Path) -> AutoModelForCausalLM:
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    assert getattr(model.config, "quantization_config", None) is None
    assert {t.dtype for t in load_file(path / "model.safetensors").values()} == {torch.float32}
    return model


@pytest.mark.slow  # an end-to-end run of a minute or more; CI runs it (make test-slow)
def test_qlora_stages_heal_a_4bit_base_and_save_float_weights(tmp_path: Path) -> None:
    callbacks = yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"]
    callbacks[-1]["init_args"]["keep"] = "all"
    callbacks.append(probe_callback(tmp_path / "probe"))
    config, run_dir = write_config(tmp_path, model__quantize="nf4", model__schedule__max_layers=2,
                                   trainer__callbacks=callbacks)
    cli = fit_in_process(config)
    probe = json.loads((tmp_path / "probe" / "rank0.json").read_text())

    # every training step ran on NF4 base layers, stage 2 on a merged float model quantised again; adapters learned
    steps = probe["steps"]
    assert [s["stage"] for s in steps] == [1, 1, 2, 2]
    linears = [len(s["kept"]) * len(TARGETS) for s in probe["stages"]]
    assert [s["linear4bit"] for s in steps] == [linears[0]] * 2 + [linears[1]] * 2
    for i, s in enumerate(steps):
        grads_a = [g for name, g in s["grads"].items() if "lora_A" in name]
        grads_b = [g for name, g in s["grads"].items() if "lora_B" in name]
        assert grads_a and grads_b and None not in grads_a + grads_b
        assert any(g != 0 for g in grads_b)
        assert any(g != 0 for g in grads_a) == (i % 2 == 1)  # lora_B starts at 0: A learns once B has moved
        assert s["lora_b_max"] > 0  # after the optimizer step
    # callbacks (evaluation, checkpoint) see the merged, de-quantised float model
    assert [s["linear4bit"] for s in probe["stages"]] == [0, 0]
    assert weights_checksum(cli.model.model) == probe["stages"][-1]["checksum"]

    # stage 1 on disk = de-quantised base + adapter delta: adapter targets moved, everything else is untouched
    stage_1 = assert_plain_float_checkpoint(run_dir / "stage_1").state_dict()
    reference = pruned_without_recovery(probe["stages"][0]["kept"])
    assert stage_1.keys() == reference.keys()
    moved = {k for k in stage_1 if not torch.equal(stage_1[k], reference[k])}
    assert moved and all(any(t in k for t in TARGETS) for k in moved), moved
    assert all(any(k.endswith(f"{t}.weight") and f"layers.{i}." in k for k in moved)
               for t in TARGETS for i in range(len(probe["stages"][0]["kept"])))

    final = assert_plain_float_checkpoint(run_dir / "final")
    assert final.config.num_hidden_layers == 4
    assert weights_checksum(final) == probe["stages"][-1]["checksum"]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []


def test_qlora_without_recovery_still_saves_float_weights(tmp_path: Path, avx512bf16_cpu: None) -> None:
    """steps 0: nothing merges, so the stage end de-quantises the NF4-loaded model, which scoring and evaluation
    ran in eval mode, and saves exactly what a fresh de-quantisation gives."""
    config, run_dir = write_config(tmp_path, model__quantize="nf4", model__schedule__max_layers=1,
                                   model__schedule__steps_per_stage=0)
    cli = fit_in_process(config)
    assert cli.trainer.global_step == 0
    final = assert_plain_float_checkpoint(run_dir / "final").state_dict()
    assert_same_tensors(final, pruned_without_recovery(json.loads((run_dir / "final" / "gradual.json").read_text())[
        "kept"]))


def test_qlora_rollback_to_stage_0_writes_the_scored_nf4_model(tmp_path: Path, avx512bf16_cpu: None) -> None:
    """Stage 0 was evaluated on the NF4 model, so a rollback to it writes that model de-quantised, not the
    original float one."""
    callbacks = yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"]
    callbacks[1] = {"class_path": "rank_probe.RejectEveryStage"}  # in place of RetentionStopping
    config, run_dir = write_config(tmp_path, model__quantize="nf4", model__schedule__max_layers=1,
                                   trainer__callbacks=callbacks)
    fit_in_process(config)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final_stage"] == 0 and results["stages"][1]["meets_threshold"] is False
    final = assert_plain_float_checkpoint(run_dir / "final").state_dict()
    assert_same_tensors(final, pruned_without_recovery(list(range(6))))


@pytest.mark.slow  # three CLI runs of about a minute in all; CI runs it (make test-slow)
def test_qlora_resume_after_kill_mid_stage_is_the_uninterrupted_run(tmp_path: Path) -> None:
    """Through the real CLI, as test_fit's float resume test: a resumed stage starts from the saved float weights,
    as the uninterrupted run starts it from the merged float model, so scores and `final/` are equal."""
    changes = dict(model__quantize="nf4", model__schedule__max_layers=2, model__schedule__steps_per_stage=6)
    whole_config, whole_dir = write_config(tmp_path, "whole", **changes)
    assert run_cli(whole_config).wait(timeout=600) == 0

    config, run_dir = write_config(tmp_path, "killed", **changes)
    kill_during_stage_2(config, run_dir)
    assert run_cli(config).wait(timeout=600) == 0
    assert_same_tensors(load_file(whole_dir / "final" / "model.safetensors"),
                        load_file(run_dir / "final" / "model.safetensors"))
    same = json.loads((whole_dir / "results.json").read_text())["stages"]
    resumed = json.loads((run_dir / "results.json").read_text())["stages"]
    assert len(same) == len(resumed) == 3
    for key in ("removed_total", "importance", "scores"):
        assert [s[key] for s in same] == [s[key] for s in resumed], key
