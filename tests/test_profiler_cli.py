"""`meshplan profile` end to end on CPU with gloo: the quick 2-process run (timed against the
90 s target), its profile's structure and monotonicity, the torchrun `--distributed` mode with
`profile merge`, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import tiny_cpu_profile

from planner.parallel import Recompute
from planner.profile import BlockKind, CollectiveOp, Profile, load_profile

TIMEOUT_S = 180


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _meshplan(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Profile, dict, float]:
    out = tmp_path_factory.mktemp("quick") / "profile.json"
    t0 = time.perf_counter()
    done = _meshplan(
        "profile", "--device", "cpu", "--nproc", "2", "--quick", "--out", str(out), "--json"
    )
    elapsed = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    return load_profile(out), json.loads(done.stdout), elapsed


@pytest.mark.slow
def test_quick_cpu_profile_reports_its_own_time(quick_run: tuple[Profile, dict, float]) -> None:
    # How long it takes is printed, not asserted (wall clock flakes on a loaded runner).
    _, doc, elapsed = quick_run
    assert set(doc) == {"out", "elapsed_s", "profile"}
    assert 0 < doc["elapsed_s"] <= elapsed


@pytest.mark.slow
def test_quick_profile_structure(quick_run: tuple[Profile, dict, float]) -> None:
    prof, _, _ = quick_run
    m = prof.meta
    assert m.device_kind == "cpu" and m.dtype.value == "fp32" and m.model is not None
    assert m.model.name == "tiny-gpt" and m.torch_version and m.date and "median" in m.method
    assert [g.gpu_id for g in prof.gpus] == [0, 1]
    assert {(r.src, r.dst) for r in prof.p2p} == {(0, 1), (1, 0)}
    assert {c.op for c in prof.collectives} == set(CollectiveOp)
    assert all(c.gpu_ids == (0, 1) and c.layout == "contiguous" for c in prof.collectives)
    # tp 1,2 x 3 blocks x 3 recompute modes x 2 micro-batches (embedding and head measured
    # once, recorded under each mode)
    assert len(prof.compute) == 2 * 3 * 3 * 2
    assert {r.micro_batch for r in prof.compute} == {1, 2}


@pytest.mark.slow
def test_quick_profile_times_tp_and_the_optimizer_as_the_executor_runs_them(
    quick_run: tuple[Profile, dict, float],
) -> None:
    """One node of 2 workers: tp=2 blocks are timed under the executor's DTensor TP (their
    collectives inside), tp=1 blocks plain; the optimizer step of every block kind is recorded
    with plain and DTensor parameters (how much slower DTensor's is goes to benchmarks, not
    here); each unit's DP sync is recorded."""
    prof, _, _ = quick_run
    for r in prof.compute:
        assert r.tp_collectives_included is (True if r.tp == 2 else None), r
    opt = {(o.block, o.tp, o.distributed): o for o in prof.optimizer or ()}
    assert set(opt) == {(b, tp, d) for b in BlockKind for tp in (1, 2) for d in (False, True)}
    for tp in (1, 2):
        plain = opt[(BlockKind.TRANSFORMER_BLOCK, tp, False)]
        dtensor = opt[(BlockKind.TRANSFORMER_BLOCK, tp, True)]
        assert dtensor.step_s > 0 and plain.step_s > 0
        assert plain.parameter_tensors == dtensor.parameter_tensors > 2
    # ZeRO-0 sync of each unit under the executor's replicate over both workers
    syncs = {r.block: r for r in prof.dp_sync or ()}
    assert set(syncs) == set(BlockKind)
    assert all(r.group_size == 2 and r.sync_s >= 0 and r.gradient_bytes > 0 for r in syncs.values())
    # and the wrapper's own hook cost per micro-batch with sync off, over the plain block
    assert all(
        r.forward_overhead_s is not None and r.forward_overhead_s >= 0 for r in syncs.values()
    )
    assert all(
        r.backward_overhead_s is not None and r.backward_overhead_s >= 0 for r in syncs.values()
    )
    # a block beside an all-reduce of its fp32 gradients over both workers
    (overlap,) = prof.overlap or ()
    assert overlap.group_size == 2 and overlap.collective_bytes > 0
    assert min(overlap.compute_s, overlap.collective_s, overlap.together_s) > 0
    assert 0.0 <= overlap.efficiency <= 1.0


@pytest.mark.slow
def test_quick_profile_monotone(quick_run: tuple[Profile, dict, float]) -> None:
    prof, _, _ = quick_run
    for rec in [*prof.p2p, *prof.collectives]:
        sizes = [s.bytes for s in rec.samples]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes) >= 2
        # 4 KiB vs 16 MiB: a 4096x bigger message is never faster
        assert rec.samples[-1].seconds > rec.samples[0].seconds, rec
    for c in prof.collectives:
        assert c.beta_bytes_per_s > 0 and c.alpha_s >= 0 and c.busbw_bytes_per_s > 0
    blocks = {
        (r.tp, r.recompute, r.micro_batch): r
        for r in prof.compute
        if r.block is BlockKind.TRANSFORMER_BLOCK
    }
    for tp in (1, 2):
        for rc in Recompute:
            assert blocks[(tp, rc, 2)].activation_bytes == 2 * blocks[(tp, rc, 1)].activation_bytes
        assert (
            blocks[(tp, Recompute.FULL, 1)].activation_bytes
            < blocks[(tp, Recompute.NONE, 1)].activation_bytes
        )


