"""Recovery data: a pool of prompts answered by a teacher model (Self-Generated Responses), cached on disk.

The seed paper heals a pruned model by finetuning it on what the *unpruned* model answers to ordinary prompts
(sequence-level self-distillation), discarding the dataset's own answers. This module builds those
(prompt, response) pairs:

- prompts come from the built-in tasks' training split (refused if it shares a question with the evaluation
  split), a local JSONL/JSON/CSV file, or a Hugging Face dataset;
- the teacher answers each prompt through its chat template (plain text plus a newline without one: the same
  prompt text the data module trains on, `generation.response_prompt`) with the paper's sampling defaults, batched
  (`gradual.generation.generate`) or through vLLM when asked;
- answers are cached as JSONL under `<cache_dir>/<fingerprint>.jsonl`, one record per prompt flushed as soon as
  its batch finishes, so an interrupted run resumes where it stopped and later stages reuse the original model's
  answers without generating again. The fingerprint covers everything that changes the answers: the teacher (its
  weights, or with vLLM the files it loads), the formatted prompts, what ends an answer (end and pad ids: chat models
  gain end-of-turn ids in `generation_config` without any weight change), chat template, system prompt, decoding,
  backend and its arguments;
- for comparisons the dataset's own answers ("dataset SFT") or only the teacher answers the task scorer accepts
  ("sgr_filtered") can be used instead;
- `sdft_pairs` (the `sdft` source of the recovery mixture, `gradual.mixture`) asks the same teacher, through the same
  generation and cache, to rewrite each task prompt's reference answer, and keeps a rewrite only if the task's scorer
  accepts it.

Pairs hold the raw user prompt, not the formatted one: the data module applies the chat template again at
training time, so training and generation see the same conversation.

Teacher choice (`SGRConfig.teacher`) is read by the pruning loop, not here: `build_pairs` answers with whatever
model it is given. "original" means the loop passes the unpruned model (the same cache file serves every stage);
"previous" means it passes the healed model of the previous stage *before* this stage removes a layer. With
`backend: vllm` the teacher is what vLLM loads from disk (`model_id`: a folder, or a hub id pinned to one commit); no
model needs to be in memory.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import logging
import os
import random
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.generation import DEFAULT_SYSTEM_PROMPT, DecodingConfig, encode_prompt, end_ids, generate, response_prompt
from gradual.jsonl import read_jsonl
from gradual.ranks import broadcast_from_rank0, rank_world
from gradual.tasks.builtin import check_difficulty

log = logging.getLogger(__name__)

SOURCES = ("tasks", "file", "hf")
RESPONSES = ("sgr", "dataset", "sgr_filtered")
BACKENDS = ("transformers", "vllm")
TEACHERS = ("original", "previous")
FILE_SUFFIXES = (".jsonl", ".json", ".csv")
CACHE_VERSION = 4  # 2: per-(prompt, sample) sampling generators; 3: end/pad ids, template, backend args in
# the key; 4: prompts encoded with the tokenizer's BOS (generation.encode_prompt)
NOT_MODEL_FILES = ("metrics.json", "gradual.json")  # gradual's bookkeeping next to a saved model; vLLM ignores them
T = TypeVar("T")


@dataclass
class PromptItem:
    """One user prompt; `reference` is the dataset's own answer when there is one, `task` names where it came from."""

    prompt: str
    reference: str | None = None
    task: str = ""


