"""A run directory on disk: its layout, its `state.json`, which run it belongs to, and where a run resumes.

Layout: `stage_<k>/` (`metrics.json`, and the stage's model in Hugging Face format while it is kept), `final/`
(the chosen stage's model and `gradual.json`), `state.json` (the run's config, its stage records, the stage to
resume from, the callbacks' states). `state.json` is written after the stage's model, so an interrupted run
resumes from a stage that is complete on disk.

Every write is atomic: a file or a folder is written under a temporary name (`*.tmp`), flushed to disk, then
renamed into place, so a process killed at any point (or a disk that fills up) leaves either the previous complete
version or the new complete one, never a half-written stage, `final/` or `state.json`; leftovers of an interrupted
write are removed when the run resumes (`clean_incomplete`). A directory holding another run (another `state.json`
config) is refused, or cleared with `overwrite`, and one that cannot be written or lacks the space for a stage's
model is refused, before anything is written.

Used by `GradualModule` (refuse or resume at start) and `gradual.callbacks.StageCheckpoint` (write as stages end).
"""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradual import identity, models
from gradual.errors import UsageError
from gradual.stages import StageRecord

STATE_FILE = "state.json"
FINAL_DIR = "final"
METRICS_FILE = "metrics.json"
TMP_SUFFIX = ".tmp"
LOGS_DIR = "logs"
"""The default CSV logs (`GradualCLI`): all a run writes here before its first `state.json`."""
_STAGE = re.compile(r"stage_(\d+)")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _fsync(path: Path) -> None:
    """Push a file's (or a directory's entries') writes to the disk, so a rename that follows never lands before
    the data it names. A filesystem that cannot sync directories is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        _fsync(path)
    _fsync(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file under a temporary name, sync it, rename it into place: a crash or a full disk leaves the old
    file or the new one, never a half-written one."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise OSError(e.errno, f"no space left on the device writing {path} (its previous version is intact; "
                                   "free space and re-run the same command to resume)") from e
        raise
    _fsync(path.parent)


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write: a crash never leaves a half-written state file."""
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())


def write_folder(folder: Path, fill: Callable[[Path], None], what: str) -> None:
    """Create `folder` atomically: `fill` writes its content into `<folder>.tmp`, which is synced and renamed
    into place (an older `folder` is moved aside first and removed after). Killed at any point, the run directory
    holds the old complete folder or the new complete one (or, between the two renames, neither: only for a
    folder no resume depends on, such as a stage being redone or `final/`), plus a `*.tmp` leftover that
    `clean_incomplete` removes. A write that fails (a full disk) removes its partial copy and says what is intact."""
    tmp = folder.with_name(folder.name + TMP_SUFFIX)
    old = folder.with_name(folder.name + ".old" + TMP_SUFFIX)
    for leftover in (tmp, old):
        _remove(leftover)
    try:
        fill(tmp)
        _fsync_tree(tmp)
    except OSError as e:
        _remove(tmp)
        if e.errno in _DISK_FULL:
            raise OSError(e.errno, f"no space left on the device writing {what} to {folder} (the partial copy was "
                                   "removed; the run directory's complete stages and state.json are intact: "
                                   "free space and re-run the same command to resume)") from e
        raise
    except BaseException:
        _remove(tmp)
        raise
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(folder.parent)
    _remove(old)


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
    """Before anything is written: refuse to mix runs (an existing directory must hold this same run — `config`,
    then it resumes — or be empty; with `overwrite`, one holding anything else is cleared), and refuse a directory
    that cannot be written or whose disk lacks the space for one stage's model (`check_writable`,
    `check_space`). Call it once, on rank 0.
    """
    check_writable(run_dir)
    replace = run_dir.is_dir() and any(run_dir.iterdir()) and not _same_run(run_dir, config, overwrite)
    need = models.weight_bytes(str(config.get("model", "")), str(config.get("dtype", "float32")))
    if need:
        check_space(run_dir, need, f"one stage's model ({config.get('model')} in {config.get('dtype', 'float32')})",
                    freed=_size(run_dir) if replace else 0)
    if replace:
        shutil.rmtree(run_dir)


