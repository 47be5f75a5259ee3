"""Fault injection for the failure tests: a rank that dies mid-step, a save that stops mid-way.

Owns: reading the two environment variables below at the points train.py and checkpoint.py
call. Both are off unless set, and cost one environment lookup when off.

- `MESHPLAN_FAULT_EXIT=RANK:STEP`: process-group rank RANK leaves with `os._exit(EXIT_CODE)`
  in step STEP (1-based), after its backward and before the optimizer step, as a process
  whose host died would: no clean-up, no collective finished. Only in torchrun's first
  attempt (TORCHELASTIC_RESTART_COUNT unset or 0), so a restarted job gets past it.
- `MESHPLAN_FAULT_SAVE_HANG=PHASE[:STEP]` with `MESHPLAN_FAULT_READY=PATH`: rank 0 stops inside
  the checkpoint save of step STEP (any step when omitted) at PHASE (`dcp_finish`: every shard written, DCP's `.metadata` not yet;
  `publish`: DCP done, meshplan's completion record and rename not yet), writes PATH and
  sleeps until killed. A test waits for PATH and then sends SIGKILL, so where the writer
  dies is fixed by the phase, not by timing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

EXIT_ENV = "MESHPLAN_FAULT_EXIT"
HANG_ENV = "MESHPLAN_FAULT_SAVE_HANG"
READY_ENV = "MESHPLAN_FAULT_READY"
SAVE_PHASES = ("dcp_finish", "publish")
# The exit status of an injected rank death (any value outside the executor's 0-3 would do).
EXIT_CODE = 77


def maybe_exit(rank: int, step: int) -> None:
    """Die now if MESHPLAN_FAULT_EXIT names this rank and step (1-based)."""
    spec = os.environ.get(EXIT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    want_rank, _, want_step = spec.partition(":")
    if int(want_rank) == rank and int(want_step) == step:
        os._exit(EXIT_CODE)


def maybe_hang(phase: str, step: int) -> None:
    """Stop here for good if MESHPLAN_FAULT_SAVE_HANG names this save phase (and step)."""
    want_phase, _, want_step = os.environ.get(HANG_ENV, "").partition(":")
    if want_phase != phase or (want_step and int(want_step) != step):
        return
    ready = os.environ.get(READY_ENV)
    if ready:
        Path(ready).write_text(phase + "\n")
    while True:
        time.sleep(60)
