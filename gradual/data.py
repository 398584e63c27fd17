"""Recovery data: (prompt, response) pairs → chat-formatted examples whose loss covers the response only.

`RecoveryDataModule` serves them so that one Lightning epoch is one pruning stage of exactly
`samples_per_epoch` examples, whatever the dataset size: `StageSampler` walks an endless stream of seeded
shuffled passes over the data, each epoch continuing where the previous one stopped, and groups similar
lengths into batches to waste little padding. The sampler splits the data across DDP ranks itself, so the
Trainer must be built with `use_distributed_sampler=False` (otherwise Lightning wraps it in a
`DistributedSampler` and every rank would see a different, shorter epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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


class TokenizedPairs(Dataset):
    """Tokenised examples in memory, with their lengths for length grouping."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples
        self.lengths = [len(e["input_ids"]) for e in examples]

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


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StageSampler(Sampler[int]):
    """This rank's example indices for one epoch (= one pruning stage) of exactly `samples_per_epoch` examples.

    The global order is an endless stream of passes over the data, pass p a permutation seeded by (seed, p);
    epoch e takes stream positions [e·S, (e+1)·S), so consecutive stages continue where the last one stopped
    and a resumed run that calls `set_epoch(e)` sees exactly the same data. Within the epoch, mega-batches of
    `mega_batch_mult · batch_size · world_size` examples are sorted by length and cut into batches; each
    group of `world_size` neighbouring batches is one step (rank r takes the r-th), and the order of steps is
    shuffled by (seed, e). Yields flat indices: a DataLoader with the same `batch_size` re-forms the batches.
    """

    def __init__(self, lengths: Sequence[int], samples_per_epoch: int, batch_size: int, seed: int = 0,
                 mega_batch_mult: int = 50, rank: int | None = None, world_size: int | None = None) -> None:
        if not lengths:
            raise UsageError("no recovery examples to sample from; give at least one (prompt, response) pair")
        dist_rank, dist_world = _dist_rank_world()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        per_step = batch_size * self.world_size
        if samples_per_epoch < per_step or samples_per_epoch % per_step:
            raise UsageError(f"samples_per_epoch={samples_per_epoch} is invalid; it must be a positive multiple of "
                             f"batch_size × world_size = {batch_size} × {self.world_size}")
        if mega_batch_mult < 1:
            raise UsageError(f"mega_batch_mult={mega_batch_mult} is invalid; it must be >= 1")
        self.lengths = np.asarray(lengths)
        self.samples_per_epoch, self.batch_size, self.seed = samples_per_epoch, batch_size, seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning's fit loop before every epoch (also after resuming from a checkpoint)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch // self.world_size

    def _pass(self, p: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0, p]).permutation(len(self.lengths))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's global stream slice, before length grouping and rank split."""
        n, start = len(self.lengths), epoch * self.samples_per_epoch
        first, last = start // n, (start + self.samples_per_epoch - 1) // n
        stream = np.concatenate([self._pass(p) for p in range(first, last + 1)])
        return stream[start - first * n: start - first * n + self.samples_per_epoch]

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
    """Recovery (SFT) batches for the prune–heal loop: one epoch = one stage of `samples_per_epoch` examples.

    Pairs and tokenizer may be given later with `set_pairs` / `set_tokenizer` (SGR pairs are generated by the
    module at fit start); tokenisation happens on the first `train_dataloader` call after a change. The Trainer
    must use `use_distributed_sampler=False`: the sampler already splits each stage across DDP ranks, giving
    every rank `samples_per_epoch / world_size` examples (`batches_per_epoch` batches).

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
        self.system_prompt, self.chat, self.seed = system_prompt, chat, seed
        self.mega_batch_mult, self.num_workers = mega_batch_mult, num_workers
        self.tokenizer, self.max_positions = tokenizer, max_positions
        self.pairs: list[dict[str, str]] = load_pairs(pairs) if pairs is not None else []
        self.num_dropped = self.num_clamped = 0
        self._dataset: TokenizedPairs | None = None

    def set_pairs(self, pairs: list[dict] | str | Path) -> None:
        """Replace the (prompt, response) pairs; they are tokenised on the next `train_dataloader` call."""
        self.pairs = load_pairs(pairs)
        self._dataset = None

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._dataset = None

    @property
    def dataset(self) -> TokenizedPairs:
        """The tokenised pairs; examples whose prompt alone fills `max_length` are dropped (`num_dropped`)."""
        if self._dataset is None:
            if self.tokenizer is None:
                raise ValueError("RecoveryDataModule has no tokenizer; call set_tokenizer first")
            if not self.pairs:
                raise UsageError("no recovery pairs; give a JSONL file or a list of {prompt, response} dicts")
            limit = min(self.max_length, self.max_positions or self.max_length)
            examples, self.num_clamped = [], 0
            for pair in tqdm(self.pairs, desc="tokenize recovery pairs", unit="pair", leave=False,
                             disable=len(self.pairs) < 1000):
                example = tokenize_pair(self.tokenizer, pair["prompt"], pair["response"], self.system_prompt,
                                        self.max_length, self.chat)
                if example is not None and len(example["input_ids"]) > limit:
                    self.num_clamped += 1
                    example = tokenize_pair(self.tokenizer, pair["prompt"], pair["response"], self.system_prompt,
                                            limit, self.chat)
                if example is not None:
                    examples.append(example)
            self.num_dropped = len(self.pairs) - len(examples)
            if self.num_clamped:
                log.warning("max_length=%d is above the model's %d positions: %d of %d recovery examples were cut "
                            "at %d tokens", self.max_length, limit, self.num_clamped, len(self.pairs), limit)
            if self.num_dropped:
                log.warning("dropped %d of %d recovery pairs whose prompt alone fills max_length=%d",
                            self.num_dropped, len(self.pairs), limit)
            if not examples:
                raise UsageError(f"max_length={limit} is too small: every prompt fills it; raise it")
            self._dataset = TokenizedPairs(examples)
        return self._dataset

    def stage_sampler(self) -> StageSampler:
        """A fresh sampler over the current dataset (its batches depend only on seed and epoch)."""
        return StageSampler(self.dataset.lengths, self.samples_per_epoch, self.batch_size, self.seed,
                            self.mega_batch_mult)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank trains per stage: samples_per_epoch / (batch_size · world_size)."""
        return self.samples_per_epoch // (self.batch_size * _dist_rank_world()[1])

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset  # checks that a tokenizer is set
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        return DataLoader(dataset, batch_size=self.batch_size, sampler=self.stage_sampler(),
                          collate_fn=Collator(pad if pad is not None else 0), num_workers=self.num_workers)
