"""Recovery data: examples of two kinds, mixed from weighted sources.

- pairs `{"prompt", "response"}` → chat-formatted examples whose loss covers the response only (`tokenize_pair`);
- texts `{"text"}` → plain token sequences whose every token is a label (`tokenize_text`): language modelling under
  `sft`, the original model's distribution at every position under `kd`.

`RecoveryDataModule` serves them so that one Lightning epoch is one pruning stage of exactly
`samples_per_epoch` examples, whatever the dataset size: `StageSampler` walks an endless stream of seeded
shuffled passes over each source, gives every source its weight's share of each stage, continues each epoch where
the previous one stopped, and groups similar lengths into batches to waste little padding. The sampler splits the
data across DDP ranks itself, so the Trainer must be built with `use_distributed_sampler=False` (otherwise Lightning
wraps it in a `DistributedSampler` and every rank would see a different, shorter epoch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.generation import DEFAULT_SYSTEM_PROMPT, encode_prompt, response_prompt
from gradual.jsonl import read_jsonl
from gradual.ranks import rank_world

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF causal-LM loss) skips
log = logging.getLogger(__name__)


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
    """Tokenised examples in memory, with their lengths for length grouping and the part each came from."""

    def __init__(self, examples: list[dict[str, list[int]]], sources: Sequence[int] | None = None) -> None:
        self.examples = examples
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.sources = [0] * len(examples) if sources is None else list(sources)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


class Collator:
    """Right-pads a batch to its own longest example (dynamic padding); labels pad with -100."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def check_weights(weights: Sequence[float]) -> None:
    """Mixture weights must be finite and >= 0, and not all 0 (UsageError)."""
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise UsageError(f"recovery source weight {bad[0]} is invalid; weights must be finite and >= 0")
    if not any(w > 0 for w in weights):
        raise UsageError("every recovery source has weight 0; give at least one a positive weight")