def _same_run(run_dir: Path, config: dict[str, Any], overwrite: bool) -> bool:
    """Whether the non-empty `run_dir` holds this run (to resume); raises for another run unless `overwrite`."""
    state = read_state(run_dir)
    if state is not None:
        config = identity.recorded_form(state.get("config"), config)  # settings added since it was recorded
    if state is not None and state.get("config") == config and not overwrite:
        return True
    if state is None and not overwrite and all(p.name == LOGS_DIR or p.name.endswith(TMP_SUFFIX)
                                               for p in run_dir.iterdir()):
        return True  # a run killed before its first stage was recorded (e.g. while SGR answers were generated)
    if not overwrite:
        changed = changed_keys(state.get("config") if state else None, config)
        what = f" (changed: {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})" if changed else ""
        raise UsageError(f"run_dir={str(run_dir)!r} already holds a different run{what}; choose another "
                         "run_dir or set overwrite: true")
    return False


def _existing_parent(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing ancestor (what a `mkdir -p` would create under)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(run_dir: Path) -> None:
    """Refuse, as one line, a run directory that cannot be created or written (a path under a file, a read-only
    or virtual filesystem, no permission), by creating and removing a probe file where the run will write.
    Nothing is left behind."""
    base = _existing_parent(run_dir)
    if not base.is_dir():
        raise UsageError(f"run_dir={str(run_dir)!r} cannot be created: {str(base)!r} is a file, not a directory; "
                         "choose another run_dir")
    try:
        fd, probe = tempfile.mkstemp(prefix=".gradual-write-check-", dir=base)
    except OSError as e:
        raise UsageError(f"run_dir={str(run_dir)!r} is not writable: cannot create files in {str(base)!r} "
                         f"({e.strerror or e}); choose another run_dir") from None
    os.close(fd)
    os.unlink(probe)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def check_space(run_dir: Path, need: int, what: str, freed: int = 0) -> None:
    """Refuse, as one line, a run directory whose filesystem has less free space than `need` bytes (an estimate
    of one stage's model: a run that cannot save even one stage would lose its training to a full disk).
    `freed`: bytes a cleared `overwrite` directory gives back."""
    free = shutil.disk_usage(_existing_parent(run_dir)).free + freed
    if free < need:
        raise UsageError(f"run_dir={str(run_dir)!r} has {_human(free)} free on its filesystem; {what} needs about "
                         f"{_human(need)}; free space or choose another run_dir")


def stage_saved(folder: Path) -> bool:
    """Whether a stage folder holds its model. Folders are renamed into place complete (`write_folder`), and
    `drop_model` removes `config.json` first, so its presence means the whole model is there."""
    return (folder / "config.json").is_file()


def resume_point(run_dir: Path) -> tuple[Path, list[StageRecord]] | None:
    """Where an interrupted run continues: the folder of its last saved stage and the stage records up to it
    (a stage that was running when the run stopped is redone); None for a fresh run. Only `state.json` names it,
    and it is written after the stage's folder is complete: a stage folder it does not name (one a killed run left
    half-way, or a `*.tmp` leftover) is never resumed from."""
    state = read_state(run_dir)
    if not state or not state.get("resume_from"):
        return None
    folder = run_dir / state["resume_from"]
    if not stage_saved(folder):
        raise UsageError(f"{run_dir / STATE_FILE} resumes from {folder}, which holds no complete model; the run "
                         "directory was changed outside gradual: restore that folder, or start again with "
                         "overwrite: true")
    last = int(state["resume_from"].split("_")[1])
    return folder, [StageRecord.from_dict(r) for r in state["history"] if r["stage"] <= last]


def clean_incomplete(run_dir: Path, last_stage: int) -> list[Path]:
    """Remove what an interrupted run left half-way: `*.tmp` leftovers of atomic writes, and the folders of
    stages after `last_stage` (the stage the run resumes from or restarts at; they are redone). Returns what was
    removed. Call it on rank 0, before the run writes."""
    if not run_dir.is_dir():
        return []
    removed = []
    for path in sorted(run_dir.iterdir()):
        stage = _STAGE.fullmatch(path.name)
        if path.name.endswith(TMP_SUFFIX) or (stage and int(stage.group(1)) > last_stage):
            _remove(path)
            removed.append(path)
    return removed


def write_state(run_dir: Path, config: dict[str, Any], history: Sequence[StageRecord], stop_reason: str | None,
                final_stage: int | None = None, callbacks: Mapping[str, Any] | None = None) -> None:
    """`state.json`: the run's config and records, the stage to resume from — the last one that met the
    threshold and whose model is on disk — and `callbacks`, each stateful callback's `state_dict()` by its
    `state_key` (tensors in them are kept, `_encode`). `final_stage` (set once `final/` is written) marks the run
    finished."""
    saved = [r.stage for r in history if r.meets_threshold is not False and stage_saved(stage_dir(run_dir, r.stage))]
    write_json(run_dir / STATE_FILE, {
        "config": config, "history": [r.to_dict() for r in history],
        "resume_from": stage_dir(run_dir, saved[-1]).name if saved else None, "finished": final_stage is not None,
        "final_stage": final_stage, "stop_reason": stop_reason, "callbacks": _encode(dict(callbacks or {}))})


def callback_states(run_dir: Path) -> dict[str, Any]:
    """The callbacks' states saved in `state.json` with the stage a run resumes from, by `state_key` (empty when
    there are none)."""
    state = read_state(run_dir) or {}
    return _decode(state.get("callbacks") or {})


_TENSOR = "__torch_tensor__"


def _encode(value: Any) -> Any:
    """A callback state as JSON values: a tensor (Lightning's `EarlyStopping` keeps its best score as one) becomes
    `{"__torch_tensor__": <torch.save bytes, base64>}`, exact whatever its dtype, shape or value (inf included)."""
    if isinstance(value, torch.Tensor):
        buffer = io.BytesIO()
        torch.save(value.detach().cpu(), buffer)
        return {_TENSOR: base64.b64encode(buffer.getvalue()).decode()}
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {_TENSOR}:
        return torch.load(io.BytesIO(base64.b64decode(value[_TENSOR])), weights_only=True)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def write_stage(run_dir: Path, record: StageRecord, export: Callable[[Path], None] | None) -> None:
    """`stage_<k>/` with its `metrics.json`; with `export`, the stage's model too, written to a temporary folder
    first and moved into place (`write_folder`), so a crash never leaves a half-written stage."""
    folder = stage_dir(run_dir, record.stage)
    if export is not None:
        def fill(tmp: Path) -> None:
            export(tmp)
            write_json(tmp / METRICS_FILE, record.to_dict())

        write_folder(folder, fill, f"stage {record.stage}'s model")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_metrics(run_dir, record)


def write_metrics(run_dir: Path, record: StageRecord) -> None:
    write_json(stage_dir(run_dir, record.stage) / METRICS_FILE, record.to_dict())


def drop_model(run_dir: Path, stage: int) -> None:
    """Remove a stage's weights but keep its metrics.json. `config.json` goes first, so a drop interrupted half-way
    never leaves a folder that reads as a saved stage."""
    folder = stage_dir(run_dir, stage)
    if not folder.is_dir():
        return
    (folder / "config.json").unlink(missing_ok=True)
    for path in folder.iterdir():
        if path.name != METRICS_FILE:
            _remove(path)


def write_final(run_dir: Path, record: StageRecord, stop_reason: str | None,
                export: Callable[[Path], None] | None = None) -> None:
    """`final/`: the chosen stage's saved model (or, with `export`, the model `export` writes) and `gradual.json`
    naming the stage, its removed and kept original layers and why the run stopped; written whole under a
    temporary name and renamed into place (`write_folder`)."""
    def fill(tmp: Path) -> None:
        if export is not None:
            export(tmp)
        else:
            shutil.copytree(stage_dir(run_dir, record.stage), tmp, ignore=shutil.ignore_patterns(METRICS_FILE))
        write_json(tmp / "gradual.json", {"stage": record.stage, "removed": record.removed_total,
                                          "kept": record.kept, "stop_reason": stop_reason})

    write_folder(run_dir / FINAL_DIR, fill, "the final model")