@dataclass
class SGRConfig:
    """Where the recovery prompts come from, how the teacher answers them, and which responses to train on.

    source: "tasks" (built-in tasks' training split at `difficulty`, "small" or "large" like the evaluation's
    `TaskEvaluation.difficulty`; `tasks` empty = every built-in task), "file" (`path` to a .jsonl/.json/.csv with
    `prompt_field`), or "hf" (`path` = dataset name, `hf_config`, `hf_split`).
    responses: "sgr" (teacher answers, the paper's recipe), "dataset" (the source's own answers: a task's
    reference answer, or `response_field` of a file/dataset), "sgr_filtered" (teacher answers the task's scorer
    accepts; tasks only). `eval_n`/`eval_seed` name the evaluation split the training prompts must not overlap.
    `max_prompts` caps a file/hf source (a seeded random subset). `cache_dir` None disables the cache.
    `chunk_size` prompts are generated (and, under DDP, gathered) at a time. backend "vllm" loads the teacher from
    disk (single process, no in-memory model needed); `vllm_args` go to `vllm.LLM` and are part of the cache key.
    """

    source: str = "tasks"
    tasks: list[str] = field(default_factory=list)
    difficulty: str = "small"
    n_per_task: int = 200
    seed: int = 0
    eval_n: int = 500
    eval_seed: int = 0
    path: str | None = None
    prompt_field: str = "prompt"
    response_field: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    max_prompts: int | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    chat: bool = True
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    responses: str = "sgr"
    teacher: str = "original"
    cache_dir: str | None = None
    batch_size: int = 16
    chunk_size: int = 1024
    backend: str = "transformers"
    vllm_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value, allowed in (("source", self.source, SOURCES), ("responses", self.responses, RESPONSES),
                                     ("backend", self.backend, BACKENDS), ("teacher", self.teacher, TEACHERS)):
            if value not in allowed:
                raise UsageError(f"sgr {name}={value!r} is unknown; allowed: {', '.join(allowed)}")
        for name in ("n_per_task", "eval_n", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"sgr {name}={getattr(self, name)} is invalid; it must be >= 1")
        check_difficulty(self.difficulty)
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UsageError(f"sgr max_prompts={self.max_prompts} is invalid; it must be >= 1 or null")
        if self.source in ("file", "hf") and not self.path:
            raise UsageError(f"sgr source={self.source!r} needs `path` (a file path or a dataset name)")
        if self.responses == "sgr_filtered" and self.source != "tasks":
            raise UsageError("sgr responses='sgr_filtered' needs source='tasks' (only built-in tasks have a scorer)")
        if self.responses == "dataset" and self.source != "tasks" and not self.response_field:
            raise UsageError(f"sgr responses='dataset' with source={self.source!r} needs `response_field`")
        if isinstance(self.decoding, dict):
            self.decoding = DecodingConfig(**self.decoding)


# ---------------------------------------------------------------------------------------------------------------
# Prompt sources
# ---------------------------------------------------------------------------------------------------------------

def load_prompts(cfg: SGRConfig) -> list[PromptItem]:
    """The prompt pool of `cfg.source`, duplicates removed (first occurrence kept), in a deterministic order.

    A file/hf source larger than `max_prompts` is cut to a seeded random subset in file order."""
    if cfg.source == "tasks":
        return _unique(_task_prompts(cfg))
    rows = _file_rows(Path(cfg.path)) if cfg.source == "file" else hf_rows(cfg.path, cfg.hf_config, cfg.hf_split)
    items = _unique(_rows_to_items(rows, cfg, origin=cfg.source))
    if cfg.max_prompts is not None and cfg.max_prompts < len(items):
        keep = sorted(random.Random(cfg.seed).sample(range(len(items)), cfg.max_prompts))
        items = [items[i] for i in keep]
    return items


def _unique(items: list[PromptItem]) -> list[PromptItem]:
    """Repeated prompts only re-weight the data (and waste generation under greedy decoding)."""
    seen: set[str] = set()
    unique = []
    for it in items:
        if it.prompt not in seen:
            seen.add(it.prompt)
            unique.append(it)
    if len(unique) < len(items):
        log.info("sgr: %d duplicate prompts dropped, %d remain", len(items) - len(unique), len(unique))
    return unique


def _task_prompts(cfg: SGRConfig) -> list[PromptItem]:
    """Training-split prompts of each task, after checking they share no question with the evaluation split."""
    from gradual.tasks.builtin import get_task, task_names
    from gradual.tasks.documents import training_problems

    items: list[PromptItem] = []
    for name in task_names(cfg.tasks or None):
        task = get_task(name, cfg.difficulty)
        train = training_problems(task, cfg.n_per_task, cfg.seed, cfg.eval_n, cfg.eval_seed)
        items += [PromptItem(task.chat_message(p), p.answer, name) for p in train]
    return items


