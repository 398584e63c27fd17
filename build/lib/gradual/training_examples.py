"""Recovery examples: (prompt, response) pairs and plain texts, tokenised for training, and the padding collator.

- pairs `{"prompt", "response"}` → chat-formatted examples whose loss covers the response only (`tokenize_pair`);
- texts `{"text"}` → plain token sequences whose every token is a label (`tokenize_text`): language modelling under
  `sft`, the original model's distribution at every position under `kd`.

A `Part` is one weighted source of them (`gradual.mixture`); `gradual.datamodule` tokenises the parts and serves
them one stage at a time (`gradual.sampler`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.generation import DEFAULT_SYSTEM_PROMPT, encode_prompt, response_prompt
from gradual.jsonl import read_jsonl
from gradual.sampler import StepItem

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF causal-LM loss) skips
STEP_KEYS = ("step_targets", "step_tokens")  # a batch's loss normalisers (`gradual.sampler.StepItem`)


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
                  system: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int | None = None,
                  chat: bool = True) -> dict[str, list[int]] | None:
    """Token ids of prompt + response + EOS, with labels -100 on the prompt so only the response is learned.

    The prompt part is `response_prompt` (the chat template with `system`, or the plain prompt followed by "\\n"
    when there is no template or `chat` is off), tokenised by `encode_prompt` exactly as
    `gradual.generation.generate` feeds it, so training sees the prompt tokens inference sees. Truncation to
    `max_length` cuts the end of the response; returns None when the prompt alone leaves no room for a single
    response token (the caller drops and counts such examples).
    """
    prompt_text = response_prompt(tokenizer, prompt, system, chat)
    prompt_ids = encode_prompt(tokenizer, prompt_text)
    joint_ids = encode_prompt(tokenizer, prompt_text + response)
    if joint_ids[: len(prompt_ids)] == prompt_ids:
        response_ids = joint_ids[len(prompt_ids):]
    else:  # a token straddles the boundary: keep the prompt's own tokens, encode the response alone
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    if max_length is not None:
        if len(prompt_ids) >= max_length:
            return None
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str,
                  max_length: int | None = None) -> dict[str, list[int]] | None:
    """Token ids of a plain text with every token a label: there is no prompt to mask, the whole text is learned.

    Encoded by `encode_prompt` (the tokenizer's BOS once, no EOS: a text is a stretch of a document, not a finished
    answer), so a few-shot document is tokenised as the evaluation tokenises its prompt. Truncation to `max_length`
    cuts the end; returns None when fewer than two tokens remain (nothing to predict).
    """
    ids = encode_prompt(tokenizer, text)[:max_length]
    if len(ids) < 2:
        return None
    return {"input_ids": ids, "labels": list(ids)}


def load_pairs(source: Sequence[dict] | str | Path) -> list[dict[str, str]]:
    """(prompt, response) pairs from a list of dicts or a JSONL file; other keys are ignored."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"recovery pairs file {str(path)!r} does not exist; give a JSONL file or a list of pairs")
        rows = read_jsonl(path)
        where, records = [place for place, _ in rows], [row for _, row in rows]
    else:
        records, where = list(source), [f"pair {i}" for i in range(len(source))]
    pairs = []
    for record, place in zip(records, where, strict=True):
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                and isinstance(record.get("response"), str)):
            raise UsageError(f"{place} is {str(record)[:80]!r}; each pair needs string 'prompt' and 'response'")
        pairs.append({"prompt": record["prompt"], "response": record["response"]})
    return pairs


@dataclass
class Part:
    """One source of the recovery mixture: its name, its weight (its share of every stage's examples relative to the
    other parts' weights, >= 0) and its examples, all pairs `{"prompt", "response"}` or texts `{"text"}`."""

    name: str
    weight: float
    examples: list[dict[str, str]]


def check_examples(examples: Sequence[dict], where: str) -> list[dict[str, str]]:
    """Each example as a plain pair `{"prompt", "response"}` or text `{"text"}` (other keys dropped); UsageError
    naming `where` otherwise."""
    out = []
    for i, e in enumerate(examples):
        if isinstance(e, dict) and isinstance(e.get("text"), str) and "prompt" not in e:
            out.append({"text": e["text"]})
        elif isinstance(e, dict) and isinstance(e.get("prompt"), str) and isinstance(e.get("response"), str):
            out.append({"prompt": e["prompt"], "response": e["response"]})
        else:
            raise UsageError(f"{where} example {i} is {str(e)[:80]!r}; each needs string 'prompt' and 'response', "
                             "or string 'text'")
    return out


class TokenizedPairs(Dataset):
    """Tokenised examples in memory, with their lengths for length grouping, their counted targets (positions whose
    next token is a label: what the loss averages over) and the part each came from.

    Indexed by an int, or by a `StepItem` of `gradual.sampler`, whose step normalisers the example then carries
    (`STEP_KEYS`) for `pad_collator` to put into the batch."""

    def __init__(self, examples: list[dict[str, list[int]]], sources: Sequence[int] | None = None) -> None:
        self.examples = examples
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.targets = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples]
        self.sources = [0] * len(examples) if sources is None else list(sources)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | StepItem) -> dict[str, Any]:
        if isinstance(key, StepItem):
            return {**self.examples[key], "step_targets": key.targets, "step_tokens": key.tokens}
        return self.examples[key]


class StepCollator:
    """transformers' `DataCollatorForSeq2Seq` for the token fields, plus the step normalisers (`STEP_KEYS`, equal for
    every example of a micro-batch) as 0-d float64 tensors when the examples carry them."""

    def __init__(self, collator: DataCollatorForSeq2Seq) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        step = {key: features[0][key] for key in STEP_KEYS if key in features[0]}
        batch = self.collator([{k: v for k, v in f.items() if k not in STEP_KEYS} for f in features])
        return {**batch, **{key: torch.tensor(v, dtype=torch.float64) for key, v in step.items()}}



def pad_collator(tokenizer: PreTrainedTokenizerBase) -> StepCollator:
    """Batches padded on the right to their own longest example (dynamic padding), labels padded with -100 and an
    attention mask of the real tokens: transformers' collator over a copy of the tokenizer set to pad on the right
    (whatever side the shared tokenizer pads on), with its pad id, else EOS, else 0. A deep copy: a shallow one
    shares the special tokens, so setting the pad would change the caller's tokenizer."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return StepCollator(DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                               return_tensors="pt"))
