"""Reading JSON-lines files the user gives (prompts, pairs, calibration texts) with errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradual.errors import UsageError


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The objects of a JSONL file with their `path line N` places; blank lines are skipped, anything else refused."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {n} is not valid JSON ({e.msg}); expected one object per line") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {n} is not a JSON object; expected one object per line")
        rows.append((f"{path} line {n}", row))
    return rows
