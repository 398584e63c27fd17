"""An arm's training seeds pooled at one depth (`compare.seeds`): its scores are the means over the seeds, its
retention is that of the pooled scores, and its intervals resample seeds and problems (`gradual.intervals`'
pigeonhole bootstrap), so they include the seed-to-seed spread. With one seed the figures are the run's own, as its
`gradual fit` recorded them.

A pooled score keeps no `items`: per-problem scores averaged over seeds would give intervals that leave the seeds'
spread out; `seed_items` reads them seed by seed from a point's `per_seed`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from gradual.retention import pooled_intervals, retention

PER_SEED_KEYS = ("seed", "run", "stage", "reused", "layers", "steps", "final_steps", "examples", "data", "scores",
                 "retention", "intervals")
"""What a pooled point keeps of each seed's point, under `per_seed`."""


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def pool_scores(seed_scores: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per key that every seed scored: the mean score over seeds, and the mean count of each failure category and
    of truncated answers (per seed, so an arm run under fewer seeds reads on the same scale); form and problems (`n`)
    as every seed's."""
    first = seed_scores[0]
    pooled: dict[str, dict[str, Any]] = {}
    for key, entry in first.items():
        entries = [s[key] for s in seed_scores if key in s]
        if len(entries) != len(seed_scores):
            continue
        out = {k: v for k, v in entry.items() if k not in ("items", "score", "failures", "truncated")}
        out["score"] = _mean([e["score"] for e in entries])
        if "failures" in entry:
            out["failures"] = {c: _mean([e.get("failures", {}).get(c, 0) for e in entries]) for c in entry["failures"]}
        if "truncated" in entry:
            out["truncated"] = _mean([e.get("truncated", 0) for e in entries])
        pooled[key] = out
    return pooled


def pooled_figures(records: Sequence[dict[str, Any]], baseline: dict[str, dict[str, Any]],
                   in_data: Collection[str]) -> dict[str, Any]:
    """`{scores, retention, intervals}` of one arm at one depth from its seeds' stage records (one per seed, in seed
    order): one record's own values, or the pooled scores, their retention and the seed-and-problem intervals. A
    record with retention but no intervals (written before `RecordRetention` kept them) gets those its `gradual fit`
    computes, from its per-problem scores; stage 0 (the shared baseline) records neither."""
    record = records[0]
    if len(records) == 1 or not record.get("retention"):  # one seed, or stage 0: the shared baseline, not compared
        missing = record.get("retention") and not record.get("intervals")
        return {"scores": record["scores"], "retention": record["retention"],
                "intervals": pooled_intervals([record["scores"]], baseline, in_data) if missing
                else record.get("intervals") or {}}
    scores = pool_scores([r["scores"] for r in records])
    return {"scores": scores, "retention": retention(scores, baseline, in_data),
            "intervals": pooled_intervals([r["scores"] for r in records], baseline, in_data)}


def pool_point(seed_points: Sequence[dict[str, Any]], baseline: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One point of an arm at one depth over its seeds' points (each with its `seed` and its record's `intervals`):
    `seeds` lists them; with several, scores, retention and intervals are pooled, the other fields (run, stage,
    layers, examples, data, ...) stay the first seed's, and `per_seed` keeps every seed's own."""
    first = seed_points[0]
    point = {k: v for k, v in first.items() if k != "seed"}
    point["seeds"] = [p["seed"] for p in seed_points]
    point.update(pooled_figures(seed_points, baseline, first["in_data"]))
    if len(seed_points) > 1:
        point["per_seed"] = [{**{k: p[k] for k in PER_SEED_KEYS if k in p},
                              "intervals": pooled_figures([p], baseline, p["in_data"])["intervals"]}
                             for p in seed_points]
    return point


def seed_items(point: dict[str, Any], key: str) -> list[list[float]] | None:
    """The per-problem scores of `key`, one list per seed of the point (None unless every seed kept them)."""
    entries = [s["scores"].get(key) or {} for s in point.get("per_seed") or [point]]
    items = [e.get("items") for e in entries]
    return items if all(items) else None  # type: ignore[return-value]
