"""A run directory on disk: its layout, its `state.json`, which run it belongs to, and where a run resumes.

Layout: `stage_<k>/` (`metrics.json`, and the stage's model in Hugging Face format while it is kept), `final/`
(the chosen stage's model and `gradual.json`), `state.json` (the run's config, its stage records, the stage to
resume from). `state.json` is written after the stage's model, so an interrupted run resumes from a stage that is
complete on disk, and every write is atomic. A directory holding another run (another `state.json` config) is
refused, or cleared with `overwrite`, before anything is written.

Used by `GradualModule` (refuse or resume at start) and `gradual.callbacks.StageCheckpoint` (write as stages end).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradual.errors import UsageError
from gradual.stages import StageRecord

STATE_FILE = "state.json"
FINAL_DIR = "final"
METRICS_FILE = "metrics.json"


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write: a crash never leaves a half-written state file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def stage_dir(run_dir: Path, stage: int) -> Path:
    return run_dir / f"stage_{stage}"


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The saved `state.json` of `run_dir`, None when there is none."""
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two run configs (the saved one and this one), so a refused resume
    says which setting made it another run."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [c for k in keys for c in changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new, strict=True)) for c in changed_keys(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".") or "config"]


def check_run_dir(run_dir: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix runs: an existing directory must hold this same run (`config`, then it resumes) or be empty.

    With `overwrite`, a directory holding anything else is cleared. Call it once, on rank 0, before anything is
    written.
    """
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    state = read_state(run_dir)
    if state is not None and state.get("config") == config and not overwrite:
        return
    if not overwrite:
        changed = changed_keys(state.get("config") if state else None, config)
        what = f" (changed: {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})" if changed else ""
        raise UsageError(f"run_dir={str(run_dir)!r} already holds a different run{what}; choose another "
                         "run_dir or set overwrite: true")
    shutil.rmtree(run_dir)


def resume_point(run_dir: Path) -> tuple[Path, list[StageRecord]] | None:
    """Where an interrupted run continues: the folder of its last saved stage and the stage records up to it
    (a stage that was running when the run stopped is redone); None for a fresh run."""
    state = read_state(run_dir)
    if not state or not state.get("resume_from"):
        return None
    last = int(state["resume_from"].split("_")[1])
    return run_dir / state["resume_from"], [StageRecord.from_dict(r) for r in state["history"] if r["stage"] <= last]


def write_state(run_dir: Path, config: dict[str, Any], history: Sequence[StageRecord], stop_reason: str | None,
                final_stage: int | None = None) -> None:
    """`state.json`: the run's config and records, and the stage to resume from — the last one that met the
    threshold and whose model is on disk. `final_stage` (set once `final/` is written) marks the run finished."""
    saved = [r.stage for r in history
             if r.meets_threshold is not False and (stage_dir(run_dir, r.stage) / "config.json").is_file()]
    write_json(run_dir / STATE_FILE, {
        "config": config, "history": [r.to_dict() for r in history],
        "resume_from": stage_dir(run_dir, saved[-1]).name if saved else None, "finished": final_stage is not None,
        "final_stage": final_stage, "stop_reason": stop_reason})


def write_stage(run_dir: Path, record: StageRecord, export: Callable[[Path], None] | None) -> None:
    """`stage_<k>/` with its `metrics.json`; with `export`, the stage's model too, written to a temporary folder
    first and moved into place, so a crash never leaves a half-written stage."""
    folder = stage_dir(run_dir, record.stage)
    if export is not None:
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        export(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
    write_metrics(run_dir, record)


def write_metrics(run_dir: Path, record: StageRecord) -> None:
    write_json(stage_dir(run_dir, record.stage) / METRICS_FILE, record.to_dict())


def drop_model(run_dir: Path, stage: int) -> None:
    """Remove a stage's weights but keep its metrics.json."""
    folder = stage_dir(run_dir, stage)
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name != METRICS_FILE:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_final(run_dir: Path, record: StageRecord, stop_reason: str | None,
                export: Callable[[Path], None] | None = None) -> None:
    """`final/`: the chosen stage's saved model (or, with `export`, the model `export` writes) and `gradual.json`
    naming the stage, its removed and kept original layers and why the run stopped."""
    final = run_dir / FINAL_DIR
    if final.exists():
        shutil.rmtree(final)
    if export is not None:
        export(final)
    else:
        shutil.copytree(stage_dir(run_dir, record.stage), final, ignore=shutil.ignore_patterns(METRICS_FILE))
    write_json(final / "gradual.json", {"stage": record.stage, "removed": record.removed_total,
                                        "kept": record.kept, "stop_reason": stop_reason})
