"""Prompts as the model expects them: the tokenizer's BOS exactly once at position 0 on every path that feeds a model
(none for a tokenizer that adds none, never twice after a chat template), and prompts longer than the model's
positions cut from the left as lm-eval cuts them and counted, or refused in one line where no cut can help.
Real tiny models and tokenizers throughout; a forward pre-hook records the tokens each model is really fed."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, PretrainedConfig

from gradual import importance
from gradual.cli import main
from gradual.datamodule import GradualDataModule, RecoveryDataModule
from gradual.errors import UsageError
from gradual.generation import DecodingConfig, encode_prompt, format_prompt, generate, max_positions
from gradual.models import model_positions
from gradual.sgr import PromptItem, SGRConfig, build_pairs
from gradual.tasks import build_prompt, evaluate, get_task
from gradual.tasks.evaluate import choice_text
from gradual.tasks.scoring import continuation_logprobs, encode_pair
from gradual.tiny import TINY_CHAT_TEMPLATE, TINY_MAX_POSITIONS, tiny_model, tiny_tokenizer
from gradual.training_examples import tokenize_pair

POSITIONS = TINY_MAX_POSITIONS
LONG = "".join(f"Q: what is {i} plus {i + 1}?\nA: {2 * i + 1}\n" for i in range(12))  # ~380 byte tokens


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is fastest on a shared machine."""


def no_bos_tokenizer():
    """The tiny tokenizer as GPT-2, Qwen or SmolLM2 ones are: it adds no BOS and its chat template writes none."""
    tok = tiny_tokenizer()
    tok.add_bos_token = False
    tok.chat_template = TINY_CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    return tok