def _file_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl (one object a line), .json (a list of objects) or .csv (header row) file."""
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UsageError(f"prompt file {str(path)!r} has an unsupported type; allowed: {', '.join(FILE_SUFFIXES)}")
    if not path.is_file():
        raise UsageError(f"prompt file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"prompt file {str(path)!r} is not valid JSON: {e}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UsageError(f"prompt file {str(path)!r} must hold a JSON list of objects")
        return data
    return [row for _, row in read_jsonl(path)]


def hf_rows(path: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset split; any loading failure (offline, unknown name or split) is a UsageError."""
    try:
        import datasets

        dataset = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # offline, network and name errors come in many types; report each as one line
        reason = " ".join(str(e).split())[:300]
        raise UsageError(f"could not load Hugging Face dataset {path!r} (config {config!r}, split "
                         f"{split!r}): {type(e).__name__}: {reason}") from None
    return list(dataset)


def _rows_to_items(rows: list[dict[str, Any]], cfg: SGRConfig, origin: str) -> list[PromptItem]:
    where = f"{origin} {cfg.path!r}"
    if not rows:
        raise UsageError(f"{where} has no rows")
    wanted = [cfg.prompt_field] + ([cfg.response_field] if cfg.responses == "dataset" else [])
    for f in wanted:
        if f not in rows[0]:
            raise UsageError(f"{where} has no field {f!r}; its fields are: {', '.join(map(str, rows[0]))}")
    items, empty = [], 0
    for n, row in enumerate(rows, 1):
        prompt = _text(row, cfg.prompt_field, where, n)
        if not prompt.strip():
            empty += 1
            continue
        reference = _text(row, cfg.response_field, where, n) if cfg.response_field else None
        if cfg.responses == "dataset" and not (reference or "").strip():
            empty += 1
            continue
        items.append(PromptItem(prompt, reference, origin))
    if not items:
        raise UsageError(f"{where} has no non-empty prompts in field {cfg.prompt_field!r}")
    if empty:
        log.warning("sgr: %d rows of %s skipped (empty prompt or answer)", empty, where)
    return items


def _text(row: dict[str, Any], name: str, where: str, n: int) -> str:
    if name not in row:
        raise UsageError(f"{where} row {n} has no field {name!r}")
    value = row[name]
    if value is None:
        return ""
    if not isinstance(value, str | int | float):
        raise UsageError(f"{where} row {n} field {name!r} is a {type(value).__name__}, not text")
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint: what the teacher's answers depend on
# ---------------------------------------------------------------------------------------------------------------

_DIGEST_CHUNK = 1 << 22


