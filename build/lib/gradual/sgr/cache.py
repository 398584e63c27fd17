"""The answer cache on disk: `<cache_dir>/<fingerprint>.jsonl`, one record per prompt, flushed per batch, so an
interrupted generation resumes where it stopped and later stages and runs reuse the answers."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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