@pytest.mark.slow
def test_distributed_under_torchrun_then_merge(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "cli", "profile", "--distributed", "--device", "cpu", "--quick",
        "--phases", "links", "--out", str(parts),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(parts.glob("profile-*.json"))
    assert len(files) == 1  # one node
    merged = tmp_path / "profile.json"
    done = _meshplan("profile", "merge", str(parts), "--out", str(merged))
    assert done.returncode == 0, done.stderr
    prof = load_profile(merged)
    assert [g.gpu_id for g in prof.gpus] == [0, 1] and not prof.compute
    assert {(r.src, r.dst) for r in prof.p2p} == {(0, 1), (1, 0)}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tp", "3"], "error: --tp 3: model 'tiny-gpt': tp=3 must divide heads=4"),
        (["--device", "tpu"], "error: --device 'tpu' is not allowed; use one of cpu|cuda"),
        (["--micro-batches", "1,x"], "error: --micro-batches '1,x': expected comma-separated"),
        (["--seq-len", "999"], "error: --seq-len 999 exceeds model 'tiny-gpt' max_seq_len=128"),
        (["--budget-s", "-1"], "error: --budget-s -1.0: must be a positive number"),
        (["--phases", "disk"], "error: --phases 'disk': use compute, links"),
        (["--distributed"], "error: --distributed runs under torchrun"),
        (["--nproc", "0"], "error: --nproc 0: must be a positive integer"),
        (["--nproc", "-2"], "error: --nproc -2: must be a positive integer"),
        (["--budget-s", "0"], "error: --budget-s 0.0: must be a positive number"),
        (["--budget-s", "nan"], "error: --budget-s nan: must be a positive number"),
        (["--budget-s", "inf"], "error: --budget-s inf: must be a positive number"),
        (
            ["--out", "/dev/null/p.json"],
            "error: --out /dev/null/p.json: /dev/null is not a directory",
        ),
        (
            ["--out", "/dev/null/parts"],
            "error: --out /dev/null/parts: /dev/null is not a directory",
        ),
        (
            ["--distributed", "--out", "/dev/null/parts"],
            "error: --out /dev/null/parts: /dev/null is not a directory",
        ),
    ],
)
def test_bad_input_is_one_error_line(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.main import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert main(["profile", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def _no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("profile started measuring before checking --out")

    monkeypatch.setattr("profiler.run.run_profile", refuse)


@pytest.mark.parametrize("where", ["missing/p.json", "missing/parts", "afile", "afile/p.json"])
def test_out_is_checked_before_measuring(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import main

    _no_measuring(monkeypatch)
    (tmp_path / "afile").write_text("keep me\n")
    out = tmp_path / where
    assert main(["profile", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {out}"), err
    assert (tmp_path / "afile").read_text() == "keep me\n" and not (tmp_path / "missing").exists()


def test_profile_without_torch_names_the_local_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import main

    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    assert main(["profile", "--quick"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: `meshplan profile` needs torch"), err
    assert "pip install -e '.[torch]'" in lines[0] and "Traceback" not in err


def _tiny_profile() -> Profile:
    return tiny_cpu_profile(1)


def test_a_failed_profile_leaves_no_partial_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import main
    from planner.errors import SpecError

    def dies_while_writing(
        settings: object, *, nproc: int, distributed: bool, out: str, console: object
    ) -> None:
        Path(out).write_text('{"schema_version": 1, "gpus": [')
        raise SpecError("the profiling workers died")

    monkeypatch.setattr("profiler.run.run_profile", dies_while_writing)
    out = tmp_path / "profile.json"
    out.write_text("old profile\n")
    assert main(["profile", "--quick", "--out", str(out)]) == 2
    assert "error: the profiling workers died" in capsys.readouterr().err
    assert out.read_text() == "old profile\n"
    assert sorted(os.listdir(tmp_path)) == ["profile.json"]


def test_a_profile_appears_whole_at_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import main
    from planner.profile import save_profile
    from profiler.run import RunResult, node_file

    def writes(
        settings: object, *, nproc: int, distributed: bool, out: str, console: object
    ) -> RunResult:
        assert not distributed and not (tmp_path / "parts").exists()  # nothing at --out yet
        save_profile(_tiny_profile(), out)
        return RunResult(profile=_tiny_profile(), written=(Path(out),), elapsed_s=0.5)

    monkeypatch.setattr("profiler.run.run_profile", writes)
    parts = tmp_path / "parts"
    assert main(["profile", "--quick", "--out", str(parts), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    final = node_file(parts, socket.gethostname())
    assert doc["out"] == [str(final)]
    assert load_profile(final) == _tiny_profile()
    assert sorted(os.listdir(parts)) == [final.name] and sorted(os.listdir(tmp_path)) == ["parts"]


@pytest.mark.gpu
def test_quick_cuda_profile(tmp_path: Path) -> None:
    import torch

    n = torch.cuda.device_count()
    out = tmp_path / "profile.json"
    done = _meshplan(
        "profile", "--device", "cuda", "--nproc", str(n), "--quick", "--model", "tiny-llama",
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    prof = load_profile(out)
    assert prof.meta.device_kind == "gpu" and prof.meta.dtype.value == "bf16"
    assert prof.compute and all(r.peak_memory_bytes is not None for r in prof.compute)
    assert len(prof.p2p) == n * (n - 1)
