"""`meshplan estimate`: the --json contract, the human output and error handling."""

from __future__ import annotations

import json

import pytest

import cli.main
from cli.main import main


@pytest.fixture(autouse=True)
def _only_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    # the error boundary of cli.main with this command and the (stable) presets command only,
    # so other commands' imports neither slow these tests down nor break them (a typer app
    # with a single command would make it the default and reject the name "estimate")
    monkeypatch.setattr(cli.main, "COMMAND_MODULES", ("cli.presets_cmd", "cli.estimate_cmd"))


BASE = [
    "estimate",
    "--model",
    "gpt3-1.3b",
    "--cluster",
    "dgx-a100-80gb",
    "--nodes",
    "1",
    "--global-batch",
    "16",
    "--seq-len",
    "2048",
    "--tp",
    "2",
    "--pp",
    "2",
    "--micro-batch",
    "1",
]


def test_json_has_every_contract_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BASE, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in (
        "step_time_s",
        "tokens_per_s",
        "model_tflops_per_gpu",
        "hardware_tflops_per_gpu",
        "mfu",
        "peak_memory_bytes",
        "memory_capacity_bytes",
        "fits",
        "source",
        "breakdown",
        "memory_breakdown",
        "stages",
        "notes",
    ):
        assert key in data, key
    assert set(data["breakdown"]) == {
        "compute_s",
        "tp_comm_s",
        "pp_comm_s",
        "dp_comm_s",
        "bubble_s",
        "optimizer_s",
    }
    assert set(data["memory_breakdown"]) == {
        "weights",
        "grads",
        "optimizer",
        "activations",
        "other",
    }
    assert len(data["stages"]) == 2
    assert {"layers", "time_s", "memory_bytes"} <= set(data["stages"][0])
    assert data["source"] == "analytic" and data["fits"] is True
    assert data["config"]["dp"] == 2  # derived: 8 / (2*2)
    assert "analytic estimate" in data["notes"]


def test_invalid_config_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BASE[:-2], "--micro-batch", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: global_batch must be a multiple")
    assert main([*BASE, "--dp", "3"]) == 2
    assert "tp*pp*dp must equal" in capsys.readouterr().err


def test_not_fitting_prints_the_report_then_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    """Like `plan`, a configuration that does not fit is "infeasible" (3), after its report."""
    args = [
        "estimate",
        "--model",
        "llama3-70b",
        "--cluster",
        "dgx-a100-80gb",
        "--global-batch",
        "8",
        "--seq-len",
        "4096",
        "--tp",
        "8",
        "--pp",
        "1",
        "--micro-batch",
        "1",
    ]
    assert main(args) == 3
    out = capsys.readouterr().out
    assert "does not fit" in out and "exceeds" in out and "analytic estimate" in out
    assert main([*args, "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["fits"] is False
