"""End to end on CPU: a 4-process job loses a node mid-step, is re-planned on 2, and resumes.

Two "nodes" of two CPU workers each run a pp=2 x dp=2 plan with checkpoints every 2 steps;
rank 3 (node 1) dies inside step 5 (executor/faults.py). `meshplan replan --exclude node1`
plans the survivors (one node, 2 processes) and finds step 4 through the launch directory's
launch.json; the resumed run's losses equal, bit for bit, those of a 2-process run started
from a clean copy of that checkpoint, and match a single process's uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from executor_shapes import GPT

import presets
from executor import checkpoint_dir as layout
from executor.faults import EXIT_CODE, EXIT_ENV
from executor.mesh import init_distributed
from executor.train import TrainOptions, train
from planner.parallel import ParallelConfig
from planner.plan import build_plan, load_plan, save_plan
from planner.specs import Dtype, TrainingSpec

STEPS = 6
LR = 1e-3
TOLERANCE = 1e-5  # fp32 losses of two layouts (tests/test_executor_parallel.py)
SPAWN_TIMEOUT_S = 300
TRAINING = TrainingSpec(global_batch=8, seq_len=16, dtype=Dtype.FP32)


def _worker(gpu_id: int, world: int, cases: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    results = {}
    for i, case in enumerate(cases):
        plan = load_plan(case["plan"])
        init_distributed(plan, "gloo", gpu_id=gpu_id, store=dist.FileStore(f"{out}.{i}", world))
        try:
            results[case["name"]] = train(plan, TrainOptions(lr=LR, steps=STEPS, **case["opts"]))
        finally:
            dist.destroy_process_group()
    if gpu_id == 0:
        Path(out).write_text(json.dumps(results))


def _start(world: int, cases: list[dict], out: Path) -> mp.ProcessContext:
    return mp.start_processes(
        _worker, args=(world, cases, str(out)), nprocs=world, join=False, start_method="spawn"
    )


def _join(ctx: mp.ProcessContext) -> None:
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"processes did not finish in {SPAWN_TIMEOUT_S} s")


def _reference(tmp: Path) -> list[float]:
    """One process, (1,1,1), uninterrupted, in this process."""
    one = presets.load_cluster("cpu-2")
    from dataclasses import replace

    cluster = replace(one, name="cpu-1", nodes=(replace(one.nodes[0], gpus=1),))
    plan = build_plan(
        model=GPT,
        training=TRAINING,
        cluster=cluster,
        config=ParallelConfig(tp=1, pp=1, dp=1, micro_batch=2),
        prediction={},
        source="analytic",
    )
    torch.set_num_threads(1)
    init_distributed(plan, "gloo", gpu_id=0, store=dist.HashStore())
    try:
        return train(plan, TrainOptions(lr=LR, steps=STEPS))
    finally:
        dist.destroy_process_group()


def _cli(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    from cli.main import main  # here: the spawned workers import this module too

    capsys.readouterr()
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.slow
def test_node_loss_replan_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = build_plan(
        model=GPT,
        training=TRAINING,
        cluster=presets.load_cluster("cpu-2", 2),
        config=ParallelConfig(tp=1, pp=2, dp=2, micro_batch=2, zero=1),
        prediction={},
        source="analytic",
    )
    assert [(r.rank, r.node) for r in plan.ranks] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    save_plan(plan, tmp_path / "plan4.json")
    ckpt, launch = tmp_path / "ckpt", tmp_path / "launch"
    rc, _, err = _cli(
        capsys,
        ["emit", str(tmp_path / "plan4.json"), "--out", str(launch), "--checkpoint-dir", str(ckpt)],
    )
    assert rc == 0, err

    # 4 processes; rank 3 dies in step 5 after its backward, the others are then stopped.
    monkeypatch.setenv(EXIT_ENV, "3:5")
    metrics = tmp_path / "m4.jsonl"
    opts = {"checkpoint_dir": str(ckpt), "checkpoint_every": 2, "metrics_path": str(metrics)}
    case = {"name": "pp2dp2", "plan": str(launch / "plan.json"), "opts": opts}
    ctx = _start(4, [case], tmp_path / "r4.json")
    with pytest.raises(mp.ProcessExitedException) as died:
        _join(ctx)
    assert died.value.error_index == 3 and died.value.exit_code == EXIT_CODE
    monkeypatch.delenv(EXIT_ENV)
    before = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(before) == 4 and layout.latest_step(ckpt) == 4

    rc, out, err = _cli(
        capsys,
        [
            "replan",
            str(launch / "plan.json"),
            "--exclude",
            "node1",
            "--out",
            str(tmp_path / "plan2.json"),
            "--json",
        ],
    )
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["lost_nodes"] == ["node1"] and doc["new"]["gpus"] == 2
    assert doc["new"]["global_batch"] == TRAINING.global_batch
    assert doc["resume"]["step"] == 4 and doc["resume"]["found_in"] == "launch.json"
    assert doc["resume"]["path"] == str(layout.step_dir(ckpt, 4)) and doc["resume"]["model_matches"]
    new = load_plan(tmp_path / "plan2.json")
    assert new.config.world_size == 2 and new.model == plan.model

    clean = tmp_path / "clean"
    shutil.copytree(layout.step_dir(ckpt, 4), layout.step_dir(clean, 4))
    resume = {"checkpoint_every": 2, "resume": True}
    cases = [
        {
            "name": "after-failure",
            "plan": str(tmp_path / "plan2.json"),
            "opts": {"checkpoint_dir": str(ckpt), **resume},
        },
        {
            "name": "clean",
            "plan": str(tmp_path / "plan2.json"),
            "opts": {"checkpoint_dir": str(clean), **resume},
        },
    ]
    out2 = tmp_path / "r2.json"
    _join(_start(2, cases, out2))
    got = json.loads(out2.read_text())
    assert len(got["after-failure"]) == STEPS - 4
    assert got["after-failure"] == got["clean"]
    want = _reference(tmp_path)
    assert max(abs(a - b) for a, b in zip(before, want[:4], strict=True)) <= TOLERANCE
    assert max(abs(a - b) for a, b in zip(got["after-failure"], want[4:], strict=True)) <= TOLERANCE
    assert layout.latest_step(ckpt) == STEPS


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_emitted_node_script_restarts_a_dead_worker_and_resumes(tmp_path: Path) -> None:
    """node0.sh as emitted, with real torchrun: rank 1 dies in step 3 of the first attempt;
    torchrun (--max-restarts=1) restarts both workers, which resume from step 2's checkpoint
    and finish; the losses are the uninterrupted run's."""
    import os
    import subprocess
    import sys

    from cli.launch_cmd import write_launch_dir
    from executor.emit import EmitOptions

    two = presets.load_cluster("cpu-2")
    plan = build_plan(
        model=GPT,
        training=TRAINING,
        cluster=two,
        config=ParallelConfig(tp=1, pp=1, dp=2, micro_batch=2),
        prediction={},
        source="analytic",
    )
    launch = tmp_path / "launch"
    write_launch_dir(plan, launch, EmitOptions(steps=4, checkpoint_every=2, max_restarts=1))
    metrics = tmp_path / "m.jsonl"
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {
        **os.environ,
        "PATH": path,
        "OMP_NUM_THREADS": "1",
        "MESHPLAN_RDZV_ENDPOINT": f"localhost:{_free_port()}",
        EXIT_ENV: "1:3",
    }
    run = subprocess.run(
        ["bash", str(launch / "node0.sh"), "--metrics", str(metrics), "--lr", str(LR)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SPAWN_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"failed (exitcode: {EXIT_CODE})" in run.stderr  # the first attempt did die
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert layout.complete_steps(launch / "checkpoints") == [2, 4]
    want = _reference(tmp_path)[:4]
    assert max(abs(r["loss"] - w) for r, w in zip(rows, want, strict=True)) <= TOLERANCE
