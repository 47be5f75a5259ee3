"""`meshplan plan` and `estimate` refuse bad options and unwritable outputs before any work:
one `error:` line naming the option, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cli_helpers import one_error

from cli.main import main

BASE = ["plan", "--model", "tiny-gpt", "--cluster", "dgx-h100", "--nodes", "1",
        "--global-batch", "8", "--seq-len", "64"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--out", "/dev/null/p.json"], "--out"),
        (["--out", "{tmp}"], "is a directory"),
        (["--out", "{tmp}/missing/p.json"], "does not exist"),
        (["--report", "{tmp}/afile"], "--report"),
        (["--emit", "{tmp}/afile"], "--emit"),
        (["--emit", "{tmp}/foreign"], "not written by `meshplan emit`"),
        (["--placement-budget-s", "nan"], "--placement-budget-s"),
        (["--max-time-s", "nan"], "--max-time-s"),
        (["--max-time-s", "-1"], "--max-time-s"),
        (["--top", "0"], "--top"),
    ],
)
def test_plan_refuses_before_searching(
    extra: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine\n")

    def no_search(*args: object, **kwargs: object) -> None:
        raise AssertionError("the search ran before the options were checked")

    monkeypatch.setattr("planner.search.search", no_search)
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main([*BASE, *args]) == 2
    one_error(capsys, needle)
    assert (tmp_path / "afile").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "foreign"]


def test_emit_without_out_writes_the_plan_inside_the_launch_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--emit DIR` puts the plan at DIR/plan.json, as --help says, and nothing beside DIR."""
    assert main([*BASE, "--emit", str(tmp_path / "launch")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launch"]
    plan = json.loads((tmp_path / "launch" / "plan.json").read_text())
    assert plan["schema_version"]


def test_plan_with_out_and_emit_writes_both(tmp_path: Path) -> None:
    assert main([*BASE, "--out", str(tmp_path / "p.json"), "--emit", str(tmp_path / "l")]) == 0
    assert (tmp_path / "p.json").read_text() == (tmp_path / "l" / "plan.json").read_text()


def test_report_without_matplotlib_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([*BASE, "--report", str(tmp_path / "r"), "--out", str(tmp_path / "p.json")]) == 2
    one_error(capsys, "--report", "pip install -e '.[report]'")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--tp", "0", "--pp", "1"], "--tp 0"),
        (["--tp", "1", "--pp", "0"], "--pp 0"),
        (["--tp", "1", "--pp", "1", "--dp", "-2"], "--dp -2"),
    ],
)
def test_estimate_degrees_must_be_positive(
    flags: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["estimate", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1",
            "--global-batch", "64", "--seq-len", "2048", "--micro-batch", "1", *flags]  # fmt: skip
    assert main(args) == 2
    one_error(capsys, needle)


def test_bare_meshplan_names_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    line = one_error(capsys, "missing command")
    assert "plan" in line and line != "error: "


def test_help_shows_flags_without_a_bool_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    json_line = next(line for line in out.splitlines() if "--json" in line)
    assert "<bool>" not in json_line and "Print one JSON" in json_line
