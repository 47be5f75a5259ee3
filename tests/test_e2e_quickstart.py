"""The README's CPU quick start, end to end: profile -> plan -> emit -> run node0.sh -> loss falls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meshplan(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.slow
def test_profile_plan_emit_run(tmp_path):
    (tmp_path / "cluster.yaml").write_text("name: laptop\nnodes:\n  - {type: cpu-2}\n")
    _meshplan(
        "profile",
        "--device",
        "cpu",
        "--nproc",
        "2",
        "--quick",
        "--model",
        "tiny-gpt",
        "--seq-len",
        "64",
        "--out",
        "profile.json",
        cwd=tmp_path,
    )
    r = _meshplan(
        "plan",
        "--model",
        "tiny-gpt",
        "--cluster",
        "cluster.yaml",
        "--global-batch",
        "8",
        "--seq-len",
        "64",
        "--dtype",
        "fp32",
        "--profile",
        "profile.json",
        "--out",
        "plan.json",
        "--emit",
        "launch",
        "--json",
        cwd=tmp_path,
    )
    doc = json.loads(r.stdout)
    assert doc["plans"][0]["source"] == "measured"
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["provenance"]["source"] == "measured" and plan["provenance"]["profile_sha256"]
    # node0.sh calls `torchrun` from PATH, as a user's activated environment would provide.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MESHPLAN_RDZV_ENDPOINT": f"localhost:{_free_port()}"}
    run = subprocess.run(
        [
            "bash",
            str(tmp_path / "launch" / "node0.sh"),
            "--steps",
            "10",
            "--metrics",
            str(tmp_path / "m.jsonl"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
