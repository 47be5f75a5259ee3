"""Who may write to the process's stdout during a command: only meshplan's own data output.

Owns: the guard `main()` wraps every command in. At the file-descriptor level, fd 1 points at
stderr for the whole command, so a native library (a solver's banner, a C++ warning) or a child
process can never put bytes into the data a user pipes on. With `--json` the guard goes one
level further: Python's `sys.stdout` points at stderr too, and only `data_stream()` (used by
`print_json`) reaches the real stdout, so stdout holds exactly one document.

Does not own: what the commands print (cli/common.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator
from typing import TextIO

# The stream that reaches the process's real stdout while a guard is active. A context
# variable rather than a global: a test that calls `main()` twice, or from threads, gets
# its own value per call.
_DATA_STREAM: contextvars.ContextVar[TextIO | None] = contextvars.ContextVar(
    "meshplan_data_stream", default=None
)


def data_stream() -> TextIO:
    """Where data (tables, JSON documents) goes: the real stdout, also under the guard."""
    return _DATA_STREAM.get() or sys.stdout


def _real_stdout_fd() -> int | None:
    """fd 1 when sys.stdout is the process's stdout; None under a test's in-memory capture."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if fd == 1 else None


@contextlib.contextmanager
def guarded_stdout(json_only: bool) -> Iterator[None]:
    """Point fd 1 (and with `json_only`, sys.stdout) at stderr; keep the real stdout for data."""
    if _real_stdout_fd() is None:
        # In-memory capture (pytest's capsys): nothing native can reach it, only redirect
        # Python-level writes when a single document is promised.
        original = sys.stdout
        token = _DATA_STREAM.set(original)
        if json_only:
            sys.stdout = sys.stderr
        try:
            yield
        finally:
            sys.stdout = original
            _DATA_STREAM.reset(token)
        return
    sys.stdout.flush()
    saved_fd = os.dup(1)
    os.dup2(2, 1)
    original = sys.stdout
    data = open(  # noqa: SIM115 (closed in finally; closefd keeps the dup for restoring)
        saved_fd,
        "w",
        encoding=original.encoding,
        errors=original.errors,
        closefd=False,
        buffering=1,
    )
    token = _DATA_STREAM.set(data)
    sys.stdout = sys.stderr if json_only else data
    try:
        yield
    finally:
        with contextlib.suppress(BrokenPipeError):
            # the reader went away (`meshplan ... | head`): nothing left to deliver (close()
            # flushes first and closes even when that flush fails)
            data.close()
        sys.stdout = original
        _DATA_STREAM.reset(token)
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
