"""scripts/bench.py helpers on a tiny random Llama: every comparison runs and yields well-formed figures.

Timings are not checked (they mean nothing on a tiny model); names, numeric values, targets and the JSON schema are.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

from gradual.importance import calibration_batches, calibration_texts
from gradual.models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny:llama:4"
TARGET = re.compile(r"^(>=|<=) \d+(\.\d+)?$")


def _load_bench():
    spec = importlib.util.spec_from_file_location("gradual_bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", 4), tiny_tokenizer()




@pytest.fixture(scope="module")
def figures(tiny, tmp_path_factory, one_thread) -> list:
    """Every comparison on the tiny model, with the smallest sizes."""
    model, tok = tiny
    tmp = tmp_path_factory.mktemp("bench")
    out = []
    batches = calibration_batches(tok, calibration_texts(None, 4), 2, 24)
    out += bench.bench_scoring(model, batches, rounds=1)
    users, prompts = bench.sgr_prompts(tok, ["successor", "copy"], 3)
    gen, responses = bench.bench_generation(model, tok, prompts, 4, rounds=1)
    out += gen
    ids = tok(prompts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    out += bench.bench_pruned_decode(model, ids, 3, (1, 2), rounds=1)
    out += bench.bench_evaluation(model, tok, ["successor"], 2, 4, rounds=1)
    pairs = [{"prompt": u, "response": r or "ok"} for u, r in zip(users, responses, strict=True)]
    spec = bench.StageSpec(TINY, pairs, steps=2, batch_size=2, max_length=256, lora={"r": 4, "alpha": 8})
    out += bench.bench_recovery(spec, rounds=1, workdir=tmp)
    stage = bench.StageSpec(TINY, pairs, steps=2, batch_size=2, max_length=256, lora={"r": 4, "alpha": 8},
                            eval_tasks=["successor"], eval_n=1, eval_tokens=4, checkpoint=True)
    module, timer = bench.run_stage(stage, tmp / "stage")
    timings = module.history[-1].timings
    assert {"scoring_s", "surgery_s", "train_s", "merge_s", "tasks_s", "checkpoint_s"} <= set(timings)
    assert (tmp / "stage" / "stage_1" / "model.safetensors").is_file()
    assert len(timer.starts) == len(timer.ends) == 2 and 0 < timer.steps_s() <= timings["train_s"]
    assert timer.peak_rss_training >= bench.peak_rss_bytes() / 2 > 0
    out += bench.stage_figures(timings, timer.steps_s(), 2, 15, 1, 50)
    out += bench.bench_kd_time(bench.kd_setup(TINY, pairs, 2, 256, {"r": 4, "alpha": 8}), rounds=1)
    out += bench.bench_kd_memory({"model": TINY, "pairs": pairs, "batch_size": 2, "max_length": 256,
                                  "lora": {"r": 4, "alpha": 8}, "threads": 1}, tmp)
    return out


def test_every_comparison_yields_finite_figures_with_expected_names(figures) -> None:
    names = [f.name for f in figures]
    assert len(names) == len(set(names))
    expected = {"scoring_block_influence_vs_forward", "scoring_angular_distance_vs_forward",
                "sgr_generation_speedup", "sgr_generation_agreement", "pruned_decode_k1_speedup",
                "pruned_decode_k1_vs_ideal", "pruned_decode_k2_vs_ideal", "evaluation_speedup",
                "evaluation_agreement", "evaluation_speedup_generative", "evaluation_speedup_classification",
                "sgr_generation_batch_fill", "recovery_tokens_per_s_vs_bare", "stage_overhead_share",
                "stage_overhead_share_measured", "stage_share_tasks", "stage_share_checkpoint",
                "kd_step_vs_sft_step", "kd_step_peak_memory_vs_sft"}
    assert expected <= set(names)
    assert all(isinstance(f.value, float) and math.isfinite(f.value) and f.value >= 0 for f in figures)
    by_name = {f.name: f for f in figures}
    assert 0 <= by_name["sgr_generation_agreement"].value <= 1
    assert 0 <= by_name["evaluation_agreement"].value <= 1
    assert 0 < by_name["stage_overhead_share_measured"].value < 1
    # the demo projection scales steps by 15/2 and evaluation by 50/1: evaluation dominates more than measured
    shares = sum(f.value for f in figures if f.name.startswith("stage_share_"))
    assert shares == pytest.approx(1.0)


def test_targets_come_from_the_issue_and_reported_figures_have_none(figures) -> None:
    by_name = {f.name: f for f in figures}
    for name, target in bench.TARGETS.items():
        if name in by_name:
            assert by_name[name].target == target
    assert by_name["pruned_decode_k1_vs_ideal"].target == ">= 0.9"
    assert by_name["sgr_generation_agreement"].target is None
    assert by_name["stage_share_tasks"].target is None


def test_bench_json_schema(figures, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench.figures_json(figures)))
    data = json.loads(path.read_text())
    assert list(data) == [f.name for f in figures]
    for name, entry in data.items():
        assert set(entry) <= {"value", "target"} and isinstance(entry["value"], float), name
        if "target" in entry:
            assert TARGET.match(entry["target"]), entry["target"]
    assert data["evaluation_speedup"]["target"] == ">= 5"
    assert "target" not in data["evaluation_agreement"]


def test_figure_verdicts_and_printed_line() -> None:
    assert bench.Figure("evaluation_speedup", 4.9).met() is False
    assert bench.Figure("evaluation_speedup", 5.0).met() is True
    assert bench.Figure("stage_overhead_share", 0.3).met() is False
    assert bench.Figure("stage_overhead_share", 0.2).met() is True
    assert bench.Figure("stage_peak_rss_vs_fp32_weights", 2.0).met() is None
    assert bench.Figure("evaluation_speedup", 6.0).line() == "evaluation_speedup: 6 (>= 5) met"
    assert bench.Figure("x", 0.5).line() == "x: 0.5 (reported)"


def test_alternate_reverses_the_order_every_round_and_keeps_the_best_time() -> None:
    calls = []
    best, last = bench.alternate({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert last == {"a": 1, "b": 2} and all(0 <= t < 1 for t in best.values())


def test_demo_projection_scales_steps_and_evaluation() -> None:
    timings = {"scoring_s": 1.0, "surgery_s": 0.0, "train_s": 3.0, "merge_s": 0.0, "tasks_s": 2.0,
               "checkpoint_s": 0.0}
    figs = {f.name: f.value for f in bench.stage_figures(timings, steps_s=2.0, steps=2, demo_steps=4, eval_n=1,
                                                           demo_eval_n=3)}
    # measured: 2 s of steps in 6 s; demo: 4 s of steps, 6 s of evaluation, 1 + 1 s fixed -> 12 s
    assert figs["stage_overhead_share_measured"] == pytest.approx(1 - 2 / 6)
    assert figs["stage_overhead_share"] == pytest.approx(1 - 4 / 12)


def test_demo_stage_settings_follow_the_demo_config() -> None:
    demo = bench.demo_stage_settings()
    assert demo["steps"] >= 1 and demo["batch_size"] >= 1 and demo["eval_tasks"] and demo["eval_n"] >= 1
    assert bench.StageSpec(**{**demo, "pairs": []}).model == demo["model"]
    assert bench.demo_sgr_tasks()


def test_plain_generate_matches_batched_generation_in_fp32(tiny, one_thread) -> None:
    model, tok = tiny
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("hi", "what is 2 + 2?")]
    from gradual.generation import DecodingConfig, generate

    batched = [r[0] for r in generate(model, tok, prompts, DecodingConfig(do_sample=False, max_new_tokens=5),
                                      batch_size=2, progress=False)]
    assert bench.plain_generate(model, tok, prompts, 5) == batched
