"""scripts/bench.py helpers on a tiny random Llama: every comparison runs and yields well-formed figures.

Timings are not checked (they mean nothing on a tiny model); names, numeric values, targets and the JSON schema are.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gradual.generation import DecodingConfig, encode_prompt, generate
from gradual.importance import calibration_batches, calibration_texts
from gradual.tiny import tiny_model, tiny_tokenizer

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
def bench_run(tiny, tmp_path_factory, one_thread) -> tuple[list, dict]:
    """Every comparison on the tiny model, with the smallest sizes: the figures, and the details of the
    generation and evaluation comparisons."""
    model, tok = tiny
    tmp = tmp_path_factory.mktemp("bench")
    out, details = [], {}
    batches = calibration_batches(tok, calibration_texts(None, 4), 2, 24)
    out += bench.bench_scoring(model, batches, rounds=1)
    users, prompts = bench.sgr_prompts(tok, ["successor", "copy"], 3)
    gen, responses, details["generation"] = bench.bench_generation(model, tok, prompts, 4, batch_size=2, rounds=1)
    out += gen
    ids = tok(prompts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    out += bench.bench_pruned_decode(model, ids, 3, (1, 2), rounds=1)
    evaluation, details["evaluation"] = bench.bench_evaluation(model, tok, ["successor"], 3, 4, (4,), rounds=1,
                                                               workdir=tmp)
    out += evaluation
    pairs = [{"prompt": u, "response": r or "ok"} for u, r in zip(users, responses, strict=True)]
    spec = bench.StageSpec(TINY, pairs, steps=2, batch_size=2, max_length=256, lora={"r": 4, "alpha": 8})
    out += bench.bench_recovery(spec, rounds=1, workdir=tmp)
    # the demo's recipe: LoRA + forward KL to the unpruned teacher on few-shot task documents
    stage = bench.StageSpec(TINY, [], steps=2, batch_size=2, max_length=256, lora={"r": 4, "alpha": 8},
                            recovery={"loss": "kd"}, sources=[{"kind": "tasks", "tasks": ["successor"],
                                                               "n_per_task": 4}],
                            sgr={"tasks": ["successor"]}, eval_tasks=["successor"], eval_n=1, eval_tokens=4,
                            checkpoint=True)
    module, timer, fit_s = bench.run_stage(stage, tmp / "stage")
    timings = module.history[-1].timings
    assert module.teacher is not None and module.recovery.loss == "kd"
    assert {"scoring_s", "surgery_s", "train_s", "merge_s", "tasks_s", "checkpoint_s"} <= set(timings)
    assert (tmp / "stage" / "stage_1" / "model.safetensors").is_file()
    assert len(timer.starts) == len(timer.ends) == 2 and 0 < timer.steps_s() <= timings["train_s"] < fit_s
    assert timer.peak_rss_training >= bench.peak_rss_bytes() / 2 > 0
    # few-shot documents are plain text, learned on every token: every real token of a batch is a label
    assert all(int((b["labels"] != -100).sum()) == int(b["attention_mask"].sum()) for b in timer.batches)
    out += bench.stage_figures(timings, timer.steps_s(), 2, 15, 1, 50)
    setup = bench.kd_setup(stage)  # a batch of the stage's few-shot documents, every token learned
    assert int((setup[2]["labels"] != -100).sum()) == int(setup[2]["attention_mask"].sum())
    out += bench.bench_kd_time(setup, rounds=1)
    out += bench.bench_kd_memory(stage, 1, tmp)
    return out, details


@pytest.fixture(scope="module")
def figures(bench_run) -> list:
    return bench_run[0]


def test_every_comparison_yields_finite_figures_with_expected_names(figures) -> None:
    names = [f.name for f in figures]
    assert len(names) == len(set(names))
    # every figure with a target (the tiny model removes 1 and 2 layers instead of 4 and 8)
    expected = set(bench.TARGETS) - {"pruned_decode_k4_vs_ideal", "pruned_decode_k8_vs_ideal"}
    expected |= {"pruned_decode_k1_speedup", "pruned_decode_k1_vs_ideal", "pruned_decode_k2_vs_ideal",
                 "sgr_generation_agreement", "sgr_generation_batch_fill", "sgr_generation_speedup",
                 "sgr_generation_agreement_batch1", "evaluation_vs_lm_eval", "evaluation_agreement_generative",
                 "evaluation_agreement_classification", "evaluation_lm_eval_batch_size_generative",
                 "evaluation_lm_eval_batch_size_classification", "stage_overhead_share_measured",
                 "stage_share_tasks", "stage_share_checkpoint"}
    assert expected <= set(names)
    assert all(isinstance(f.value, float) and math.isfinite(f.value) and f.value >= 0 for f in figures)
    by_name = {f.name: f for f in figures}
    for name in ("sgr_generation_agreement", "sgr_generation_agreement_batch1", "sgr_generation_batch_fill",
                 "evaluation_agreement_generative", "evaluation_agreement_classification"):
        assert 0 <= by_name[name].value <= 1, name
    assert by_name["evaluation_lm_eval_batch_size_generative"].value == 4
    assert 0 < by_name["stage_overhead_share_measured"].value < 1
    # the demo projection scales steps by 15/2 and evaluation by 50/1: evaluation dominates more than measured
    shares = sum(f.value for f in figures if f.name.startswith("stage_share_"))
    assert shares == pytest.approx(1.0)


def test_generation_and_evaluation_agree_with_their_baselines_on_a_tiny_model(bench_run) -> None:
    """fp32 on one CPU thread: HF batched generate, lm-eval's HFLM and gradual give the same outputs per item, and
    the details say so (no differing items, every lm-eval batch size timed)."""
    figures, details = bench_run
    by_name = {f.name: f.value for f in figures}
    assert by_name["sgr_generation_agreement"] == 1.0 and details["generation"]["differences"] == []
    assert details["generation"]["new_tokens"]["gradual"] == details["generation"]["new_tokens"]["hf_batched"]
    for form in ("generative", "classification"):
        assert by_name[f"evaluation_agreement_{form}"] == 1.0
        assert details["evaluation"][form]["differences"] == []
        assert set(details["evaluation"][form]["lm_eval_items_per_s"]) == {"4"}
    assert details["evaluation"]["generative"]["lm_eval_exact_match_vs_gradual_check"] == 1.0


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
    assert data["evaluation_vs_lm_eval_generative"]["target"] == ">= 2"
    assert data["sgr_generation_vs_hf_batched"]["target"] == ">= 1.5"
    assert "target" not in data["evaluation_agreement_generative"]
    assert "target" not in data["sgr_generation_speedup"]  # the batch-1 loop: reported only


def test_figure_verdicts_and_printed_line() -> None:
    assert bench.Figure("evaluation_vs_lm_eval_classification", 1.9).met() is False
    assert bench.Figure("evaluation_vs_lm_eval_classification", 2.0).met() is True
    assert bench.Figure("recovery_vs_bare", 0.94).met() is False
    assert bench.Figure("recovery_vs_bare", 0.95).met() is True
    assert bench.Figure("stage_overhead_share", 0.3).met() is False
    assert bench.Figure("stage_overhead_share", 0.2).met() is True
    assert bench.Figure("stage_peak_rss_vs_fp32_weights", 2.0).met() is None
    assert bench.Figure("recovery_vs_bare", 0.9).line() == "recovery_vs_bare: 0.9 (>= 0.95) MISSED"
    assert bench.Figure("evaluation_vs_lm_eval", 6.0).line() == "evaluation_vs_lm_eval: 6 (reported)"
    assert bench.Figure("kd_step_vs_sft_step", 1.25).line() == "kd_step_vs_sft_step: 1.25 (<= 1.5) met"
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
    config = yaml.safe_load(bench.DEMO_CONFIG.read_text())
    assert demo["steps"] >= 1 and demo["batch_size"] >= 1 and demo["eval_tasks"] and demo["eval_n"] >= 1
    # the stage runs the demo's recipe: its recovery loss (KD: a teacher in the stage) and its data sources
    assert demo["recovery"]["loss"] == config["model"]["recovery"]["loss"]
    assert demo["sources"] == config["data"]["sources"] and demo["sgr"] == config["data"]["sgr"]
    spec = bench.StageSpec(**{**demo, "pairs": []})
    assert spec.model == demo["model"] and spec.sources == demo["sources"]
    assert bench.demo_sgr_tasks() and bench.demo_sgr_batch_size() >= 1


def test_hf_batched_generate_matches_gradual_generate_in_fp32(tiny, one_thread) -> None:
    """The baseline is fair: same ids, same greedy tokens, and a row that emits an end id stops there for both,
    counting only the tokens before it."""
    model, tok = tiny
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("hi", "what is 2 + 2?", "name three colours")]
    config = DecodingConfig(do_sample=False, max_new_tokens=6)
    ours = [r[0] for r in generate(model, tok, prompts, config, batch_size=3, progress=False)]
    assert bench.hf_generate(model, tok, prompts, 6, batch_size=3) == ours
    assert bench.hf_generate(model, tok, prompts, 6, batch_size=1) == ours
    # make the first prompt's first greedy token an end id: that row ends at once in both, with no new token
    stopping = copy.deepcopy(model)
    with torch.inference_mode():
        logits = stopping(input_ids=torch.tensor([encode_prompt(tok, prompts[0])])).logits
    stopping.generation_config.eos_token_id = int(logits[0, -1].argmax())
    ours = [r[0] for r in generate(stopping, tok, prompts, config, batch_size=3, progress=False)]
    assert bench.hf_generate(stopping, tok, prompts, 6, batch_size=3) == ours
    assert ours[0] == "" and bench.count_tokens(tok, ours[:1]) == 0 < bench.count_tokens(tok, ours)


def test_lm_eval_export_holds_gradual_items_prompts_and_answers(tiny_tok, tmp_path: Path) -> None:
    """lm-eval reads the exported tasks back as the same items: gradual's few-shot prompt as the context (0 shots),
    its answer as the target, its choices and label, the same budget and a one-line stop."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from gradual.tasks.builtin import get_task
    from gradual.tasks.evaluate import build_prompt

    names = bench.export_lm_eval_tasks(tiny_tok, ["successor", "copy"], 5, 7, tmp_path)
    assert names == {"generative": ["gradual_bench_successor_gen", "gradual_bench_copy_gen"],
                     "classification": ["gradual_bench_successor_mc", "gradual_bench_copy_mc"]}
    loaded = get_task_dict(names["generative"] + names["classification"],
                           TaskManager(include_path=str(tmp_path), include_defaults=False))
    for name in ("successor", "copy"):
        task = get_task(name)
        problems = task.problems("eval", 5, 0)
        gen, mc = loaded[f"gradual_bench_{name}_gen"], loaded[f"gradual_bench_{name}_mc"]
        for lm_task in (gen, mc):
            docs = list(lm_task.eval_docs)
            assert [lm_task.doc_to_text(d) for d in docs] == [build_prompt(task, p, tiny_tok, "fewshot")
                                                              for p in problems]
            assert lm_task.config.num_fewshot == 0
        assert [gen.doc_to_target(d) for d in gen.eval_docs] == [p.answer for p in problems]
        assert gen.config.generation_kwargs["until"] == ["\n"] and gen.config.generation_kwargs["max_gen_toks"] == 7
        assert [mc.doc_to_choice(d) for d in mc.eval_docs] == [list(p.choices) for p in problems]
        assert [mc.doc_to_target(d) for d in mc.eval_docs] == [p.label for p in problems]
        assert mc.config.target_delimiter == " "


