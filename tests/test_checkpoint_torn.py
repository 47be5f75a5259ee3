"""A checkpoint save killed mid-way never becomes `latest`, and the wrong model is refused.

The writer is a real `python -m executor.train` process that stops inside the save of step 4
(executor/faults.py: MESHPLAN_FAULT_SAVE_HANG) and says so in a file; the test then kills it
with SIGKILL, so where it dies is fixed by the phase, not by timing. Resuming afterwards loads
step 2 and repeats the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from executor_shapes import GPT

import presets
from executor import checkpoint_dir as layout
from executor.mesh import init_distributed
from executor.train import TrainOptions, train
from planner.parallel import ParallelConfig
from planner.plan import Plan, build_plan, save_plan
from planner.specs import Dtype, ModelSpec, TrainingSpec

READY_TIMEOUT_S = 180
LR = 1e-3


def _plan(model: ModelSpec = GPT) -> Plan:
    one = presets.load_cluster("cpu-2")
    cluster = replace(one, name="cpu-1", nodes=(replace(one.nodes[0], gpus=1),))
    return build_plan(
        model=model,
        training=TrainingSpec(global_batch=4, seq_len=16, dtype=Dtype.FP32),
        cluster=cluster,
        config=ParallelConfig(tp=1, pp=1, dp=1, micro_batch=2),
        prediction={},
        source="analytic",
    )


def _run_here(plan: Plan, **opts: object) -> list[float]:
    """train() in this process (one rank, an in-memory store)."""
    torch.set_num_threads(1)
    init_distributed(plan, "gloo", gpu_id=0, store=dist.HashStore())
    try:
        return train(plan, TrainOptions(lr=LR, **opts))  # type: ignore[arg-type]
    finally:
        dist.destroy_process_group()


def _kill_inside_save(tmp: Path, root: Path, phase: str) -> None:
    """Start a writer that saves steps 2 and 4, stops in step 4's save at `phase`; SIGKILL it."""
    plan_path = tmp / "plan.json"
    save_plan(_plan(), plan_path)
    ready = tmp / f"ready-{phase}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MESHPLAN_FAULT_SAVE_HANG": f"{phase}:4",
        "MESHPLAN_FAULT_READY": str(ready),
    }
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "executor.train", "--plan", str(plan_path), "--device", "cpu"]
    cmd += ["--steps", "6", "--lr", str(LR), "--checkpoint-dir", str(root)]
    cmd += ["--checkpoint-every", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, f"the writer never reached {phase}"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("phase", ["dcp_finish", "publish"])
def test_a_save_killed_mid_way_is_never_latest_and_resume_repeats_the_run(
    tmp_path: Path, phase: str
) -> None:
    root = tmp_path / "ckpt"
    _kill_inside_save(tmp_path, root, phase)
    torn = layout.partial_dir(root, 4)
    # The killed save wrote shards (and at `publish` DCP's own index too), but no step_4.
    assert any(p.name.endswith(".distcp") for p in torn.iterdir())
    assert (torn / layout.DCP_METADATA).is_file() == (phase == "publish")
    assert not layout.step_dir(root, 4).exists()
    assert (root / layout.LATEST).read_text().strip() == "step_00000002"
    assert layout.latest_step(root) == 2 and layout.complete_steps(root) == [2]
    fp = layout.model_fingerprint(GPT)
    with pytest.raises(layout.CheckpointError, match="torn"):
        layout.check_loadable(root, 4, fp, GPT.name)
    # A stale pointer at the torn step (a hand edit, say) still resolves to a complete one.
    (root / layout.LATEST).write_text("step_00000004\n")
    assert layout.latest_step(root) == 2

    plan = _plan()
    want = _run_here(plan, steps=6)
    got = _run_here(plan, steps=6, checkpoint_dir=str(root), checkpoint_every=2, resume=True)
    assert got == want[2:]
    assert layout.complete_steps(root) == [2, 4, 6] and layout.latest_step(root) == 6
    assert not torn.exists()


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _run_here(_plan(), steps=2, checkpoint_dir=str(root), checkpoint_every=2)
    assert layout.latest_step(root) == 2
    record = layout.read_record(layout.step_dir(root, 2))
    assert record is not None and record.model_fingerprint == layout.model_fingerprint(GPT)
    assert record.layout.startswith("tp=1 pp=1 dp=1 cp=1 ep=1") and record.world_size == 1
    wider = replace(GPT, name="tiny-gpt-wide", ffn_hidden=96)
    with pytest.raises(layout.CheckpointError, match="holds model 'tiny-gpt'.*'tiny-gpt-wide'"):
        _run_here(_plan(wider), steps=4, checkpoint_dir=str(root), resume=True)
    # The name alone is not the architecture: a renamed copy of the model loads.
    renamed = replace(GPT, name="tiny-gpt-renamed")
    assert layout.model_fingerprint(renamed) == layout.model_fingerprint(GPT)
    assert len(_run_here(_plan(renamed), steps=3, checkpoint_dir=str(root), resume=True)) == 1
