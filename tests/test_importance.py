"""Layer importance metrics on tiny random Llama models (built in-process, no network)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradual import pipeline
from gradual.errors import UsageError
from gradual.importance import (
    METRICS,
    LayerScores,
    best_span,
    calibration_batches,
    calibration_texts,
    format_table,
    greedy_ablation,
    score_layers,
)
from gradual.stages import Selection
from gradual.surgery import original_indices, remove_layers, skip_layers
from gradual.tasks import get_task
from gradual.tasks.selection import TaskScore
from gradual.tiny import tiny_model, tiny_tokenizer

NUM_LAYERS = 6
IDENTITY = 3


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def make_identity(model: LlamaForCausalLM, *indices: int) -> None:
    """Zero a layer's output projections: its attention and MLP add nothing, so it is exactly the identity."""
    with torch.no_grad():
        for i in indices:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()


@pytest.fixture(scope="module")
def texts():
    """Ten built-in prompts cut to different lengths (9 to 72 characters), so batches need padding."""
    return [t[:9 + 7 * i] for i, t in enumerate(calibration_texts(None, n=10, seed=1))]


@pytest.fixture(scope="module")
def identity_model(tokenizer):
    """Layer IDENTITY is exactly the identity; a sharpened head makes the model confident in its own text."""
    model = tiny_llama(len(tokenizer))
    make_identity(model, IDENTITY)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def own_text(identity_model):
    """Greedy continuations of the identity model, so every real layer helps predict them and skipping one hurts
    (on random text a random model's loss can fall when a layer is skipped)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, identity_model.config.vocab_size, (8, 2), generator=generator)
    with torch.no_grad():
        for _ in range(22):
            ids = torch.cat([ids, identity_model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4])} for i in (0, 4)]


def repad(batches, extra: int, pad_id: int = 7):
    """The same rows with `extra` more padding columns holding an arbitrary token id."""
    out = []
    for b in batches:
        rows, width = b["input_ids"].shape
        ids = torch.full((rows, width + extra), pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width + extra), dtype=torch.long)
        ids[:, :width] = torch.where(b["attention_mask"].bool(), b["input_ids"], pad_id)
        mask[:, :width] = b["attention_mask"]
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def batchings(tokenizer, texts):
    """Three batchings of the same texts: unpadded singles, padded fours, fours with extra padding."""
    singles = calibration_batches(tokenizer, texts, batch_size=1, max_length=64)
    fours = calibration_batches(tokenizer, texts, batch_size=4, max_length=64)
    assert all((b["attention_mask"] == 0).any() for b in fours)
    return {"singles": singles, "fours": fours, "fours_padded": repad(fours, extra=9)}


# --- calibration data ---------------------------------------------------------------------------------------------


def test_builtin_texts_are_varied_and_sampled_reproducibly():
    everything = calibration_texts(None, n=None)
    assert len(everything) >= 64 and len(set(everything)) == len(everything)
    assert any(t.startswith("def ") and "\n    " in t for t in everything)  # code keeps its line breaks
    assert calibration_texts("builtin", n=32, seed=3) == calibration_texts(None, n=32, seed=3)
    assert len(calibration_texts(None, n=32, seed=3)) == 32
    assert calibration_texts(None, n=32, seed=3) != calibration_texts(None, n=32, seed=4)


def test_texts_from_list_txt_and_jsonl(tmp_path):
    assert calibration_texts(["a b", "c d"], n=5) == ["a b", "c d"]
    txt = tmp_path / "cal.txt"
    txt.write_text("first line\n\nsecond line\n", encoding="utf-8")
    assert calibration_texts(txt) == ["first line", "second line"]
    jsonl = tmp_path / "cal.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"text {i}", "text": "x"}) for i in range(5)), encoding="utf-8")
    assert calibration_texts(str(jsonl), field_name="body") == [f"text {i}" for i in range(5)]
    assert calibration_texts(jsonl) == ["x"] * 5
    with pytest.raises(UsageError, match="'missing'"):
        calibration_texts(jsonl, field_name="missing")


def test_missing_file_is_one_line_usage_error(tmp_path):
    with pytest.raises(UsageError) as err:
        calibration_texts(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err.value) and "\n" not in str(err.value)


def test_batches_are_right_padded_and_truncated(tokenizer):
    texts = ["short", "a longer text", "x" * 100]
    batches = calibration_batches(tokenizer, texts, batch_size=2, max_length=16)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 16), (1, 6)]  # "<s>short" is 6 tokens
    first = batches[0]
    assert first["attention_mask"].sum(dim=1).tolist() == [16, 14]
    assert (first["input_ids"][1][first["attention_mask"][1] == 0] == tokenizer.pad_token_id).all()
    assert first["attention_mask"][1].tolist() == sorted(first["attention_mask"][1].tolist(), reverse=True)


# --- hidden-state metrics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["block_influence", "angular_distance", "calibration_loss", "taylor"])
def test_identity_layer_is_least_important(identity_model, own_text, metric):
    scores = score_layers(identity_model, own_text, metric, progress=False)
    assert scores.order()[0] == IDENTITY
    assert scores.scores[IDENTITY] == pytest.approx(0.0 if metric != "calibration_loss" else scores.baseline,
                                                    abs=1e-5)
    others = [s for i, s in enumerate(scores.scores) if i != IDENTITY]
    assert min(others) > scores.scores[IDENTITY] + 1e-4


@pytest.mark.parametrize(("metric", "span"), [("block_influence", 1), ("angular_distance", 1),
                                              ("angular_distance", 2), ("calibration_loss", 1)])
def test_padding_and_batching_do_not_change_scores(tokenizer, batchings, metric, span):
    model = tiny_llama(len(tokenizer), seed=1)
    results = {name: score_layers(model, b, metric, span=span, progress=False) for name, b in batchings.items()}
    reference = results["singles"]
    for name in ("fours", "fours_padded"):
        assert results[name].scores == pytest.approx(reference.scores, abs=1e-5), name
        if span > 1:
            assert results[name].span_scores == pytest.approx(reference.span_scores, abs=1e-5), name


def test_hidden_state_metrics_take_one_forward_pass(identity_model, batchings):
    calls = {"model": 0, "layers": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1
        return hook

    handles = [identity_model.register_forward_hook(count("model"))]
    handles += [layer.register_forward_hook(count("layers")) for layer in identity_model.model.layers]
    batches = batchings["fours"]
    try:
        for metric in ("block_influence", "angular_distance"):
            calls.update(model=0, layers=0)
            score_layers(identity_model, batches, metric, span=2, progress=False)
            assert calls == {"model": len(batches), "layers": len(batches) * NUM_LAYERS}
    finally:
        for h in handles:
            h.remove()
    assert all(len(layer._forward_hooks) == 0 for layer in identity_model.model.layers)


def test_block_influence_matches_hidden_states(tokenizer, batchings):
    """HF's hidden_states[i] is layer i's input for every layer but the last (the final one is after the norm)."""
    model = tiny_llama(len(tokenizer), seed=2)
    batch = batchings["singles"][0]
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity
    expected = [1 - cos(hidden[i], hidden[i + 1], dim=-1).mean().item() for i in range(NUM_LAYERS - 1)]
    scores = score_layers(model, [batch], "block_influence", progress=False)
    assert scores.scores[:-1] == pytest.approx(expected, abs=1e-5)


def test_angular_distance_span_picks_contiguous_block(tokenizer, batchings):
    model = tiny_llama(len(tokenizer))
    make_identity(model, 2, 3)
    scores = score_layers(model, batchings["fours"], "angular_distance", span=2, progress=False)
    assert len(scores.span_scores) == NUM_LAYERS - 1
    assert scores.span_scores[2] == pytest.approx(0.0, abs=1e-6)
    assert scores.choose(2) == [2, 3] == sorted(scores.order()[:2])
    for i in range(NUM_LAYERS):  # per-layer importance: the best block containing the layer
        assert scores.scores[i] == min(scores.span_scores[max(0, i - 1):min(i, NUM_LAYERS - 2) + 1])
    assert best_span(scores.span_scores, 2, protect_first=3) == [
        min(range(3, 5), key=lambda s: scores.span_scores[s]) + k for k in range(2)]
    assert all(0.0 <= d <= 1.0 for d in scores.span_scores)


def test_works_under_inference_mode_in_bfloat16(identity_model, tokenizer, batchings):
    model = tiny_llama(len(tokenizer))
    make_identity(model, IDENTITY)
    model.to(torch.bfloat16)
    reference = score_layers(identity_model, batchings["fours"], "block_influence", progress=False)
    with torch.inference_mode():
        scores = score_layers(model, batchings["fours"], "block_influence", progress=False)
    assert scores.order()[0] == IDENTITY
    assert scores.scores == pytest.approx(reference.scores, abs=0.03)


# --- taylor -------------------------------------------------------------------------------------------------------


def test_taylor_matches_manual_gradient_and_restores_state(tokenizer, batchings):
    model = tiny_llama(len(tokenizer), seed=3)
    batch = batchings["singles"][0]
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    kept_grad = torch.ones_like(model.model.norm.weight)
    model.model.norm.weight.grad = kept_grad

    manual = tiny_llama(len(tokenizer), seed=3)
    manual(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    expected = [sum((p * p.grad).abs().sum().item() for p in layer.parameters()) for layer in manual.model.layers]

    with torch.inference_mode():  # batches made under inference mode must still work
        frozen_batch = {k: v.clone() for k, v in batch.items()}
        scores = score_layers(model, [frozen_batch], "taylor", progress=False)
    assert scores.scores == pytest.approx(expected, rel=1e-4)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.model.norm.weight.grad is kept_grad
    assert all(p.grad is None for n, p in model.named_parameters() if n != "model.norm.weight")


def test_taylor_is_padding_invariant(tokenizer, batchings):
    model = tiny_llama(len(tokenizer), seed=4)
    a = score_layers(model, batchings["singles"], "taylor", progress=False).scores
    b = score_layers(model, batchings["fours_padded"], "taylor", progress=False).scores
    assert b == pytest.approx(a, rel=1e-4)


# --- simple metrics, task ablation, ordering ----------------------------------------------------------------------


def test_reverse_removes_deepest_first_and_keeps_the_last(identity_model):
    scores = score_layers(identity_model, None, "reverse", progress=False)
    assert scores.order() == [4, 3, 2, 1, 0, 5]
    assert scores.order(protect_last=1) == [4, 3, 2, 1, 0]
    assert scores.choose(2) == [3, 4]


def test_random_is_seeded(identity_model):
    a = score_layers(identity_model, None, "random", seed=5, progress=False)
    assert a.order() == score_layers(identity_model, None, "random", seed=5, progress=False).order()
    orders = {tuple(score_layers(identity_model, None, "random", seed=s, progress=False).order()) for s in range(6)}
    assert len(orders) > 1
    assert sorted(a.order()) == list(range(NUM_LAYERS))


def test_task_ablation_uses_the_score_drop(identity_model, own_text, batchings):
    batch = own_text[0]
    calls = []
    probe = batchings["fours"][0]
    with torch.no_grad():
        before = identity_model(**probe).logits

    def score_fn(model):
        calls.append(1)
        return -model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.item()

    scores = score_layers(identity_model, None, "task_ablation", score_fn=score_fn, progress=False)
    assert len(calls) == NUM_LAYERS + 1
    assert scores.baseline == pytest.approx(score_fn(identity_model))
    loss = score_layers(identity_model, [batch], "calibration_loss", progress=False)
    assert scores.scores == pytest.approx([s - loss.baseline for s in loss.scores], abs=1e-5)
    assert scores.order()[0] == IDENTITY and scores.scores[IDENTITY] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        assert torch.equal(identity_model(**probe).logits, before)  # every skip was undone


def test_greedy_ablation_chooses_one_layer_per_round_on_top_of_those_chosen(identity_model, own_text):
    batch = own_text[0]
    skipped = []

    def score_fn(model):
        skipped.append(1)
        return -model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.item()

    scores, chosen, after = greedy_ablation(identity_model, 2, score_fn, protect_first=1, protect_last=1,
                                            progress=False)
    assert len(skipped) == 1 + 4 + 3, "the baseline, then the 4 unprotected layers, then the 3 left"
    single = score_layers(identity_model, None, "task_ablation", score_fn=score_fn, progress=False)
    assert scores.baseline == pytest.approx(single.baseline)
    assert scores.scores[1:5] == pytest.approx(single.scores[1:5]) and scores.scores[0] == scores.scores[5] == math.inf
    assert chosen[0] == IDENTITY
    with torch.no_grad():
        pairs = {}
        for c in (1, 2, 4):
            with skip_layers(identity_model, [IDENTITY, c]):
                pairs[c] = score_fn(identity_model)
    assert chosen[1] == max(pairs, key=pairs.get) and after[1] == pytest.approx(pairs[chosen[1]])
    assert after[0] == pytest.approx(single.baseline - single.scores[IDENTITY])


def test_a_stage_record_ranks_every_unprotected_layer_and_a_kept_ranking_is_followed(identity_model, own_text):
    batch = own_text[0]

    def score_fn(model):
        return -model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.item()

    selection = Selection(metric="task_ablation", tasks=["successor"], protect_first=1, protect_last=1)
    chosen, record = pipeline.score_and_choose(identity_model, 1, selection, lambda: [], 0, score_fn=score_fn)
    assert chosen == [IDENTITY] and record["ranking"][0] == IDENTITY and sorted(record["ranking"]) == [1, 2, 3, 4]
    assert record["scores"][0] is None and record["scores"][5] is None, "protected layers are not scored"
    json.dumps(record, allow_nan=False)
    model = tiny_llama(identity_model.config.vocab_size)
    remove_layers(model, [2])
    kept = original_indices(model)
    chosen, record = pipeline.score_and_choose(model, 2, selection, lambda: [], 0, ranking=[2, 5, 1, 4, 3],
                                               score_fn=lambda m: pytest.fail("a kept ranking scores nothing"))
    assert [kept[i] for i in chosen] == [1, 5] and record["layers"] == [5, 1] and record["rescored"] is False


def test_task_score_reads_only_the_selection_split(tokenizer, monkeypatch):
    """The prompts TaskScore scores are the selection split's problems: none is an evaluation problem,
    and its loglik is each answer's mean per-token log-probability, averaged per task, then over tasks."""
    import gradual.tasks.selection as selection_module

    scored = []
    real = selection_module.continuation_logprobs

    def spy(model, tok, pairs, **kwargs):
        scored.extend(pairs)
        return real(model, tok, pairs, **kwargs)

    monkeypatch.setattr(selection_module, "continuation_logprobs", spy)
    model = tiny_model("llama", num_layers=2)
    score = TaskScore(tokenizer, ["successor", "category"], n=6)
    value = score(model)
    assert len(scored) == 12
    questions = {context.rsplit("Q: ", 1)[1].removesuffix("\nA:") for context, _ in scored}
    tasks = [get_task("successor"), get_task("category")]
    assert questions == {p.question for t in tasks for p in t.problems("select", 6)}
    assert not questions & {p.question for t in tasks for p in t.problems("eval", 500)}
    per_task = score.per_task(model)
    assert value == pytest.approx(sum(per_task.values()) / 2)
    prompt, answer = score.pairs["successor"][0]
    assert answer == " " + get_task("successor").problems("select", 6)[0].answer
    first = real(model, tokenizer, [(prompt, answer)], progress=False)[0] / score.lengths["successor"][0]
    rest = real(model, tokenizer, score.pairs["successor"][1:], progress=False)
    means = [first] + [lp / n for lp, n in zip(rest, score.lengths["successor"][1:], strict=True)]
    assert per_task["successor"] == pytest.approx(sum(means) / 6, abs=1e-5)
    assert 0.0 <= TaskScore(tokenizer, ["successor"], n=3, score="accuracy")(model) <= 1.0