class StageSampler(Sampler[int]):
    """This rank's example indices for one epoch (= one pruning stage) of exactly `samples_per_epoch` examples.

    Examples belong to sources (`sources[i]`, default all 0) with `weights` (default [1]). The global order is an
    endless stream of positions; each position draws the next example of one source, chosen so that every prefix of
    the stream — hence every stage — holds each source in proportion to its weight, to within about one example
    (`mixture`). A source's draws are an endless series of passes over its examples, pass p a permutation seeded by
    (seed, p, source), so within a source every example is seen equally often: an example's rate is ∝ weight / source
    size. Epoch e takes stream positions [e·S, (e+1)·S), so consecutive stages continue where the last one stopped and
    a resumed run that calls `set_epoch(e)` sees exactly the same data. Within the epoch, mega-batches of
    `mega_batch_mult · batch_size · world_size` examples are sorted by length and cut into batches; each group of
    `world_size` neighbouring batches is one step (rank r takes the r-th), and the order of steps is shuffled by
    (seed, e). Everything depends only on (seed, epoch, sizes, weights), so every rank computes the same global order.
    Yields flat indices: a DataLoader with the same `batch_size` re-forms the batches.

    One source is sampled exactly as before sources existed: its passes are seeded by (seed, p).
    """

    def __init__(self, lengths: Sequence[int], samples_per_epoch: int, batch_size: int, seed: int = 0,
                 mega_batch_mult: int = 50, rank: int | None = None, world_size: int | None = None,
                 sources: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                 stage_samples: Sequence[int] | None = None, epoch: int = 0) -> None:
        if not lengths:
            raise UsageError("no recovery examples to sample from; give at least one (prompt, response) pair")
        dist_rank, dist_world = rank_world()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        per_step = batch_size * self.world_size
        for size in [samples_per_epoch, *(stage_samples or [])]:
            if size < per_step or size % per_step:
                raise UsageError(f"samples_per_epoch={size} is invalid; it must be a positive multiple of "
                                 f"batch_size × world_size = {batch_size} × {self.world_size}")
        if mega_batch_mult < 1:
            raise UsageError(f"mega_batch_mult={mega_batch_mult} is invalid; it must be >= 1")
        self.lengths = np.asarray(lengths)
        self.samples_per_epoch, self.batch_size, self.seed = samples_per_epoch, batch_size, seed
        self.mega_batch_mult = mega_batch_mult
        self.weights = np.asarray([1.0] if weights is None else weights, dtype=np.float64)
        self.sources = np.zeros(len(lengths), dtype=np.int64) if sources is None else np.asarray(sources)
        check_weights(self.weights.tolist())
        if len(self.sources) != len(self.lengths) or not np.isin(self.sources, range(len(self.weights))).all():
            raise ValueError(f"sources must give each of the {len(lengths)} examples one of {len(self.weights)} "
                             "source indices")
        self.members = [np.flatnonzero(self.sources == k) for k in range(len(self.weights))]
        empty = [k for k, w in enumerate(self.weights) if w > 0 and not len(self.members[k])]
        if empty:
            raise UsageError(f"recovery source {empty[0]} has weight {self.weights[empty[0]]} but no examples")
        self.stage_samples = list(stage_samples) if stage_samples else None
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning's fit loop before every epoch (also after resuming from a checkpoint)."""
        self.epoch = epoch

    def bounds(self, epoch: int) -> tuple[int, int]:
        """(first stream position, examples) of `epoch`: `samples_per_epoch` each, or with `stage_samples` each
        stage its own count (the last one repeating), so stages of different lengths still take consecutive,
        non-overlapping slices of the stream and a run's examples do not depend on its longest stage."""
        if self.stage_samples is None:
            return epoch * self.samples_per_epoch, self.samples_per_epoch
        sizes = self.stage_samples + [self.stage_samples[-1]] * max(0, epoch + 1 - len(self.stage_samples))
        return sum(sizes[:epoch]), sizes[epoch]

    def __len__(self) -> int:
        return self.bounds(self.epoch)[1] // self.world_size

    def _pass(self, source: int, p: int) -> np.ndarray:
        key = [self.seed, 0, p] if source == 0 else [self.seed, 0, p, source]
        members = self.members[source]
        return members[np.random.default_rng(key).permutation(len(members))]

    def _draws(self, source: int, start: int, count: int) -> np.ndarray:
        """Draws [start, start + count) of the source's endless stream of passes, as example indices."""
        n = len(self.members[source])
        first, last = start // n, (start + count - 1) // n
        stream = np.concatenate([self._pass(source, p) for p in range(first, last + 1)])
        return stream[start - first * n: start - first * n + count]

    def mixture(self, end: int) -> np.ndarray:
        """The source of each of the first `end` stream positions.

        Source k's j-th draw falls due at (j + ½) / weight_k and positions take draws in order of due time (ties: the
        lower k) — Sainte-Laguë's sequential apportionment. Any prefix of n positions thus holds close to
        n · weight_k / Σ weights draws of source k, and a longer prefix never holds fewer, so stages are resumable."""
        total, k_max = self.weights.sum(), len(self.weights)
        due, source = [], []
        for k, w in enumerate(self.weights):
            if w > 0:  # at most n·w/Σw + k_max/2 + 1 draws of k are among the first n positions
                draws = np.arange(math.ceil(end * w / total) + k_max + 2)
                due.append((draws + 0.5) / w)
                source.append(np.full(len(draws), k))
        due_all, source_all = np.concatenate(due), np.concatenate(source)
        return source_all[np.lexsort((source_all, due_all))][:end]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's global stream slice, before length grouping and rank split."""
        start, size = self.bounds(epoch)
        mixture = self.mixture(start + size)
        order = np.empty(size, dtype=np.int64)
        for k in np.unique(mixture[start:]):
            here = np.flatnonzero(mixture[start:] == k)
            order[here] = self._draws(int(k), int((mixture[:start] == k).sum()), len(here))
        return order

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in training order."""
        order = self.epoch_order(epoch)
        mega = self.mega_batch_mult * self.batch_size * self.world_size
        steps = []
        for lo in range(0, len(order), mega):
            chunk = order[lo: lo + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            per_step = self.batch_size * self.world_size
            steps.extend(chunk[s: s + per_step] for s in range(0, len(chunk), per_step))
        shuffle = np.random.default_rng([self.seed, 1, epoch]).permutation(len(steps))
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [steps[i][lo:hi].tolist() for i in shuffle]

    def __iter__(self):
        for batch in self.batches(self.epoch):
            yield from batch


class RecoveryDataModule(LightningDataModule):
    """Recovery batches for the prune–heal loop: one epoch = one stage of `samples_per_epoch` examples.

    The data are `parts` (`Part`: a name, a weight and examples, pairs or texts); each stage holds every part in
    proportion to its weight (`StageSampler`). Pairs or parts and the tokenizer may be given later with `set_pairs` /
    `set_parts` / `set_tokenizer` (SGR pairs are generated by the module at fit start); tokenisation happens on the
    first `train_dataloader` call after a change. The Trainer must use `use_distributed_sampler=False`: the sampler
    already splits each stage across DDP ranks, giving every rank `samples_per_epoch / world_size` examples
    (`batches_per_epoch` batches).

    `max_positions` (the model's position limit, None if unknown) caps `max_length` rather than refusing it, so one
    config serves models of different context sizes: an example longer than the positions is cut there (or dropped,
    when its prompt fills them) as if `max_length` were the limit, counted in `num_clamped` and logged.
    """

    def __init__(self, pairs: list[dict] | str | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 samples_per_epoch: int = 800, batch_size: int = 8, max_length: int = 512,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, chat: bool = True, seed: int = 0,
                 mega_batch_mult: int = 50, num_workers: int = 0, max_positions: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size} is invalid; it must be >= 1")
        if samples_per_epoch < batch_size or samples_per_epoch % batch_size:
            raise UsageError(f"samples_per_epoch={samples_per_epoch} is invalid; it must be a positive multiple of "
                             f"batch_size={batch_size}")
        if max_length < 2:
            raise UsageError(f"max_length={max_length} is invalid; it must be >= 2")
        self.samples_per_epoch, self.batch_size, self.max_length = samples_per_epoch, batch_size, max_length
        self.stage_samples: list[int] | None = None  # per-stage sizes when stages differ (set by GradualModule)
        self.system_prompt, self.chat, self.seed = system_prompt, chat, seed
        self.mega_batch_mult, self.num_workers = mega_batch_mult, num_workers
        self.tokenizer, self.max_positions = tokenizer, max_positions
        self.parts: list[Part] = [Part("pairs", 1.0, load_pairs(pairs))] if pairs is not None else []
        self.num_dropped = self.num_clamped = 0
        self.part_counts: list[dict[str, int]] = []
        self._dataset: TokenizedPairs | None = None

    @property
    def pairs(self) -> list[dict[str, str]]:
        """The (prompt, response) pairs of every part, in order."""
        return [e for part in self.parts for e in part.examples if "prompt" in e]

    def set_pairs(self, pairs: list[dict] | str | Path) -> None:
        """Replace the data by one part of (prompt, response) pairs; tokenised on the next `train_dataloader` call."""
        self.set_parts([Part("pairs", 1.0, load_pairs(pairs))])

    def set_parts(self, parts: Sequence[Part]) -> None:
        """Replace the data by weighted parts (see `Part`); tokenised on the next `train_dataloader` call."""
        check_weights([part.weight for part in parts])
        self.parts = [Part(part.name, part.weight, check_examples(part.examples, f"recovery source {part.name!r}"))
                      for part in parts]
        self._dataset = None

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._dataset = None

    def _tokenize(self, example: dict[str, str], max_length: int) -> dict[str, list[int]] | None:
        if "text" in example:
            return tokenize_text(self.tokenizer, example["text"], max_length)
        return tokenize_pair(self.tokenizer, example["prompt"], example["response"], self.system_prompt, max_length,
                             self.chat)

    @property
    def dataset(self) -> TokenizedPairs:
        """The tokenised examples of every part; examples with nothing to learn within `max_length` (a prompt that
        alone fills it, a text of under two tokens) are dropped (`num_dropped`; per part in `part_counts`)."""
        if self._dataset is None:
            if self.tokenizer is None:
                raise ValueError("RecoveryDataModule has no tokenizer; call set_tokenizer first")
            if not any(part.examples for part in self.parts):
                raise UsageError("no recovery pairs; give a JSONL file or a list of {prompt, response} dicts")
            limit = min(self.max_length, self.max_positions or self.max_length)
            total = sum(len(part.examples) for part in self.parts)
            examples, sources, self.part_counts = [], [], []
            bar = tqdm(total=total, desc="tokenize recovery data", unit="example", leave=False, disable=total < 1000)
            for k, part in enumerate(self.parts):
                kept = clamped = 0
                for raw in part.examples:
                    example = self._tokenize(raw, self.max_length)
                    if example is not None and len(example["input_ids"]) > limit:
                        clamped += 1
                        example = self._tokenize(raw, limit)
                    if example is not None:
                        examples.append(example)
                        sources.append(k)
                        kept += 1
                    bar.update()
                self.part_counts.append({"examples": kept, "dropped": len(part.examples) - kept, "clamped": clamped})
            bar.close()
            self.num_dropped = total - len(examples)
            self.num_clamped = sum(c["clamped"] for c in self.part_counts)
            if self.num_clamped:
                log.warning("max_length=%d is above the model's %d positions: %d of %d recovery examples were cut "
                            "at %d tokens", self.max_length, limit, self.num_clamped, total, limit)
            if self.num_dropped:
                log.warning("dropped %d of %d recovery examples with nothing to learn within max_length=%d (a prompt "
                            "that alone fills it, or a text of under 2 tokens)", self.num_dropped, total, limit)
            if not examples:
                raise UsageError(f"max_length={limit} is too small: every prompt fills it; raise it")
            empty = [part.name for part, c in zip(self.parts, self.part_counts, strict=True)
                     if part.weight > 0 and not c["examples"]]
            if empty:
                raise UsageError(f"recovery source {empty[0]!r} has no example left within max_length={limit}; "
                                 "raise max_length or give it weight 0")
            self._dataset = TokenizedPairs(examples, sources)
        return self._dataset

    def stage_sampler(self) -> StageSampler:
        """A fresh sampler over the current dataset (its batches depend only on seed and epoch), set to the epoch
        about to start: Lightning sizes the epoch from `len(sampler)` before it calls `set_epoch`."""
        dataset = self.dataset
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return StageSampler(dataset.lengths, self.samples_per_epoch, self.batch_size, self.seed,
                            self.mega_batch_mult, sources=dataset.sources, weights=[p.weight for p in self.parts],
                            stage_samples=self.stage_samples, epoch=epoch)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank trains per stage: samples_per_epoch / (batch_size · world_size)."""
        return self.samples_per_epoch // (self.batch_size * rank_world()[1])

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset  # checks that a tokenizer is set
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        return DataLoader(dataset, batch_size=self.batch_size, sampler=self.stage_sampler(),
                          collate_fn=Collator(pad if pad is not None else 0), num_workers=self.num_workers)
