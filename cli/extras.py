"""Optional dependencies of commands (torch, matplotlib): checked before any work is done.

Owns: `require`, `require_torch` and the install hint. meshplan is installed from its source
checkout, so the hint is the checkout's own extra (`pip install -e '.[torch]'` run in the
checkout), not a package-registry name that may not exist or may be a different project.
Does not own: which commands need what (each command calls these up front).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from planner.errors import SpecError

# The directory holding pyproject.toml (the parent of cli/).
CHECKOUT_DIR = Path(__file__).resolve().parents[1]


def install_hint(extra: str) -> str:
    """How to add an optional extra to this meshplan install."""
    return f"install it with `pip install -e '.[{extra}]'` in {CHECKOUT_DIR}"


def _importable(module: str) -> bool:
    # find_spec, not import: importing torch costs seconds, and the commands that need it run it
    # in subprocesses. A module set to None in sys.modules (how tests hide one) reads as missing.
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, needed_by: str) -> None:
    """Raise one SpecError naming what needs `module` and how to install it, when it is absent."""
    if not _importable(module):
        raise SpecError(
            f"{needed_by} needs {module}, which is not installed; {install_hint(extra)}"
        )


def require_torch(needed_by: str) -> None:
    require("torch", "torch", needed_by)
