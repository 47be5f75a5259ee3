"""Writing the files meshplan produces: checked up front, written atomically, never half-written.

Owns: reading a JSON input with one-line errors (`read_json_file`); the checks every output option (`--out`, `--emit`, `--report`, `--metrics`, ...) runs
before any work is done, and the atomic write used for every single-file output. Each failure
is one `SpecError` naming the option, the path and what is wrong, so the CLI prints one
`error:` line (exit 2) instead of an OSError traceback.
Does not own: what goes into the files (plan, profile, launch files, reports).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from planner.errors import FormatError, SpecError


def _existing_parent(path: Path, option: str) -> Path:
    """The directory a new file or folder at `path` would be created in; it must exist."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise SpecError(f"{option} {path}: the directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise SpecError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError(f"{option} {path}: the directory {parent} is not writable")
    return parent


def check_output_file(path: str | Path, option: str) -> Path:
    """Check that a file can be written at `path` (new or replaced); return it as a Path."""
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"{option} {p}: is a directory; give a file path")
    _existing_parent(p, option)
    if p.exists() and not os.access(p, os.W_OK):
        raise SpecError(f"{option} {p}: the file is not writable")
    return p


def check_output_dir(path: str | Path, option: str) -> Path:
    """Check that a directory can be created at `path`, or that it exists and is writable."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise SpecError(f"{option} {p}: is a file; give a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise SpecError(f"{option} {p}: the directory is not writable")
        return p
    _existing_parent(p, option)
    return p


def check_not_inputs(path: str | Path, inputs: Iterable[str | Path], option: str) -> None:
    """Refuse an output that would overwrite one of the command's own inputs."""
    out = Path(path).resolve()
    for src in inputs:
        if Path(src).resolve() == out:
            raise SpecError(
                f"{option} {path}: is also an input of this command; choose another path"
            )


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str, option: str = "--out") -> Path:
    """Write `text` to a temporary file beside `path`, then rename it into place.

    A failure leaves neither a partial file nor the temporary behind.
    """
    p = check_output_file(path, option)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 less umask)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, p)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise SpecError(f"{option} {p}: cannot write ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def read_json_file(path: str | Path, what: str) -> object:
    """Parse the JSON file `path` (a `what`: plan, profile, ...); one-line errors, no traceback."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{what} file not found: {p}")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        # JSONDecodeError, or ValueError for an integer beyond Python's digit limit
        why = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise FormatError(f"{p}: not valid JSON ({why})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: cannot read the {what} ({e})") from None