def test_differing_items_are_explained() -> None:
    ours, theirs = {"reply": "\n42\n", "outcome": True}, {"reply": "", "outcome": False}
    assert bench.explain_difference("generative", ours, theirs).startswith("stop:")
    ours, theirs = {"reply": " 42", "outcome": True}, {"reply": " 43", "outcome": False}
    assert bench.explain_difference("generative", ours, theirs).startswith("greedy tokens differ")
    ours, theirs = {"logprobs": [-1.0, -1.0001], "outcome": 0}, {"logprobs": [-1.0002, -1.0001], "outcome": 1}
    assert bench.explain_difference("classification", ours, theirs).startswith("near tie")
    agree, differ = bench.compare_items("classification", [{"task": "t", **ours}], [{"task": "t", **theirs}])
    assert agree == 0.0 and differ[0]["gradual"] == [-1.0, -1.0001] and differ[0]["why"].startswith("near tie")


@pytest.mark.slow
def test_quick_run_writes_every_figure_with_its_target(tmp_path: Path, monkeypatch, one_thread) -> None:
    """`bench.py --quick` end to end on a tiny 10-layer model (so 4 and 8 layers can go): every figure of the issue
    lands in bench.json with its target, and the details file holds the comparisons' items and batch sizes."""
    # the tiny byte-level tokenizer spells a chat prompt in ~200 tokens; SmolLM2's SGR pairs take ~60
    monkeypatch.setattr(bench, "QUICK", dataclasses.replace(bench.QUICK, train_max_length=256))
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--model", "tiny:llama:10", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for name, target in bench.TARGETS.items():
        assert data[name]["target"] == target, name
    assert data["stage_teacher_loaded"]["value"] == 1.0  # the demo's recipe distils: the stage holds the teacher
    assert "stage_peak_rss_vs_fp32_weights" in data and "target" not in data["stage_peak_rss_vs_fp32_weights"]
    details = json.loads((tmp_path / "bench.details.json").read_text())
    assert details["mode"] == "quick" and details["generation"]["prompts"] == bench.QUICK.gen_batch_size
    for form in ("generative", "classification"):
        assert set(details["evaluation"][form]["lm_eval_items_per_s"]) == {"8", "32"}
