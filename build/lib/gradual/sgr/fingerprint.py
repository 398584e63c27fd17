"""The answer cache's key: everything the teacher's answers depend on — the teacher (its weights in memory, or with
vLLM the files it loads from disk), the formatted prompts, what ends an answer, chat template, system prompt,
decoding, backend and its arguments."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.generation import DecodingConfig, end_ids
from gradual.sgr.config import SGRConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # 2: per-(prompt, sample) sampling generators; 3: end/pad ids, template, backend args in
# the key; 4: prompts encoded with the tokenizer's BOS (generation.encode_prompt)
NOT_MODEL_FILES = ("metrics.json", "gradual.json")  # gradual's bookkeeping next to a saved model; vLLM ignores them
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
    from gradual.models import resolve_model
    from gradual.tiny import TINY_PREFIX

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