@torch.no_grad()
def weights_digest(model: torch.nn.Module) -> str:
    """A cheap but real digest of every parameter: its name, shape, dtype, float64 sum and position-weighted sum.

    Why not hash the bytes: that needs every weight copied to the CPU (minutes for a 7B model on a GPU). Two
    reductions per tensor run at memory bandwidth on the weights' own device, change whenever any weight changes
    (the position weights also catch entries swapped within a tensor), and names/shapes catch removed layers and
    attached adapters. The same weights on another device or after a dtype round trip may sum differently in the
    last bits; that only costs a cache miss, never a stale hit.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}\n".encode())
        if p.is_meta:
            continue
        flat = p.detach().reshape(-1)
        if flat.device.type == "mps":  # no float64 on MPS
            flat = flat.cpu()
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        weighted = torch.zeros_like(total)
        for lo in range(0, flat.numel(), _DIGEST_CHUNK):
            x = flat[lo:lo + _DIGEST_CHUNK].to(torch.float64)
            pos = torch.arange(lo, lo + x.numel(), device=x.device, dtype=torch.int64)
            w = ((pos * 2654435761) % 65521).to(torch.float64) / 65521 + 0.5
            total += x.sum()
            weighted += (x * w).sum()
        h.update(struct.pack("<dd", float(total), float(weighted)))
    return h.hexdigest()


def model_identity(model: PreTrainedModel, model_id: str | None = None,
                   tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Hash of the model's name/path, its config (layer count, kept original layers, ...), the weights digest and
    the tokenizer's name and size."""
    config = model.config.to_json_string(use_diff=True) if hasattr(model, "config") else ""
    parts = {"model_id": model_id or getattr(getattr(model, "config", None), "name_or_path", ""),
             "config": config, "weights": weights_digest(model),
             "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer)] if tokenizer is not None else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def decoding_key(decoding: DecodingConfig) -> dict[str, Any]:
    """The decoding settings that change the answers (greedy ignores temperature, top_p and seed)."""
    key = asdict(decoding)
    if not decoding.do_sample:
        for k in ("temperature", "top_p", "seed"):
            key.pop(k)
    return key


def generation_key(tokenizer: PreTrainedTokenizerBase, stop_ids: set[int], cfg: SGRConfig) -> dict[str, Any]:
    """Everything besides the teacher and the prompt texts that changes its answers.

    What ends an answer: `stop_ids` (the generation config's EOS ids and the tokenizer's EOS and pad, see
    `generation.end_ids`), the pad id; how a prompt is formatted: chat switch, chat template, system prompt (the
    formatted inputs show them too, but a template or prompt could change without changing them); decoding; backend
    and, for vLLM, its engine arguments. Batch and chunk sizes are left out: the batch size changes no draw (one
    generator per prompt), the chunk size only picks other draws (each chunk has its own seed)."""
    return {"end_ids": sorted(stop_ids), "pad_id": tokenizer.pad_token_id, "eos_id": tokenizer.eos_token_id,
            "chat": cfg.chat, "chat_template": getattr(tokenizer, "chat_template", None),
            "system_prompt": cfg.system_prompt, "decoding": decoding_key(cfg.decoding), "backend": cfg.backend,
            "vllm_args": cfg.vllm_args if cfg.backend == "vllm" else None}


def fingerprint(identity: str, inputs: Sequence[str], settings: dict[str, Any]) -> str:
    """Cache key: teacher identity, the exact model inputs (formatted prompts) and `generation_key` settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "identity": identity, "settings": settings, "n": len(inputs)},
                        sort_keys=True, default=repr).encode())
    for text in inputs:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:32]


@dataclass
class DiskTeacher:
    """A teacher that vLLM loads from disk: `source` (a folder, or a hub id at commit `revision`), its `identity`
    (hash of the files or of the commit) and its generation config (what ends its answers), read from the same files.
    It carries `generation_config` as a model does, so `generation.end_ids` reads the end ids of both the same way.
    """

    source: str
    revision: str | None
    identity: str
    generation_config: GenerationConfig | None


def _file_digest(path: Path) -> str:
    """sha256 of a file; for a file in the Hugging Face cache (a link into `blobs/`), the blob's name, which is
    already its content hash."""
    real = path.resolve()
    if path.is_symlink() and real.parent.name == "blobs":
        return real.name
    h = hashlib.sha256()
    with real.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(folder: Path) -> dict[str, str]:
    """Content hash of every file a model folder holds (weights, config, generation config, tokenizer), by name;
    gradual's own bookkeeping files (`NOT_MODEL_FILES`) are left out."""
    t = time.perf_counter()
    files = {p.name: _file_digest(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.name not in NOT_MODEL_FILES}
    log.info("sgr: hashed the %d files of teacher %s in %.1f s", len(files), folder, time.perf_counter() - t)
    return files


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub model's current commit (its name is the commit hash), fetching only its
    JSON files (config, generation config, tokenizer); offline, the cached snapshot."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json"]))
    except Exception as e:  # offline, network and name errors come in many types; report each as one line
        reason = " ".join(str(e).split())[:300]
        raise UsageError(f"sgr backend='vllm': cannot resolve model {repo_id!r} to a hub commit: "
                         f"{type(e).__name__}: {reason}") from None