class Fed:
    """Every real token a model is fed, with its position id, one list per row of each forward call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows: list[list[tuple[int, int]]] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        mask = kwargs.get("attention_mask")
        real = torch.ones_like(ids) if mask is None else mask[:, -ids.shape[1]:].to(ids.device)
        positions = kwargs.get("position_ids")
        positions = real.cumsum(-1) - 1 if positions is None else positions  # right-padded: the column index
        for row, pos, keep in zip(ids.tolist(), positions.tolist(), real.bool().tolist(), strict=True):
            self.rows.append([(t, p) for t, p, k in zip(row, pos, keep, strict=True) if k])

    def close(self) -> None:
        self.handle.remove()

    def prompt(self) -> list[int]:
        """The tokens at positions 0, 1, ... in order (one row at batch size 1)."""
        by_position = dict(sorted((p, t) for row in self.rows for t, p in row))
        return [by_position[p] for p in range(len(by_position))]


def feed_every_path(model: torch.nn.Module, tok) -> Fed:
    """Run generation, evaluation (both forms, both formats), plain-batched scoring, SGR teacher generation and
    calibration scoring on `model`, recording what it is fed. One new token per reply, so no generated token
    (which a random model may pick as BOS) is fed back."""
    fed = Fed(model)
    try:
        one = DecodingConfig(do_sample=False, max_new_tokens=1)
        generate(model, tok, ["hi", "what is 2+2?", format_prompt(tok, "hi")], one, batch_size=2, progress=False)
        for fmt in ("fewshot", "chat"):
            evaluate(model, tok, ["successor"], n=2, fmt=fmt, batch_size=2, max_new_tokens=1, progress=False, shots=1)
        prompt = build_prompt(get_task("successor"), get_task("successor").problems("eval", 1)[0], tok, "fewshot", 1)
        continuation_logprobs(model, tok, [(prompt, " 4"), (prompt, " 12")], progress=False, prefix_cache=False)
        items = [PromptItem("hi"), PromptItem("Name a color.")]
        for chat in (True, False):
            build_pairs(model, tok, SGRConfig(source="file", path="unused", decoding=one, chat=chat), items=items,
                        progress=False)
        batches = importance.calibration_batches(tok, ["The cat sat.", "Dogs bark at night."], batch_size=2)
        importance.score_layers(model, batches, "block_influence", progress=False)
    finally:
        fed.close()
    return fed


@pytest.mark.parametrize("adds_bos", [True, False])
def test_every_prompt_path_feeds_one_bos_at_position_0_or_none(adds_bos):
    tok = tiny_tokenizer() if adds_bos else no_bos_tokenizer()
    bos = tok.bos_token_id
    fed = feed_every_path(tiny_model("llama", num_layers=2), tok)
    first = [t for row in fed.rows for t, p in row if p == 0]
    later = [t for row in fed.rows for t, p in row if p > 0]
    assert len(first) >= 10, "every path was recorded (shared prefixes run once)"
    if adds_bos:
        assert set(first) == {bos} and bos not in later
    else:
        assert bos not in first and bos not in later
    for chat in (True, False):  # training prompts, as the data module tokenises them
        ids = tokenize_pair(tok, "What is 2+2?", "4", chat=chat)["input_ids"]
        assert ids.count(bos) == int(adds_bos) and (ids[0] == bos) is adds_bos


def test_encode_prompt_adds_the_tokenizers_bos_once():
    tok = tiny_tokenizer()
    text = "Q: 1 + 1\nA:"
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, text) == tok(text)["input_ids"] == [tok.bos_token_id, *plain]
    chat = format_prompt(tok, "hi")
    assert chat.startswith(tok.bos_token)
    assert encode_prompt(tok, chat) == tok(chat, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, chat).count(tok.bos_token_id) == 1, "the template's BOS is not doubled"
    other = no_bos_tokenizer()
    assert encode_prompt(other, text) == plain, "a tokenizer without BOS encodes as before"
    assert encode_prompt(other, format_prompt(other, "hi")) == other(format_prompt(other, "hi"))["input_ids"]
    pair = encode_pair(tok, text, " 2")
    assert pair == ([tok.bos_token_id, *plain], tok(" 2", add_special_tokens=False)["input_ids"])


def test_max_positions_reads_every_config_spelling(tmp_path: Path):
    assert max_positions(tiny_model("gpt2", num_layers=1)) == max_positions(tiny_model("llama", 1)) == POSITIONS
    assert max_positions(GPT2Config(n_positions=77)) == 77
    assert max_positions(PretrainedConfig()) is None
    assert model_positions("tiny:opt:2") == POSITIONS
    GPT2Config(n_positions=99, n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert model_positions(str(tmp_path / "gpt2")) == 99


# --- prompts longer than the positions (tiny gpt2 and opt: learned positions, an IndexError past the table) --------

def long_prompts() -> list[str]:
    """Few-shot-like prompts sharing a prefix: two longer than the positions (by different amounts), two short."""
    return [f"{LONG}Q: what is 5 plus 7?\nA:", "Q: 1 + 1\nA:", f"{LONG}{LONG[:90]}Q: 3?\nA:", "hello"]


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_long_prompts_keep_their_last_tokens_and_equal_plain_generate(arch):
    model, tok = tiny_model(arch, num_layers=2), tiny_tokenizer()
    budget = 10
    room = POSITIONS - budget
    prompts = long_prompts()
    full = [tok(p)["input_ids"] for p in prompts]
    assert [len(f) > room for f in full] == [True, False, True, False]
    reference = []
    for ids in full:
        ids = torch.tensor([ids[-room:]])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in (tok.eos_token_id, tok.pad_token_id)), len(new))
        reference.append([tok.decode(new[:cut], skip_special_tokens=True)])
    cfg = DecodingConfig(do_sample=False, max_new_tokens=budget)
    out = generate(model, tok, prompts, cfg, batch_size=4, progress=False)  # truncated and whole rows together
    assert out == reference
    assert out.truncated == [True, False, True, False]
    fed = Fed(model)
    try:
        generate(model, tok, prompts[:1], cfg, progress=False)
    finally:
        fed.close()
    assert fed.prompt()[:room] == full[0][-room:]
    assert max(p for row in fed.rows for _, p in row) < POSITIONS


def test_a_budget_that_fills_the_positions_is_refused():
    model, tok = tiny_model("gpt2", num_layers=1), tiny_tokenizer()
    with pytest.raises(UsageError, match=f"max_new_tokens={POSITIONS} leaves no room"):
        generate(model, tok, ["hi"], DecodingConfig(do_sample=False, max_new_tokens=POSITIONS), progress=False)
    with pytest.raises(UsageError, match="more than the model's 256 positions"):
        continuation_logprobs(model, tok, [("Q:", " " + "x" * POSITIONS)], progress=False)


def test_eval_cli_on_copy_reports_truncated_prompts(capsys: pytest.CaptureFixture[str]):
    """The reported crash: copy's 5-shot prompt (~380 tokens) on a 256-position model."""
    assert main(["eval", "--model", "tiny:gpt2:2", "--tasks", "copy", "--n", "4", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in out.splitlines()[2:])}
    assert out.splitlines()[0].split("|")[-2].strip() == "truncated"
    assert rows["copy"][-1] == rows["mc_copy"][-1] == "4"
    assert main(["eval", "--model", "tiny:gpt2:2", "--tasks", "copy", "--n", "1", "--max-new-tokens", "300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_new_tokens=300 leaves no room" in err[0]


def test_evaluation_counts_and_feeds_the_last_tokens_of_each_prompt():
    model, tok = tiny_model("gpt2", num_layers=2), tiny_tokenizer()
    task = get_task("copy")
    problems = task.problems("eval", 2)
    res = evaluate(model, tok, ["copy"], n=2, batch_size=2, progress=False, records=True)
    assert res["copy"].truncated == res["mc_copy"].truncated == 2
    assert all(r["truncated"] for r in res["copy"].records + res["mc_copy"].records)
    assert res["copy"].to_dict()["truncated"] == 2
    fed = Fed(model)
    try:
        evaluate(model, tok, ["copy"], n=1, forms=("generative",), batch_size=1, progress=False)
    finally:
        fed.close()
    room = POSITIONS - task.fewshot_tokens
    assert fed.prompt()[:room] == tok(build_prompt(task, problems[0], tok, "fewshot"))["input_ids"][-room:]


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_scoring_cuts_long_contexts_as_lm_eval_does(arch, prefix_cache):
    """The model sees the last `positions` tokens of context + continuation minus its last token (lm-eval's
    `(context + continuation)[-(max_length + 1):][:-1]`); the score equals that sequence's own log-likelihood. In one
    cached batch the longest context and the longest continuation together span more cache columns than positions;
    each row's own positions stay below the limit."""
    model, tok = tiny_model(arch, num_layers=2), tiny_tokenizer()
    prompt = long_prompts()[0]
    pairs = [(prompt, choice_text(prompt, c)) for c in ("12", "a much longer wrong answer")] + [("Q: 1 + 1\nA:", " 2")]
    scores = continuation_logprobs(model, tok, pairs, batch_size=3, progress=False, prefix_cache=prefix_cache)
    assert scores.truncated == [True, True, False]
    for (context, continuation), score in zip(pairs, scores, strict=True):
        ctx, cont = encode_pair(tok, context, continuation)
        seq = (ctx + cont)[-(POSITIONS + 1):][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        start = len(seq) - len(cont)
        manual = sum(float(logp[start + j, t]) for j, t in enumerate(cont))
        assert score == pytest.approx(manual, abs=1e-4)


def test_sgr_generation_cuts_long_prompts(caplog: pytest.LogCaptureFixture):
    model, tok = tiny_model("gpt2", num_layers=2), tiny_tokenizer()
    cfg = SGRConfig(source="file", path="unused", decoding=DecodingConfig(do_sample=False, max_new_tokens=6))
    with caplog.at_level(logging.WARNING, logger="gradual.generation"):
        pairs = build_pairs(model, tok, cfg, items=[PromptItem(LONG), PromptItem("hi")], progress=False)
    assert [p["prompt"] for p in pairs] == [LONG, "hi"]
    assert "1 of 2 prompts do not fit the model's 256 positions with 6 new tokens" in caplog.text


def test_block_influence_with_long_calibration_texts(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     capsys: pytest.CaptureFixture[str]):
    """Calibration texts keep their first tokens up to `max_length`, then up to the model's positions."""
    model, tok = tiny_model("gpt2", num_layers=3), tiny_tokenizer()
    texts = [LONG, LONG[:120], LONG * 2]
    with caplog.at_level(logging.WARNING, logger="gradual.importance"):
        long = importance.score_layers(model, importance.calibration_batches(tok, texts, 2, max_length=600),
                                       "block_influence", progress=False)
    assert "2 of 3 calibration texts are longer than the model's 256 positions" in caplog.text
    fitting = importance.score_layers(model, importance.calibration_batches(tok, texts, 2, max_length=POSITIONS),
                                      "block_influence", progress=False)
    assert long.scores == pytest.approx(fitting.scores, abs=1e-6)
    source = tmp_path / "long.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["score", "--model", "tiny:gpt2:3", "--calibration", str(source), "--max-length", "600"]) == 0
    assert len(re.findall(r"^\s*\d+\s+\d+\s+\d+\s+\S+$", capsys.readouterr().out, re.M)) == 3


def test_training_max_length_above_the_positions_is_clamped_and_counted():
    model, tok = tiny_model("gpt2", num_layers=2), tiny_tokenizer()
    pairs = [{"prompt": "Count:", "response": LONG}, {"prompt": "hi", "response": "ok"}, {"prompt": LONG * 2,
                                                                                          "response": "y"}]
    dm = RecoveryDataModule(pairs, tokenizer=tok, samples_per_epoch=2, batch_size=2, max_length=1000,
                            max_positions=POSITIONS)
    lengths = dm.dataset.lengths
    assert max(lengths) == POSITIONS and dm.num_clamped == 2 and dm.num_dropped == 1
    whole = tokenize_pair(tok, "Count:", LONG)
    assert dm.dataset.examples[0] == {key: value[:POSITIONS] for key, value in whole.items()}
    assert dm.dataset.examples[1] == tokenize_pair(tok, "hi", "ok")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_the_fit_data_module_takes_the_models_positions():
    sgr = SGRConfig(tasks=["successor"], n_per_task=4, eval_n=20, responses="dataset")
    assert GradualDataModule(model="tiny:gpt2:2", sgr=sgr, max_length=1000).max_positions == POSITIONS
