"""`gradual fit` under DDP on CPU: two gloo ranks launched by Lightning from the real `python -m gradual fit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rank_probe import LM_EVAL_TASK, lm_eval_callback, probe_callback, weights_checksum, write_lm_eval_task
from test_fit import SMOKE, write_config
from transformers import AutoModelForCausalLM

TESTS = Path(__file__).resolve().parent


@pytest.mark.slow  # an end-to-end run of a minute or more; CI runs it (make test-slow)
def test_two_cpu_ranks_prune_heal_and_decide_in_lockstep(tmp_path: Path) -> None:
    callbacks = yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"]
    callbacks.insert(1, lm_eval_callback(write_lm_eval_task(tmp_path / "lm_eval_tasks")))
    callbacks.append(probe_callback(tmp_path / "probe"))
    config, run_dir = write_config(
        tmp_path, model__schedule__max_layers=2, trainer__strategy="ddp", trainer__devices=2,
        trainer__callbacks=callbacks, data__sgr__cache_dir=str(tmp_path / "sgr_cache"))
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "gradual", "fit", "--config", str(config)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: schedule complete") == 1, "only rank 0 reports"

    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}

    # SGR: prompts answered across the ranks and gathered, so both train on the same full, ordered pair list
    assert ranks[0]["pairs"] == ranks[1]["pairs"] and ranks[0]["num_pairs"] == 8
    cache = list((tmp_path / "sgr_cache").glob("*.jsonl"))
    assert len(cache) == 1 and len(cache[0].read_text().splitlines()) == 1 + 8  # meta line + every prompt once

    # training: each rank its own half of every step's examples, adapter gradients all-reduced by the new DDP wrapper
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    assert [s["stage"] for s in steps0] == [s["stage"] for s in steps1] == [1, 1, 2, 2]
    for a, b in zip(steps0, steps1, strict=True):
        assert a["wrapper"] == b["wrapper"] == "DistributedDataParallel"
        assert a["batch"] != b["batch"] and a["loss"] != b["loss"]
        assert a["trainable"] == b["trainable"] == len(a["grads"]) > 0
        assert all("lora_" in name for name in a["grads"])
        assert a["grads"].keys() == b["grads"].keys()
        for name, g in a["grads"].items():
            assert g is not None and g == b["grads"][name], name
        assert any(g != 0 for g in a["grads"].values())

    # stages: same layers removed, bit-identical merged weights, same scores and decisions on both ranks
    assert ranks[0]["stages"] == ranks[1]["stages"]
    assert ranks[0]["baseline"] == ranks[1]["baseline"]
    assert ranks[0]["chosen_stage"] == ranks[1]["chosen_stage"] == 2
    assert ranks[0]["stop_reason"] == ranks[1]["stop_reason"] == "schedule complete"
    stages = ranks[0]["stages"]
    assert [len(s["kept"]) for s in stages] == [5, 4]
    assert stages[0]["checksum"] != stages[1]["checksum"]
    assert all(f"lm_eval/{LM_EVAL_TASK}" in s["scores"] and s["meets_threshold"] for s in stages)

    # only rank 0 wrote: one run directory, one log version, nothing in the working directory
    assert sorted(p.name for p in run_dir.iterdir()) == ["final", "logs", "report.md", "results.json",
                                                         "retention.png", "stage_0", "stage_1", "stage_2",
                                                         "state.json"]
    assert [p.name for p in (run_dir / "logs").iterdir()] == ["version_0"]
    assert list(work.iterdir()) == []
    results = json.loads((run_dir / "results.json").read_text())
    assert [s["kept"] for s in results["stages"][1:]] == [s["kept"] for s in stages]
    assert results["final_stage"] == 2

    final, info = AutoModelForCausalLM.from_pretrained(run_dir / "final", output_loading_info=True)
    assert not any(info.values())
    assert final.config.num_hidden_layers == 4 and final.dtype == torch.float32
    assert weights_checksum(final) == stages[-1]["checksum"]
