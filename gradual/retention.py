"""Retention: each score over its baseline, and the aggregates the stop rule can monitor."""

from __future__ import annotations

from typing import Any

AGGREGATES = ("generative_mean", "classification_mean", "min")


def retention(scores: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per-key retention (score / baseline score) plus the aggregates over keys with a non-zero baseline."""
    per_key = {k: v["score"] / baseline[k]["score"] for k, v in scores.items()
               if k in baseline and baseline[k]["score"] > 0}
    out = dict(per_key)
    for form in ("generative", "classification"):
        values = [r for k, r in per_key.items() if scores[k]["form"] == form]
        if values:
            out[f"{form}_mean"] = sum(values) / len(values)
    if per_key:
        out["min"] = min(per_key.values())
    return out