def disk_teacher(model_id: str | None) -> DiskTeacher:
    """Where vLLM loads the teacher from and what identifies it, without loading any weights.

    A folder is identified by the content of its files; a hub id is pinned to the commit it resolves to now, and
    vLLM is told to load exactly that commit, so the cache key always describes the weights that answer."""
    from gradual.models import TINY_PREFIX, resolve_model

    if not model_id or model_id.startswith(TINY_PREFIX):
        raise UsageError(f"sgr backend='vllm' needs the teacher saved on disk or a hub id; got {model_id!r}")
    source = resolve_model(model_id)
    if os.path.isdir(source):
        folder, revision, files = Path(source), None, folder_digest(Path(source))
    else:
        folder = _hub_snapshot(source)
        revision, files = folder.name, None
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: only the tokenizer's EOS ends an answer
        generation_config = None
    identity = hashlib.sha256(json.dumps({"source": source, "revision": revision, "files": files},
                                         sort_keys=True).encode()).hexdigest()
    return DiskTeacher(source, revision, identity, generation_config)


def cache_key(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase, inputs: Sequence[str],
              cfg: SGRConfig, model_id: str | None = None) -> tuple[str, set[int], DiskTeacher | None]:
    """(fingerprint, the ids that end an answer, the on-disk teacher for vLLM or None) of answering `inputs`.

    transformers: the in-memory `model` answers; it is identified by its weights (`model_identity`) and its
    `generation_config` says what ends an answer. vLLM: `model_id` on disk answers (`disk_teacher`); `model` is not
    used."""
    if cfg.backend == "vllm":
        teacher = disk_teacher(model_id or getattr(getattr(model, "config", None), "name_or_path", None))
        identity, holder = teacher.identity, teacher
    else:
        if model is None:
            raise UsageError("sgr backend='transformers' needs the teacher model in memory")
        teacher, identity, holder = None, model_identity(model, model_id, tokenizer), model
    stop_ids = end_ids(holder, tokenizer)
    return fingerprint(identity, inputs, generation_key(tokenizer, stop_ids, cfg)), stop_ids, teacher


# ---------------------------------------------------------------------------------------------------------------
# On-disk cache
# ---------------------------------------------------------------------------------------------------------------

class ResponseCache:
    """`<cache_dir>/<fingerprint>.jsonl`: a meta line `{"meta": {...}}`, then `{"i", "prompt", "responses"}` records.

    Records are appended and flushed per batch. On load a last line without its newline (the process died while
    writing it) is cut off, malformed or foreign records are ignored, and a file whose meta line does not match
    is started afresh, so the prompts they covered are simply generated again.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta

    def load(self, prompts: Sequence[str]) -> dict[int, list[str]]:
        """Cached responses by prompt index; (re)creates the file with its meta line when needed."""
        raw = self.path.read_bytes() if self.path.is_file() else b""
        end = raw.rfind(b"\n") + 1
        lines = raw[:end].splitlines()
        if not lines or _json_or_none(lines[0], "meta").get("fingerprint") != self.meta["fingerprint"]:
            self._start()
            return {}
        if end < len(raw):
            log.warning("sgr cache %s: truncated last line ignored", self.path)
            os.truncate(self.path, end)
        done: dict[int, list[str]] = {}
        for line in lines[1:]:
            rec = _json_or_none(line)
            i, responses = rec.get("i"), rec.get("responses")
            if (isinstance(i, int) and 0 <= i < len(prompts) and rec.get("prompt") == prompts[i]
                    and isinstance(responses, list) and all(isinstance(r, str) for r in responses)):
                done[i] = responses
        return done

    def append(self, records: Sequence[tuple[int, str, list[str]]]) -> None:
        """Write (index, raw prompt, responses) records and push them to disk before returning."""
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for i, prompt, responses in records:
                f.write(json.dumps({"i": i, "prompt": prompt, "responses": responses}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", encoding="utf-8") as f:
            f.write(json.dumps({"meta": self.meta}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _json_or_none(line: bytes, key: str | None = None) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(obj, dict):
        return {}
    if key is None:
        return obj
    return obj.get(key) if isinstance(obj.get(key), dict) else {}


# ---------------------------------------------------------------------------------------------------------------
# DDP: shard prompts across ranks, gather answers back in order
# ---------------------------------------------------------------------------------------------------------------

def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's share: items rank, rank + world, ... (balanced to within one item)."""
    return list(items[rank::world])


