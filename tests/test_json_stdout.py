"""Every `--json` command prints exactly one JSON document on stdout, run as a user runs it.

Each command runs in a subprocess (the real stdout file descriptor, native libraries loaded),
so a solver banner or a library's print would break the parse: HiGHS 1.16 did exactly that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ESTIMATE = ("--cluster", "dgx-h100", "--nodes", "1", "--global-batch", "64", "--seq-len", "2048")


def _run(*args: str, cwd: Path, rc: int = 0) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == rc, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return r


def _one_document(stdout: str) -> object:
    """Parses only if stdout is one JSON value and nothing else (raw_decode + the rest empty)."""
    doc, end = json.JSONDecoder().raw_decode(stdout.lstrip())
    assert stdout.lstrip()[end:].strip() == "", f"more than one document: {stdout[end:][:200]!r}"
    return doc


@pytest.mark.parametrize(
    "args",
    [
        ("presets", "--json"),
        ("presets", "models", "--json"),
        ("presets", "show", "dgx-h100", "--json"),
        ("env", "--json"),
        ("estimate", "--model", "llama3-8b", *ESTIMATE, "--tp", "2", "--pp", "1", "--zero", "1",
         "--micro-batch", "1", "--json"),
    ],
    ids=["presets", "presets-models", "presets-show", "env", "estimate"],
)  # fmt: skip
def test_simple_commands_print_one_document(args: tuple[str, ...], tmp_path: Path) -> None:
    assert isinstance(_one_document(_run(*args, cwd=tmp_path).stdout), dict | list)


def test_estimate_that_does_not_fit_prints_its_document_and_exits_3(tmp_path: Path) -> None:
    args = ("--tp", "1", "--pp", "1", "--micro-batch", "1", "--json")
    r = _run("estimate", "--model", "llama3-70b", *ESTIMATE, *args, cwd=tmp_path, rc=3)
    doc = _one_document(r.stdout)
    assert isinstance(doc, dict) and doc["fits"] is False


def test_plan_and_emit_print_one_document_each(tmp_path: Path) -> None:
    """`plan` runs the HiGHS split ILP (pp > 1 is pinned so the solver is really called)."""
    r = _run(
        "plan", "--model", "gpt3-1.3b", "--cluster", "dgx-a100-80gb", "--nodes", "2",
        "--global-batch", "64", "--seq-len", "2048", "--fix", "pp=2", "--out", "plan.json",
        "--json", cwd=tmp_path,
    )  # fmt: skip
    doc = _one_document(r.stdout)
    assert isinstance(doc, dict) and doc["plans"][0]["config"]["pp"] == 2
    r = _run("emit", "plan.json", "--out", "launch", "--json", cwd=tmp_path)
    emitted = _one_document(r.stdout)
    assert isinstance(emitted, dict) and "node0.sh" in emitted["files"]


def test_the_guard_keeps_native_writes_off_stdout(tmp_path: Path) -> None:
    """A native write to fd 1 (as a C library's banner is) lands on stderr, not in the data."""
    script = textwrap.dedent(
        """
        import os
        from cli.common import print_json
        from cli.stdio import guarded_stdout
        with guarded_stdout(json_only=True):
            os.write(1, b"Running SomeSolver 9.9\\n")
            print("a library's print")
            print_json({"ok": True})
        """
    )
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert _one_document(r.stdout) == {"ok": True}
    assert "Running SomeSolver" in r.stderr and "a library's print" in r.stderr


def test_a_reader_that_goes_away_mid_output_leaves_no_trace(tmp_path: Path) -> None:
    """`meshplan ... | head`: head reads a line and leaves while meshplan still writes.

    The write that fails raises BrokenPipeError (click's main turns it into exit 1); the guard
    must still restore fd 1 and must not raise a second error from its own flush.
    """
    script = textwrap.dedent(
        """
        import os, sys
        from cli.stdio import guarded_stdout
        r, w = os.pipe()
        os.dup2(w, 1)
        os.close(w)
        before = os.fstat(1).st_ino
        try:
            with guarded_stdout(json_only=False):
                print("first line")
                os.close(r)  # the reader goes away
                print("second line")
        except BrokenPipeError:
            pass
        print("restored" if os.fstat(1).st_ino == before else "fd 1 not restored", file=sys.stderr)
        """
    )
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "restored", r.stderr
