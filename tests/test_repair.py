"""`repair: lstsq` (ReplaceMe): a least-squares map folded into the down projection before a cut, on tiny models."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rank_probe import probe_callback
from test_fit import SMOKE, fit_in_process, write_config
from transformers import AutoModelForCausalLM

from gradual import models, tiny
from gradual import repair as repair_lib
from gradual.cli import main
from gradual.errors import UsageError
from gradual.repair import SUPPORTED_ARCHITECTURES, apply_repairs, fold_transform, lstsq_repair, plan_repairs
from gradual.surgery import decoder_layers, remove_layers
from gradual.tiny import TINY_ARCHS, tiny_model

ARCHS = [a for a in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3") if a in TINY_ARCHS]
VOCAB = tiny.tiny_config("llama").vocab_size


def random_batches(seed: int = 0, n: int = 4, rows: int = 4, width: int = 24) -> list[dict[str, torch.Tensor]]:
    """Random token batches, right-padded to random lengths; padded positions hold random ids, not pad_id."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        lengths = torch.randint(4, width + 1, (rows,), generator=g)
        mask = torch.arange(width)[None] < lengths[:, None]
        ids = torch.randint(7, VOCAB, (rows, width), generator=g)
        batches.append({"input_ids": ids, "attention_mask": mask.long()})
    return batches


