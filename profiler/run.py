"""Orchestration of `meshplan profile`: local workers or torchrun, progress, budget, output files.

Owns: `run_profile` (checks the devices, starts the workers with a live progress display,
writes profile.json or DIR/profile-<host>.json) and where output goes.
Does not own: the measurements (compute.py, links.py), the worker processes (workers.py), the
settings presets (settings.py), merging (merge.py), the CLI (cli/profile_cmd.py).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from planner.errors import SpecError
from planner.profile import Profile, save_profile
from profiler import device as dev
from profiler import workers
from profiler.progress import NullReporter, RichReporter, make_progress
from profiler.settings import ProfileSettings

DEFAULT_DISTRIBUTED_DIR = "profiles"


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """`profile` is what this process wrote (the node part under torchrun), None on ranks that
    write nothing; `elapsed_s` the wall time of the whole run in this process."""

    profile: Profile | None
    written: tuple[Path, ...]
    elapsed_s: float


def is_directory_target(out: str) -> bool:
    """`--out DIR`: an existing directory, a trailing slash, or a name without a .json suffix."""
    p = Path(out)
    return p.is_dir() or out.endswith(("/", os.sep)) or p.suffix.lower() != ".json"


def node_file(directory: Path, host: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in host)
    return directory / f"profile-{safe}.json"


def _write(profile: Profile, out: str, host: str) -> Path:
    path = node_file(Path(out), host) if is_directory_target(out) else Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_profile(profile, path)
    except OSError as e:
        raise SpecError(f"--out {out}: cannot write {path} ({e.strerror})") from None
    return path


def run_profile(
    settings: ProfileSettings,
    *,
    nproc: int,
    distributed: bool,
    out: str | None,
    console: Console,
) -> RunResult:
    """Measure, write, and return what was written."""
    started = time.perf_counter()
    if distributed:
        return _run_distributed(settings, out or DEFAULT_DISTRIBUTED_DIR, console, started)
    dev.check_available(settings.device_kind, nproc)
    target = out or "profile.json"
    progress = make_progress(console)
    reporter = RichReporter(progress)
    with progress:
        profile = workers.run_local(settings, nproc, reporter)
        reporter.finish()
    path = _write(profile, target, socket.gethostname())
    return RunResult(profile=profile, written=(path,), elapsed_s=time.perf_counter() - started)


def _run_distributed(
    settings: ProfileSettings, out: str, console: Console, started: float
) -> RunResult:
    if not is_directory_target(out):
        raise SpecError(
            f"--distributed --out {out}: give a directory; each node writes DIR/profile-<host>.json "
            "(then `meshplan profile merge DIR --out profile.json`)"
        )
    place = workers.torchrun_place()
    dev.check_available(settings.device_kind, place.local_world)
    progress = make_progress(console)
    if place.local_rank == 0:
        shown = RichReporter(progress)
        with progress:
            part, host = workers.run_distributed(settings, lambda _: shown)
            shown.finish()
    else:
        part, host = workers.run_distributed(settings, lambda _: NullReporter())
    written: tuple[Path, ...] = ()
    if part is not None:
        written = (_write(part, out, host),)
    return RunResult(profile=part, written=written, elapsed_s=time.perf_counter() - started)
