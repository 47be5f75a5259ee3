"""Errors meshplan reports to users.

Every error here is a *known* failure: the CLI prints its message as one line (`error: ...`)
and exits with `exit_code`, never a traceback. Anything else escaping is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MeshplanError(Exception):
    """Base for user-facing errors; exit code 2 means bad input or usage."""

    exit_code = 2


class SpecError(MeshplanError, ValueError):
    """A spec, file or option is invalid; the message names the field, the value and what is allowed."""


class ConfigError(MeshplanError, ValueError):
    """A parallel configuration breaks a rule (degrees, divisibility, schedule)."""


class FormatError(MeshplanError, ValueError):
    """A profile or plan file is malformed, of an unknown schema version, or inconsistent."""


class NoFeasiblePlan(MeshplanError):
    """No configuration fits; the message names the binding constraint and what would fit."""

    exit_code = 3


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