def merge_shards(shards: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of `shard` over all ranks: the full list in its original order."""
    world, n = len(shards), sum(len(s) for s in shards)
    out: list[Any] = [None] * n
    for rank, part in enumerate(shards):
        if len(part) != len(range(rank, n, world)):
            raise ValueError(f"shard {rank} has {len(part)} items; a strided split of {n} over {world} ranks "
                             f"gives it {len(range(rank, n, world))}")
        out[rank::world] = part
    return out


def gather_in_order(local: Sequence[T]) -> list[T]:
    """All ranks' shards (from `shard`) merged in the original order, on every rank; `local` as-is without DDP."""
    _, world = rank_world()
    if world == 1:
        return list(local)
    shards: list[Any] = [None] * world
    torch.distributed.all_gather_object(shards, list(local))
    return merge_shards(shards)


# ---------------------------------------------------------------------------------------------------------------
# Teacher generation
# ---------------------------------------------------------------------------------------------------------------

OnBatch = Callable[[list[int], list[list[str]]], None]


class _TransformersBackend:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                 progress: bool) -> None:
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress

    def __call__(self, inputs: list[str], decoding: DecodingConfig, on_batch: OnBatch | None) -> list[list[str]]:
        return generate(self.model, self.tokenizer, inputs, decoding, batch_size=self.batch_size,
                        progress=self.progress, desc="sgr", on_batch=on_batch)


def vllm_sampling_kwargs(decoding: DecodingConfig, stop_ids: set[int] | None = None) -> dict[str, Any]:
    """`vllm.SamplingParams` arguments equivalent to a DecodingConfig (greedy = temperature 0; top-k left at
    vLLM's "off" default). The seed goes to the engine: a per-request seed would give every prompt the same draws.
    `stop_ids` (the ids that end an answer, as in the cache key) are passed explicitly, so vLLM stops where the
    transformers backend does, whatever its own reading of the generation config."""
    kwargs: dict[str, Any] = dict(n=decoding.num_samples, max_tokens=decoding.max_new_tokens,
                                  stop=list(decoding.stop) or None)
    if stop_ids:
        kwargs["stop_token_ids"] = sorted(stop_ids)
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p)
    else:
        kwargs.update(temperature=0.0, top_p=1.0)
    return kwargs


def vllm_engine_kwargs(teacher: DiskTeacher, vllm_args: dict[str, Any], seed: int) -> dict[str, Any]:
    """`vllm.LLM` arguments: the user's `vllm_args`, then the teacher's source and commit, which the cache key was
    computed from and which `vllm_args` therefore cannot override."""
    return {"seed": seed, **vllm_args, "model": teacher.source, "revision": teacher.revision,
            "tokenizer": teacher.source, "tokenizer_revision": teacher.revision}


