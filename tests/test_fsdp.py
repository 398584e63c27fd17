"""Full-weight recovery under FSDP (Lightning's ModelParallelStrategy, `gradual.sharding`) on two gloo CPU ranks.

The same run under DDP is the reference: with the same layers removed, the same per-rank batches, averaged gradients
and the same clipping and AdamW, sharding must not change what is learnt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rank_probe import probe_callback
from safetensors.torch import load_file
from test_fit import SMOKE, write_config
from transformers import AutoModelForCausalLM

from gradual import tiny
from gradual.lightning_cli import GradualCLI

TESTS = Path(__file__).resolve().parent
FSDP = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}


def _run(tmp_path: Path, name: str, strategy: Any) -> tuple[list[dict[str, Any]], Path]:
    callbacks = [c for c in yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"]
                 if not c["class_path"].endswith("RetentionStopping")]
    callbacks.append(probe_callback(tmp_path / f"probe-{name}"))
    config, run_dir = write_config(
        tmp_path, name, model__schedule__max_layers=2, model__schedule__layers=[2, 3],
        model__recovery={"loss": "kd+sft", "params": "full"}, trainer__strategy=strategy, trainer__devices=2,
        trainer__callbacks=callbacks, data__sgr__cache_dir=str(tmp_path / "sgr_cache"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "gradual", "fit", "--config", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"probe-{name}" / f"rank{r}.json").read_text()) for r in (0, 1)], run_dir


@pytest.mark.slow  # two two-rank end-to-end runs; CI runs it (make test-slow)
def test_fsdp_full_weight_recovery_learns_what_ddp_learns(tmp_path: Path) -> None:
    fsdp, fsdp_dir = _run(tmp_path, "fsdp", FSDP)
    ddp, ddp_dir = _run(tmp_path, "ddp", "ddp")

    for a, b in zip(fsdp[0]["steps"], fsdp[1]["steps"], strict=True):  # sharded weights, different batches
        assert a["wrapper"] == b["wrapper"] == "GradualModule"
        assert a["sharded"] == b["sharded"] == a["trainable"] > 0
        assert a["batch"] != b["batch"] and a["loss"] != b["loss"]
        assert a["grads"] == b["grads"]  # reduce-scattered, then gathered for the probe: one gradient
        assert any(g != 0 for g in a["grads"].values())
    assert [s["stage"] for s in fsdp[0]["steps"]] == [1, 1, 2, 2]
    assert all(s["sharded"] == 0 for s in ddp[0]["steps"])
    assert fsdp[0]["stages"] == fsdp[1]["stages"]  # gathered back: bit-identical plain models on both ranks
    assert [s["kept"] for s in fsdp[0]["stages"]] == [s["kept"] for s in ddp[0]["stages"]] == [[0, 1, 3, 4, 5],
                                                                                                [0, 1, 4, 5]]

    for f, d in zip(fsdp[0]["steps"], ddp[0]["steps"], strict=True):  # the same batches, losses and gradients
        assert f["batch"] == d["batch"]
        assert f["loss"] == pytest.approx(d["loss"], rel=1e-5)
        assert f["grads"].keys() == d["grads"].keys()
        for name, g in f["grads"].items():
            assert g == pytest.approx(d["grads"][name], rel=1e-3, abs=1e-5), name

    a = AutoModelForCausalLM.from_pretrained(fsdp_dir / "final")
    b = AutoModelForCausalLM.from_pretrained(ddp_dir / "final")
    plain = [{k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"} for m in (a, b)]
    assert a.config.num_hidden_layers == 4 and plain[0] == plain[1]  # the kept-layer map included
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    results = json.loads((fsdp_dir / "results.json").read_text())
    assert [s["removed_total"] for s in results["stages"]] == [[], [2], [2, 3]]


@pytest.mark.parametrize(("changes", "message"), [
    ({"model__recovery": {"params": "lora"}}, "recovery.params='lora' with trainer.strategy ModelParallelStrategy"),
    ({"model__recovery": {"params": "full"}, "trainer__strategy": {**FSDP, "init_args": {"data_parallel_size": 1,
                                                                                          "tensor_parallel_size": 2}}},
     "tensor_parallel_size=2 is not supported"),
])
def test_fsdp_refuses_what_it_cannot_shard_before_any_model_loads(tmp_path: Path, changes: dict[str, Any],
                                                                  message: str) -> None:
    from gradual.errors import UsageError

    config, _ = write_config(tmp_path, **{"trainer__strategy": FSDP, "trainer__devices": 2, **changes})
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GradualCLI(args=["--config", str(config)], run=False)


def test_unshard_gives_back_the_plain_pruned_model(tmp_path: Path) -> None:
    """shard → unshard on two ranks: the same logits, a plain model of the same class, the kept-layer map, tied
    embeddings still tied, no meta tensors left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS),
                                                                                os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(TESTS / "fsdp_roundtrip.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["was_sharded"] and not out["is_sharded"] and not out["meta"]
        assert out["class"] == "LlamaForCausalLM" and out["tied"]
        assert out["kept"] == [0, 1, 3, 4]
        assert out["max_diff"] == 0.0
        assert any("rotary" in b for b in out["buffers"])


# name -> (tiny arch, layers, removed positions, stale). Tiny Gemma3 layer types are [s, s, full, s] and Gemma2's
# alternate [s, full, s, full]: each removal below empties one type; the other architectures have one type only.
SAVED_CASES: dict[str, tuple[str, int, list[int], bool]] = {
    **{arch: (arch, 4, [1], False) for arch in tiny.TINY_ARCHS if arch not in ("gemma2", "gemma3")},
    "gemma2-no-full": ("gemma2", 4, [1, 3], False),
    "gemma3-no-full": ("gemma3", 4, [2], False),
    "gemma3-no-sliding": ("gemma3", 4, [0, 1, 3], False),
    "gemma3-no-full-stale-buffers": ("gemma3", 4, [2], True),
}


@pytest.fixture(scope="module")
def saved_stages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case of `SAVED_CASES` pruned in place and pruned then sharded → unsharded, on two gloo ranks, saved."""
    out = tmp_path_factory.mktemp("saved_stages")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS),
                                                                                os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(TESTS / "fsdp_saved_stage.py"), str(out), json.dumps(SAVED_CASES)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("case", list(SAVED_CASES))
def test_fsdp_saved_stage_holds_what_the_single_process_path_saves(saved_stages: Path, case: str) -> None:
    """After a removal that empties a layer type, the unsharded model holds exactly the buffers a model rebuilt from
    its config declares, persistent as declared, as does the in-place pruned one; the two save the same tensors,
    and each saved folder reloads without unexpected or missing keys."""
    folder = saved_stages / case
    for rank in (0, 1):
        held = json.loads((folder / f"rank{rank}.json").read_text())
        assert "error" not in held, held.get("error")
        assert held["fsdp"] == held["rebuilt"] == held["single"]
        assert held["unequal"] == []
    single = load_file(folder / "single" / "model.safetensors")
    fsdp = load_file(folder / "fsdp" / "model.safetensors")
    assert sorted(fsdp) == sorted(single)
    for key, tensor in single.items():
        assert torch.equal(fsdp[key], tensor), key
    for saved in ("single", "fsdp"):
        _, info = AutoModelForCausalLM.from_pretrained(folder / saved, output_loading_info=True)
        assert {k: list(v) for k, v in info.items() if v} == {}, saved