def test_protected_layers_never_appear(identity_model, batchings):
    scores = score_layers(identity_model, batchings["fours"], "block_influence", progress=False)
    order = scores.order(protect_first=1, protect_last=2)
    assert sorted(order) == [1, 2, 3]
    assert order == sorted([1, 2, 3], key=lambda i: scores.scores[i])
    assert set(scores.choose(2, protect_first=1, protect_last=2)) <= {1, 2, 3}
    with pytest.raises(UsageError):
        scores.choose(4, protect_first=1, protect_last=2)
    rows = scores.table()
    assert [r["rank"] for r in rows] == list(range(1, NUM_LAYERS + 1))
    assert [r["layer"] for r in rows] == scores.order()


def test_original_indices_and_table(identity_model):
    identity_model.config.gradual_original_layers = [0, 1, 3, 4, 6, 7]
    try:
        scores = score_layers(identity_model, None, "reverse", progress=False)
    finally:
        del identity_model.config.gradual_original_layers
    assert scores.original_indices == [0, 1, 3, 4, 6, 7]
    assert scores.table()[0] == {"rank": 1, "layer": 4, "original": 6, "score": 0.0}
    text = format_table(scores)
    assert text.splitlines()[0].startswith("reverse") and len(text.splitlines()) == NUM_LAYERS + 2


def test_bad_input_raises_usage_error(identity_model, batchings):
    with pytest.raises(UsageError, match="allowed: " + ", ".join(METRICS)):
        score_layers(identity_model, batchings["fours"], "magnitude")
    with pytest.raises(UsageError, match="score_fn"):
        score_layers(identity_model, None, "task_ablation")
    with pytest.raises(UsageError, match="span"):
        score_layers(identity_model, batchings["fours"], "angular_distance", span=NUM_LAYERS + 1)
    with pytest.raises(UsageError, match="batches"):
        score_layers(identity_model, [], "block_influence")
    with pytest.raises(UsageError):
        LayerScores("random", [0.0, 1.0], [0, 1]).order(protect_first=-1)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "opt", "gemma3"])
def test_hooks_read_every_architecture(tokenizer, batchings, arch):
    """Other layer signatures and output types: block influence still equals the hidden-states formula."""
    model = tiny_model(arch, num_layers=4)
    batch = batchings["singles"][0]
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity
    expected = [1 - cos(hidden[i], hidden[i + 1], dim=-1).mean().item() for i in range(3)]
    scores = score_layers(model, [batch], "block_influence", progress=False)
    assert scores.scores[:-1] == pytest.approx(expected, abs=1e-5)