class _VLLMBackend:
    """vLLM engine for the teacher, built once per `teacher_responses` call from the teacher on disk.

    vLLM loads the weights from `teacher.source` (at `teacher.revision`), the same files the cache key hashed; a
    pruned or healed teacher must be saved first and its folder passed as `model_id`.
    """

    def __init__(self, teacher: DiskTeacher, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int],
                 vllm_args: dict[str, Any], seed: int) -> None:
        try:
            import vllm
        except ImportError:
            raise UsageError("sgr backend='vllm' needs the vllm package (pip install vllm, GPU only); "
                             "use backend='transformers'") from None
        self.vllm, self.tokenizer, self.stop_ids = vllm, tokenizer, stop_ids
        self.llm = vllm.LLM(**vllm_engine_kwargs(teacher, vllm_args, seed))

    def __call__(self, inputs: list[str], decoding: DecodingConfig, on_batch: OnBatch | None) -> list[list[str]]:
        prompts = [{"prompt_token_ids": encode_prompt(self.tokenizer, p)} for p in inputs]
        params = self.vllm.SamplingParams(**vllm_sampling_kwargs(decoding, self.stop_ids))
        outputs = self.llm.generate(prompts, params)
        return [[o.text for o in out.outputs] for out in outputs]

    def close(self) -> None:
        """Drop the engine so its GPU memory can go to training."""
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _chunk_seed(seed: int, chunk: int, rank: int) -> int:
    """A distinct sampling seed per (chunk, rank): otherwise every chunk and rank would replay the same draws."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{chunk}:{rank}".encode()).digest()[:4], "little")


def teacher_responses(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
                      items: Sequence[PromptItem], cfg: SGRConfig, model_id: str | None = None,
                      progress: bool = True) -> list[list[str]]:
    """The teacher's `cfg.decoding.num_samples` answers to every prompt, in order, from the cache where present.

    transformers backend: `model` answers. vLLM backend: `model_id` on disk answers and `model` may be None (see
    `cache_key`). Under DDP each chunk's missing prompts are split rank::world and gathered, so every rank returns
    the full list; only rank 0 reads and writes the cache (and broadcasts what it read).
    """
    rank, world = rank_world()
    if cfg.backend == "vllm" and world > 1:
        raise UsageError("sgr backend='vllm' does not run under torch.distributed; use backend='transformers'")
    prompts = [it.prompt for it in items]
    inputs = [response_prompt(tokenizer, p, cfg.system_prompt, cfg.chat) for p in prompts]
    model_id = model_id or getattr(getattr(model, "config", None), "name_or_path", "") or None
    fp, stop_ids, teacher = cache_key(model, tokenizer, inputs, cfg, model_id)
    cache = None
    if cfg.cache_dir and rank == 0:
        meta = {"fingerprint": fp, "version": CACHE_VERSION, "model_id": model_id, "num_prompts": len(items),
                "decoding": asdict(cfg.decoding), "backend": cfg.backend, "vllm_args": cfg.vllm_args,
                "end_ids": sorted(stop_ids), "chat": cfg.chat, "system_prompt": cfg.system_prompt,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        cache = ResponseCache(Path(cfg.cache_dir) / f"{fp}.jsonl", meta)
    done = broadcast_from_rank0(cache.load(prompts) if cache else {})
    todo = [i for i in range(len(items)) if i not in done]
    if cache:
        log.info("sgr cache %s: %d of %d prompts cached, %d to generate", cache.path, len(done), len(items), len(todo))
    if not todo:
        return [done[i] for i in range(len(items))]
    backend = (_VLLMBackend(teacher, tokenizer, stop_ids, cfg.vllm_args, cfg.decoding.seed) if teacher is not None
               else _TransformersBackend(model, tokenizer, cfg.batch_size, progress and rank == 0))
    bar = tqdm(total=len(items), initial=len(done), desc="sgr prompts", unit="prompt",
               disable=not progress or rank != 0)
    try:
        for c, lo in enumerate(range(0, len(todo), cfg.chunk_size)):
            mine = shard(todo[lo:lo + cfg.chunk_size], rank, world)
            decoding = replace(cfg.decoding, seed=_chunk_seed(cfg.decoding.seed, c, rank))

            def write(idx: list[int], outs: list[list[str]], mine: list[int] = mine) -> None:
                """Single process: persist each batch as soon as it is generated."""
                if cache:
                    cache.append([(mine[j], prompts[mine[j]], o) for j, o in zip(idx, outs, strict=True)])
                bar.update(len(idx))

            per_batch = world == 1 and cfg.backend == "transformers"
            outs = backend([inputs[i] for i in mine], decoding, write if per_batch else None)
            gathered = gather_in_order(list(zip(mine, outs, strict=True)))
            if not per_batch:
                if cache:
                    cache.append([(i, prompts[i], o) for i, o in gathered])
                bar.update(len(gathered))
            done.update(gathered)
    finally:
        bar.close()
        if isinstance(backend, _VLLMBackend):
            backend.close()
    return [done[i] for i in range(len(items))]


# ---------------------------------------------------------------------------------------------------------------
# Pairs for training
# ---------------------------------------------------------------------------------------------------------------

def accepts(item: PromptItem, response: str) -> bool:
    """Whether the built-in task's scorer counts `response` as a correct answer to `item`."""
    from gradual.tasks.builtin import get_task
    from gradual.tasks.extract import extract_answer, normalize_reference

    task = get_task(item.task)
    if item.reference is None:
        raise UsageError(f"prompt of task {item.task!r} has no reference answer to check a response against")
    return extract_answer(task.kind, response, task.labels) == normalize_reference(task.kind, item.reference)


