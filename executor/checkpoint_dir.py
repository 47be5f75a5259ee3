"""The on-disk layout of a checkpoint directory: which step directories are complete, `latest`.

Owns: the names (`step_00000012/`, `.partial-step_00000012/`, `latest`), the completion record
(`meshplan-checkpoint.json`: step, model fingerprint, the writing plan's layout), publishing a
finished save (rename, then point `latest` at it) and finding the newest complete checkpoint.
Does not own: writing or reading tensors (executor/checkpoint.py, torch.distributed.checkpoint).
Does not import torch, so `meshplan replan` can say which checkpoint a plan resumes from.

A save writes into `.partial-step_N/`; only after torch.distributed.checkpoint has written its
`.metadata` (last, after every rank's shards) does rank 0 add the completion record, rename the
directory to `step_N/` (one atomic rename on a POSIX file system) and replace `latest` (written
to a temporary file, then `os.replace`). A writer killed at any point leaves either no `step_N/`
or a complete one, and `latest` never names anything else: `latest_step` also checks the record,
so a hand-made or stale pointer cannot make a torn directory the one resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from planner.errors import SpecError
from planner.serialize import to_jsonable
from planner.specs import ModelSpec

RECORD = "meshplan-checkpoint.json"
LATEST = "latest"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index, written last by rank 0
RECORD_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(SpecError):
    """A checkpoint that must not be loaded: torn, missing, or of another model (exit 2)."""


@dataclass(frozen=True, kw_only=True)
class CheckpointRecord:
    """What a complete checkpoint says about itself (`meshplan-checkpoint.json`)."""

    step: int
    model_name: str
    model_fingerprint: str
    layout: str
    world_size: int


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def partial_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f".partial-step_{step:08d}"


def model_fingerprint(model: ModelSpec) -> str:
    """sha256 of the model's architecture (its spec without the display name): checkpoints
    of the same shapes load, any other model is refused."""
    spec = to_jsonable(model)
    spec.pop("name", None)
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_record(path: Path) -> CheckpointRecord | None:
    """The record of a complete checkpoint directory, or None when it is not complete."""
    if not (path / DCP_METADATA).is_file():
        return None
    try:
        data = json.loads((path / RECORD).read_text())
        if data.get("format") != RECORD_FORMAT:
            return None
        return CheckpointRecord(
            step=int(data["step"]),
            model_name=str(data["model_name"]),
            model_fingerprint=str(data["model_fingerprint"]),
            layout=str(data["layout"]),
            world_size=int(data["world_size"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def complete_steps(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (rec := read_record(p)) is not None and rec.step == int(m.group(1)):
            steps.append(rec.step)
    return sorted(steps)


def latest_step(root: str | Path) -> int | None:
    """The step `latest` names when that checkpoint is complete; else the newest complete one
    (a pointer lost or left stale by a crash between rename and replace); None if there is none."""
    root = Path(root)
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        name = ""
    m = _STEP_DIR.match(name)
    if m and read_record(root / name) is not None:
        return int(m.group(1))
    steps = complete_steps(root)
    return steps[-1] if steps else None


def check_loadable(root: str | Path, step: int, fingerprint: str, model_name: str) -> Path:
    """The directory of checkpoint `step`, or CheckpointError saying why it must not be loaded."""
    path = step_dir(root, step)
    rec = read_record(path)
    if rec is None:
        torn = partial_dir(root, step).exists() or path.exists()
        why = "a save that did not finish (torn)" if torn else "no such checkpoint"
        raise CheckpointError(
            f"checkpoint {path}: {why}; complete checkpoints in {root}: "
            f"{complete_steps(root) or 'none'}"
        )
    if rec.model_fingerprint != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} holds model '{rec.model_name}' (fingerprint "
            f"{rec.model_fingerprint[:12]}), but the plan trains '{model_name}' (fingerprint "
            f"{fingerprint[:12]}): a checkpoint loads only into the same architecture; use "
            "another --checkpoint-dir"
        )
    return path


def begin(root: str | Path, step: int) -> Path:
    """Rank 0, before a save: the empty temporary directory it writes into (a torn earlier
    attempt at the same step is removed first)."""
    tmp = partial_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(root: str | Path, step: int, record: CheckpointRecord) -> Path:
    """Rank 0, after every rank's shards and DCP's `.metadata` are written: add the record,
    rename the temporary directory into place, then point `latest` at it."""
    root = Path(root)
    tmp, final = partial_dir(root, step), step_dir(root, step)
    data = {"format": RECORD_FORMAT, **to_jsonable(record)}
    with open(tmp / RECORD, "w") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        # The same step saved again (a run resumed from an older checkpoint): move the old one
        # aside first, since a directory cannot be renamed over a non-empty one.
        old = root / f".replaced-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    return final