def with_extra_padding(batches: list[dict[str, torch.Tensor]], seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """The same sequences with 7 more padded columns, and in the first batch after a row of padding only (random
    ids under the mask)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for index, b in enumerate(batches):
        rows, width = b["input_ids"].shape
        top = 1 if index == 0 else 0
        ids = torch.randint(0, VOCAB, (rows + top, width + 7), generator=g)
        mask = torch.zeros(rows + top, width + 7, dtype=torch.long)
        ids[top:, :width] = torch.where(b["attention_mask"].bool(), b["input_ids"], ids[top:, :width])
        mask[top:, :width] = b["attention_mask"]
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def outputs(model: torch.nn.Module, position: int, batches: list[dict[str, torch.Tensor]]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 output of the layer at `position` and the logits, over the real tokens of every batch."""
    states, logits = [], []
    layer = decoder_layers(model)[position]
    handle = layer.register_forward_hook(lambda m, a, o: states.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            for b in batches:
                logits.append(model(**b, use_cache=False).logits[b["attention_mask"].bool()].double())
    finally:
        handle.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    return torch.cat([s[m].double() for s, m in zip(states, masks, strict=True)]), torch.cat(logits)


def relative(a: torch.Tensor, reference: torch.Tensor) -> float:
    return float((a - reference).norm() / reference.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_repair_never_leaves_the_state_after_the_cut_further_than_plain_removal(arch: str, dtype: torch.dtype,
                                                                               one_thread: None) -> None:
    model = tiny_model(arch, 6, dtype=dtype)
    batches = random_batches()
    reference, reference_logits = outputs(model, 3, batches)  # after the span 2-3: the input of layer 4
    plain, repaired = copy.deepcopy(model), copy.deepcopy(model)
    remove_layers(plain, [2, 3])
    [repair] = lstsq_repair(repaired, [2, 3], batches)
    remove_layers(repaired, [2, 3])
    plain_state, plain_logits = outputs(plain, 1, batches)
    repaired_state, repaired_logits = outputs(repaired, 1, batches)

    assert (repair.removed, repair.block, repair.tokens) == ([2, 3], 1, sum(int(b["attention_mask"].sum())
                                                                            for b in batches))
    assert repair.distance_plain == pytest.approx(relative(plain_state, reference), rel=1e-6)
    assert relative(repaired_state, reference) <= relative(plain_state, reference) * (1 + 1e-9)
    if repair.status == "kept":
        assert repair.distance_repaired == pytest.approx(relative(repaired_state, reference), rel=1e-6)
    else:
        assert torch.equal(repaired_state, plain_state)
    if arch == "llama":
        assert repair.status == "kept"
        assert relative(repaired_state, reference) < 0.95 * relative(plain_state, reference)
        assert relative(repaired_logits, reference_logits) < relative(plain_logits, reference_logits)
    changed = [k for k, v in repaired.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed == ([] if repair.status == "reverted" else ["model.layers.1.mlp.down_proj.weight"])
    assert repaired.model.layers[1].mlp.down_proj.weight.dtype == dtype


@pytest.mark.parametrize("arch", ARCHS)
def test_the_fold_equals_applying_the_map_to_the_mlp_output(arch: str, one_thread: None) -> None:
    model = tiny_model(arch, 6)
    batches = random_batches(seed=2)
    [repair] = plan_repairs(model, [3], batches)
    transform = repair.transform
    assert transform.shape == (64, 64) and transform.dtype == torch.float64
    assert not torch.allclose(transform, transform.T)  # a transposed fold would show

    explicit = copy.deepcopy(model)
    remove_layers(explicit, [3])
    down = explicit.model.layers[2].mlp.down_proj
    down.register_forward_hook(lambda m, a, out: (out.double() @ transform).to(out.dtype))
    folded = copy.deepcopy(model)
    fold_transform(folded, 2, transform)
    if repair.status == "kept":
        assert torch.equal(repair.weight, folded.model.layers[2].mlp.down_proj.weight)
    remove_layers(folded, [3])
    for position in (2, 4):
        want_state, want_logits = outputs(explicit, position, batches)
        got_state, got_logits = outputs(folded, position, batches)
        assert relative(got_state, want_state) < 1e-5
        assert relative(got_logits, want_logits) < 1e-5


def test_padding_does_not_change_the_fit(one_thread: None) -> None:
    model = tiny_model("llama", 6)
    batches = random_batches(seed=3)
    [plain] = plan_repairs(model, [2], batches)
    [padded] = plan_repairs(model, [2], with_extra_padding(batches))
    assert padded.tokens == plain.tokens
    torch.testing.assert_close(padded.transform, plain.transform, rtol=1e-5, atol=1e-6)
    assert padded.distance_repaired == pytest.approx(plain.distance_repaired, rel=1e-5)
    assert padded.ridge == plain.ridge and padded.distance_cv == pytest.approx(plain.distance_cv, rel=1e-6)


def test_a_repair_that_would_hurt_is_reverted(one_thread: None) -> None:
    """Near-identity removed layers in bfloat16: the tiny correction T − I is below the weight's rounding, so a
    folded bf16 weight only adds rounding noise. Cross-validation declines it; with a fixed ridge (no
    cross-validation) the measurement on the calibration data catches it. Either way the weight stays as it was."""
    model = tiny_model("llama", 6, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers[2:4]:
            layer.self_attn.o_proj.weight.mul_(1e-4)
            layer.mlp.down_proj.weight.mul_(1e-4)
    before = copy.deepcopy(model.state_dict())
    notes = {None: "cross-validation: no better than plain removal", 1e-6: "calibration: further than plain removal"}
    for ridge, note in notes.items():
        [repair] = lstsq_repair(model, [2, 3], random_batches(), ridge=ridge)
        assert repair.status == "reverted" and repair.note == note
        assert repair.weight is None and repair.to_dict()["status"] == "reverted"
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert repair.distance_repaired > repair.distance_plain


def test_cross_validation_keeps_a_fit_of_few_tokens_from_hurting_unseen_text(one_thread: None) -> None:
    """~200 calibration tokens for a 64×64 map: a nearly unregularised fit is much closer on the calibration data
    and much further on other text; the cross-validated ridge is closer on both."""
    model = tiny_model("llama", 6)
    calibration, unseen = random_batches(seed=5), random_batches(seed=9, rows=8, width=32)
    reference = outputs(model, 3, unseen)[0]
    plain = copy.deepcopy(model)
    remove_layers(plain, [2, 3])
    plain_unseen = relative(outputs(plain, 1, unseen)[0], reference)
    unseen_distance = {}
    for ridge in (None, 1e-6):
        repaired = copy.deepcopy(model)
        [fit] = plan_repairs(repaired, [2, 3], calibration, ridge=ridge)
        fold_transform(repaired, 1, fit.transform)
        remove_layers(repaired, [2, 3])
        unseen_distance[ridge] = relative(outputs(repaired, 1, unseen)[0], reference)
        assert fit.distance_repaired < fit.distance_plain
    assert unseen_distance[1e-6] > 1.1 * plain_unseen
    assert unseen_distance[None] < plain_unseen
    assert fit.distance_cv is None and fit.ridge == 1e-6


def test_cross_validation_prefers_plain_removal_when_the_residual_is_noise() -> None:
    """On synthetic statistics: a target M A + noise gets a fitted map; a target M + noise (nothing linear to
    learn) is left to plain removal."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 400
    m = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    mixing = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    for target, learnable in ((m @ mixing + noise, True), (m + noise, False)):
        folds = torch.arange(n) % repair_lib.FOLDS
        parts = [(m[folds == k], target[folds == k]) for k in range(repair_lib.FOLDS)]
        gram = torch.stack([a.T @ a for a, _ in parts])
        cross = torch.stack([a.T @ b for a, b in parts])
        target_sq = torch.stack([b.pow(2).sum() for _, b in parts])
        ridge, cv, identity = repair_lib._cross_validate(gram, cross, target_sq, [len(a) for a, _ in parts])
        assert ridge in repair_lib.RIDGES
        assert (cv <= (1 - repair_lib.MIN_CV_GAIN) * identity) is learnable
        if learnable:
            assert ridge <= 0.1 and cv < 0.5 * identity


def test_several_spans_and_a_span_at_position_zero(one_thread: None, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model("llama", 8)
    batches = random_batches(seed=4)
    positions = [0, 2, 3, 6]
    repaired = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="gradual.repair"):
        repairs = lstsq_repair(repaired, positions, batches)
    assert [r.removed for r in repairs] == [[0], [2, 3], [6]]
    assert [r.block for r in repairs] == [None, 1, 5]
    assert [r.status for r in repairs] == ["skipped", "kept", "kept"]
    assert any("[0]" in m and "first layer" in m for m in caplog.messages)
    assert repairs[0].distance_plain is None and repairs[0].transform is None and repairs[0].note
    assert json.loads(json.dumps([r.to_dict() for r in repairs]))[1]["block"] == 1

    # Each span was fitted on the model as it is when removed: earlier spans gone, earlier repairs in place.
    # Kept original layers 1, 4, 5, 7 sit at positions 0, 1, 2, 3; the cuts come after positions 0 and 2.
    remove_layers(repaired, positions)
    first_only = copy.deepcopy(model)
    apply_repairs(first_only, repairs[:2])
    remove_layers(first_only, positions)
    plain = copy.deepcopy(model)
    remove_layers(plain, positions)
    for repair, original_after, position in ((repairs[1], 3, 0), (repairs[2], 6, 2)):
        reference = outputs(model, original_after, batches)[0]
        without = first_only if repair is repairs[2] else plain
        assert repair.distance_plain == pytest.approx(relative(outputs(without, position, batches)[0], reference),
                                                      rel=1e-6)
        got = relative(outputs(repaired, position, batches)[0], reference)
        assert got == pytest.approx(repair.distance_repaired, rel=1e-6)
        assert got < repair.distance_plain
        assert got < relative(outputs(plain, position, batches)[0], reference)

    alone = copy.deepcopy(model)
    assert [r.status for r in lstsq_repair(alone, [0, 1], batches)] == ["skipped"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in alone.state_dict().items())


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "opt"])
def test_other_architectures_are_refused_in_one_line(arch: str) -> None:
    with pytest.raises(UsageError) as error:
        plan_repairs(tiny_model(arch, 4), [1], random_batches(n=1))
    message = str(error.value)
    assert "\n" not in message and repr(arch) in message
    assert "supported: " + ", ".join(SUPPORTED_ARCHITECTURES) in message


@pytest.mark.parametrize(("extra", "needle"), [
    (["--model.model", "tiny:gpt2"], "architecture 'gpt2'"),
    (["--model.quantize", "nf4"], "quantize='nf4'"),
    (["--model.repair", "magic"], "'magic'"),
])
def test_fit_refuses_bad_repair_settings_in_one_line_before_any_model_loads(
        extra: list[str], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(tiny, "tiny_model", no_loading)
    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(SMOKE), "--model.repair", "lstsq", *extra])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("plan", ["scored", "explicit"])
def test_fit_with_repair_records_it_per_stage_and_saves_a_plain_model(plan: str, tmp_path: Path, one_thread: None,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    if plan == "scored":  # two stages of one layer chosen by block influence
        changes = {"model__schedule__max_layers": 2, "model__schedule__steps_per_stage": 1}
    else:  # one stage removing two spans of explicitly named layers, without training
        changes = {"model__schedule__layers": [1, 2, 4], "model__schedule__mode": "one_shot",
                   "model__schedule__steps_per_stage": 0}
    config, run_dir = write_config(tmp_path, model__repair="lstsq", **changes)
    fit_in_process(config)
    results = json.loads((run_dir / "results.json").read_text())
    stages = results["stages"][1:]
    assert len(stages) == (2 if plan == "scored" else 1)
    for stage in stages:
        repair = stage["importance"]["repair"]
        assert repair["method"] == "lstsq"
        assert sorted(i for span in repair["spans"] for i in span["removed"]) == stage["removed"]
        for span in repair["spans"]:
            assert span["status"] in ("kept", "reverted") and span["block"] == span["removed"][0] - 1
            assert span["distance_repaired"] <= span["distance_plain"] or span["status"] == "reverted"
            assert span["tokens"] > 0 and math.isfinite(span["distance_plain"])
        assert stage["timings"]["repair_s"] > 0
    if plan == "explicit":
        assert [s["removed"] for s in stages[0]["importance"]["repair"]["spans"]] == [[1, 2], [4]]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["config"]["repair"] == "lstsq"
    capsys.readouterr()
    assert main(["fit", "--config", str(config), "--model.repair", "null"]) == 2  # part of the run's identity
    assert "already holds a different run" in capsys.readouterr().err
    loaded, info = AutoModelForCausalLM.from_pretrained(run_dir / "final", output_loading_info=True)
    assert not any(info.values()), info
    assert type(loaded).__name__ == "LlamaForCausalLM"


@pytest.mark.slow  # two ranks launched by Lightning from the real command, ~30 s
def test_two_cpu_ranks_plan_on_rank_0_and_hold_the_same_repaired_weights(tmp_path: Path) -> None:
    callbacks = yaml.safe_load(SMOKE.read_text())["trainer"]["callbacks"]
    callbacks.append(probe_callback(tmp_path / "probe"))
    config, run_dir = write_config(tmp_path, model__repair="lstsq", model__schedule__max_layers=2,
                                   trainer__strategy="ddp", trainer__devices=2, trainer__callbacks=callbacks,
                                   data__sgr__cache_dir=str(tmp_path / "sgr"))
    (tmp_path / "cwd").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "gradual", "fit", "--config", str(config)], cwd=tmp_path / "cwd",
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["stages"] == ranks[1]["stages"]  # the same layers and bit-identical merged weights per stage
    stages = json.loads((run_dir / "results.json").read_text())["stages"][1:]
    assert [s["importance"]["repair"]["spans"][0]["status"] for s in stages] == ["kept", "kept"]


@pytest.mark.slow
def test_smollm2_repair_of_layers_14_to_17(one_thread: None) -> None:
    """The measured case: SmolLM2-135M-Instruct without layers 14-17, fitted on 32 built-in calibration texts and
    checked on them and on the other 32 built-in texts, which the fit never saw."""
    from gradual import importance

    model = models.load_model("smollm2-135m-instruct")
    tokenizer = models.load_tokenizer("smollm2-135m-instruct")
    texts = importance.calibration_texts(None, n=32)
    unseen = [t for t in importance.calibration_texts(None, n=None) if t not in texts]
    batches = {name: importance.calibration_batches(tokenizer, t, batch_size=8, max_length=128)
               for name, t in (("calibration", texts), ("unseen", unseen))}
    plain = copy.deepcopy(model)
    remove_layers(plain, [14, 15, 16, 17])
    [repair] = lstsq_repair(model, [14, 15, 16, 17], batches["calibration"])
    remove_layers(model, [14, 15, 16, 17])
    print(f"\n{repair.to_dict()}")
    assert repair.status == "kept" and repair.distance_repaired < repair.distance_plain
    for name, b in batches.items():
        with torch.inference_mode():
            nll_plain, nll_repaired = importance._mean_nll(plain, b), importance._mean_nll(model, b)
        print(f"{name} perplexity: plain {math.exp(nll_plain):.3f}, repaired {math.exp(nll_repaired):.3f}")
        assert nll_repaired < nll_plain
