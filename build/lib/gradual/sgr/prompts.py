"""The prompt pool of an SGR source: built-in tasks' training split (refused if it shares a question with the
evaluation split), a local JSONL/JSON/CSV file, or a Hugging Face dataset; duplicates dropped, order deterministic."""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from typing import Any

from gradual.errors import UsageError
from gradual.jsonl import read_jsonl
from gradual.sgr.config import PromptItem, SGRConfig

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".csv")


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

