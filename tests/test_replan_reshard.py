"""A checkpoint written under one plan loads under others with identical model and optimizer state.

The writer trains 2 steps under pp=2 with an uneven 3+1 layer split and a permuted rank map,
and saves. Readers in other processes load it under tp=2 and under dp=2 ZeRO-3 (FSDP2 shards),
gather the full model and Adam state (`full_state_dict`), and must equal, bit for bit, what one
process loads from the same files. Losses after such a resume are checked in
tests/test_executor_parallel.py and tests/test_replan_e2e.py; this compares the state itself.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from executor_shapes import LLAMA

import presets
from planner.parallel import ParallelConfig
from planner.plan import Plan, build_plan, load_plan, save_plan
from planner.specs import Dtype, TrainingSpec

TRAINING = TrainingSpec(global_batch=8, seq_len=16, dtype=Dtype.FP32)
SPAWN_TIMEOUT_S = 300
LR = 1e-3


def _plan(tmp: Path, name: str, workers: int, **config: object) -> Path:
    two = presets.load_cluster("cpu-2")
    cluster = replace(two, name=f"cpu-{workers}", nodes=(replace(two.nodes[0], gpus=workers),))
    plan = build_plan(
        model=LLAMA,
        training=TRAINING,
        cluster=cluster,
        config=ParallelConfig(**config),  # type: ignore[arg-type]
        prediction={},
        source="analytic",
    )
    save_plan(plan, tmp / f"{name}.json")
    return tmp / f"{name}.json"


def _plain(v: object) -> object:
    """A tensor as a detached copy; hyper-parameters (lr, betas, None flags) as they are."""
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _full_state(plan: Plan, root: Path) -> dict[str, object]:
    """Build the plan's model and optimizers, load step 2, gather everything to full tensors."""
    import os

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from executor.checkpoint import load_checkpoint
    from executor.device import make_runtime
    from executor.mesh import build_mesh
    from executor.parallelize import parallelize
    from executor.train import ADAM_BETAS, WEIGHT_DECAY

    rt = make_runtime(
        "cpu",
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=dist.get_world_size(),
        dtype=plan.training.dtype,
    )
    model = parallelize(plan, build_mesh(plan, "cpu"), rt, seed=0)
    optims = [
        torch.optim.AdamW(m.parameters(), lr=LR, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
        for m in model.modules
    ]
    assert load_checkpoint(root, 2, model, optims, plan) == 2
    full = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    out: dict[str, object] = {}
    for module, optim in zip(model.modules, optims, strict=True):
        msd, osd = get_state_dict(module, optim, options=full)
        out.update({f"model.{k}": _plain(v) for k, v in msd.items()})
        out.update({f"optim.{k}": _plain(v) for k, v in osd.items()})
    return out


def _worker(gpu_id: int, world: int, job: dict) -> None:
    from executor.mesh import init_distributed
    from executor.train import TrainOptions, train

    torch.set_num_threads(1)
    for i, case in enumerate(job["cases"]):
        plan = load_plan(case["plan"])
        store = dist.FileStore(f"{job['store']}.{i}", world)
        init_distributed(plan, "gloo", gpu_id=gpu_id, store=store)
        try:
            if case["write"]:
                train(
                    plan,
                    TrainOptions(steps=2, lr=LR, checkpoint_dir=job["root"], checkpoint_every=2),
                )
            else:
                state = _full_state(plan, Path(job["root"]))
                if dist.get_rank() == 0:
                    torch.save(state, case["out"])
        finally:
            dist.destroy_process_group()


def _spawn(world: int, job: dict) -> None:
    ctx = mp.start_processes(
        _worker, args=(world, job), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-process run did not finish in {SPAWN_TIMEOUT_S} s")


@pytest.mark.slow
def test_checkpoint_loads_under_other_layouts_with_identical_state(tmp_path: Path) -> None:
    from executor.mesh import init_distributed

    root = tmp_path / "ckpt"
    writer = _plan(
        tmp_path, "pp2", 2, tp=1, pp=2, dp=1, micro_batch=2, stage_layers=(3, 1), rank_to_gpu=(1, 0)
    )
    _spawn(
        2,
        {
            "root": str(root),
            "store": str(tmp_path / "w"),
            "cases": [{"plan": str(writer), "write": True}],
        },
    )
    readers = {
        "tp2": _plan(tmp_path, "tp2", 2, tp=2, pp=1, dp=1, micro_batch=4),
        "dp2-zero3": _plan(tmp_path, "dp2", 2, tp=1, pp=1, dp=2, micro_batch=2, zero=3),
    }
    cases = [
        {"plan": str(p), "write": False, "out": str(tmp_path / f"{name}.pt")}
        for name, p in readers.items()
    ]
    _spawn(2, {"root": str(root), "store": str(tmp_path / "r"), "cases": cases})
    one = load_plan(_plan(tmp_path, "one", 1, tp=1, pp=1, dp=1, micro_batch=4))
    init_distributed(one, "gloo", gpu_id=0, store=dist.HashStore())
    try:
        want = _full_state(one, root)
    finally:
        dist.destroy_process_group()
    # pp=2 unties the embeddings; one process and the readers hold the same (untied) keys.
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in want)
    steps = {
        float(v) for k, v in want.items() if k.startswith("optim.state.") and k.endswith(".step")
    }  # type: ignore[arg-type]
    assert steps == {2.0}, steps  # the trained state was loaded, not a fresh one
    for name in readers:
        got = torch.load(tmp_path / f"{name}.pt", weights_only=False)
        assert set(got) == set(want), (name, set(got) ^ set(want))
        diff = [k for k in want if not _same(got[k], want[k])]
        assert not diff, f"{name}: {diff[:5]}"