def build_pairs(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None, cfg: SGRConfig,
                model_id: str | None = None, items: Sequence[PromptItem] | None = None,
                progress: bool = True) -> list[dict[str, str]]:
    """Training pairs `{"prompt": raw user text, "response": answer, "task": origin}` as `cfg.responses` says.

    "sgr": every non-empty teacher answer (one pair per sample); "sgr_filtered": only those `accepts` passes;
    "dataset": the source's own answers (no model needed). Empty answers teach nothing and are dropped.
    """
    items = load_prompts(cfg) if items is None else list(items)
    if not items:
        raise UsageError("sgr has no prompts to build recovery pairs from")
    if cfg.responses == "dataset":
        missing = [it for it in items if not (it.reference or "").strip()]
        if missing:
            raise UsageError(f"sgr responses='dataset' but {len(missing)} prompts have no reference answer")
        return [{"prompt": it.prompt, "response": it.reference, "task": it.task} for it in items]
    if tokenizer is None or (model is None and cfg.backend != "vllm"):
        raise UsageError(f"sgr responses={cfg.responses!r} needs a teacher model and tokenizer")
    answers = teacher_responses(model, tokenizer, items, cfg, model_id=model_id, progress=progress)
    pairs, empty, rejected = [], 0, 0
    for it, responses in zip(items, answers, strict=True):
        for r in responses:
            if not r.strip():
                empty += 1
            elif cfg.responses == "sgr_filtered" and not accepts(it, r):
                rejected += 1
            else:
                pairs.append({"prompt": it.prompt, "response": r, "task": it.task})
    total = sum(len(a) for a in answers)
    log.info("sgr: %d pairs from %d answers (%d empty, %d rejected by the scorer)", len(pairs), total, empty, rejected)
    if not pairs:
        raise UsageError(f"sgr responses={cfg.responses!r} kept none of {total} teacher answers "
                         f"({empty} empty, {rejected} rejected); use responses='sgr' or a stronger teacher")
    return pairs


SDFT_TEMPLATE = ("{prompt}\n\nReference answer: {reference}\n\n"
                 "Rewrite the reference answer in your own words as your reply to the request above.")
"""What the SDFT teacher is asked (a user message, chat-formatted like any SGR prompt): the task prompt, its reference
answer, and a request to rewrite it."""


def sdft_pairs(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None, cfg: SGRConfig,
               items: Sequence[PromptItem], model_id: str | None = None,
               progress: bool = True) -> tuple[list[dict[str, str]], int]:
    """Self-distillation fine-tuning pairs (SDFT, arXiv 2402.13669): one per task prompt, the teacher's rewrite of the
    reference answer when the task's scorer `accepts` it, otherwise the reference answer itself.

    Why: the student learns correct answers written in the teacher's own words (its own distribution), which heals a
    pruned model with less forgetting than the dataset's answers (arXiv 2410.09982). The teacher sees `SDFT_TEMPLATE`
    and answers through `teacher_responses` (same decoding, backend and cache as SGR; the template makes the inputs,
    hence the cache file, its own); the pair keeps the plain prompt. With several samples per prompt
    (`decoding.num_samples`) the first accepted one is used. Returns the pairs in item order and how many of them are
    teacher rewrites (the rest are references).
    """
    if tokenizer is None or (model is None and cfg.backend != "vllm"):
        raise UsageError("sdft needs a teacher model and tokenizer")
    if not items or any(it.reference is None for it in items):
        raise UsageError("sdft needs task prompts with reference answers")
    asks = [replace(it, prompt=SDFT_TEMPLATE.format(prompt=it.prompt, reference=it.reference)) for it in items]
    answers = teacher_responses(model, tokenizer, asks, cfg, model_id=model_id, progress=progress)
    pairs, kept = [], 0
    for it, responses in zip(items, answers, strict=True):
        rewrite = next((r for r in responses if r.strip() and accepts(it, r)), None)
        kept += rewrite is not None
        pairs.append({"prompt": it.prompt, "response": it.reference if rewrite is None else rewrite, "task": it.task})
    log.info("sdft: %d of %d teacher rewrites accepted by the task scorer; the reference answer kept for the rest",
             kept, len(items))
    return pairs, kept
