"""Prompts as the model expects them: the tokenizer's BOS exactly once at position 0 on every path that feeds a model
(none for a tokenizer that adds none, never twice after a chat template). Real tiny models and tokenizers
throughout; a forward pre-hook records the tokens each model is really fed."""

from __future__ import annotations

import pytest
import torch

from gradual import importance
from gradual.data import tokenize_pair
from gradual.generation import DecodingConfig, encode_prompt, format_prompt, generate
from gradual.models import TINY_CHAT_TEMPLATE, tiny_model, tiny_tokenizer
from gradual.sgr import PromptItem, SGRConfig, build_pairs
from gradual.tasks import build_prompt, evaluate, get_task
from gradual.tasks.scoring import continuation_logprobs, encode_pair


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
