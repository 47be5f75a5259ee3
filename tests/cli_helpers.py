"""Helpers the CLI tests share: the one-line error contract and a minimal CPU profile."""

from __future__ import annotations

import pytest

from planner.profile import Profile, ProfileGpu, ProfileMeta
from planner.specs import Dtype


def one_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """The single `error:` line on stderr (no traceback); it must contain every word."""
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def tiny_cpu_profile(workers: int = 1) -> Profile:
    """A valid profile of `workers` CPU workers on one host, with no measurements."""
    return Profile(
        schema_version=1,
        meta=ProfileMeta(
            hosts=("h",),
            device_kind="cpu",
            torch_version="x",
            dtype=Dtype.FP32,
            date="d",
            method="m",
        ),
        gpus=tuple(
            ProfileGpu(gpu_id=i, host="h", local_index=i, device_name="cpu", memory_bytes=2**30)
            for i in range(workers)
        ),
    )
