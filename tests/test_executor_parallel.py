"""Multi-process executor tests on CPU/gloo: every layout's losses match a single process.

Several layouts run one after another inside one set of spawned processes (each start costs
10-40 s on 2 cores), each layout in a fresh process group; the single-process references run in
the pytest process itself. Layouts that share processes use the default rank map: re-initialising
the default group in one process with a *different* rank map gave wrong DTensor results on torch
2.13 (stale state across groups), so the permuted rank map runs in its own processes (the
(2,2,2) test, and the torchrun test in test_executor_model.py). Real runs start one plan per
process, so they are not affected.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from executor_shapes import GPT, LLAMA

import presets
from executor.mesh import init_distributed
from executor.train import TrainOptions, train
from planner.parallel import ParallelConfig
from planner.plan import build_plan, load_plan, save_plan
from planner.specs import Dtype, ModelSpec, TrainingSpec

STEPS = 5
TOLERANCE = 1e-5  # fp32, issue 6
SPAWN_TIMEOUT_S = 300
LR = 1e-3  # large enough that 5 Adam steps move the loss visibly

LLAMA_TIED = replace(LLAMA, name="tiny-llama-tied", tied_embeddings=True)
TRAINING = TrainingSpec(global_batch=8, seq_len=16, dtype=Dtype.FP32)


def _plan(tmp: Path, name: str, model: ModelSpec, workers: int, **config: object) -> Path:
    """A plan on one host of `workers` CPU worker processes (the cpu-2 node type, resized)."""
    two = presets.load_cluster("cpu-2")
    cl = replace(two, name=f"cpu-{workers}", nodes=(replace(two.nodes[0], gpus=workers),))
    plan = build_plan(
        model=model,
        training=TRAINING,
        cluster=cl,
        config=ParallelConfig(**config),
        prediction={},
        source="analytic",
    )
    path = tmp / f"{name}.json"
    save_plan(plan, path)
    return path


def _worker(gpu_id: int, world: int, cases: list[dict], out: str) -> None:
    """Process `gpu_id` (torchrun's RANK) runs every case, each in a fresh process group ranked
    by that case's rank map (mesh.init_distributed)."""
    torch.set_num_threads(1)
    results = {}
    for i, case in enumerate(cases):
        plan = load_plan(case["plan"])
        init_distributed(plan, "gloo", gpu_id=gpu_id, store=dist.FileStore(f"{out}.{i}", world))
        try:
            results[case["name"]] = train(plan, TrainOptions(steps=STEPS, lr=LR, **case["opts"]))
        finally:
            dist.destroy_process_group()
    if gpu_id == 0:
        Path(out).write_text(json.dumps(results))


def _spawn(world: int, cases: list[dict], tmp: Path) -> dict[str, list[float]]:
    """Run `cases` in `world` spawned processes; the losses gpu 0 saw, by case name."""
    out = tmp / f"results_{world}.json"
    for c in cases:
        c["plan"] = str(c["plan"])
        c.setdefault("opts", {})
    ctx = mp.start_processes(
        _worker, args=(world, cases, str(out)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-process run did not finish in {SPAWN_TIMEOUT_S} s")
    return json.loads(out.read_text())


def _reference(plan_path: Path, **opts: object) -> list[float]:
    """Single-process losses for a (1,1,1) plan, in this process."""
    torch.set_num_threads(1)
    plan = load_plan(plan_path)
    init_distributed(plan, "gloo", gpu_id=0, store=dist.HashStore())
    try:
        return train(plan, TrainOptions(steps=STEPS, lr=LR, **opts))
    finally:
        dist.destroy_process_group()


def _max_diff(name: str, got: list[float], want: list[float]) -> float:
    assert len(got) == len(want), f"{name}: {len(got)} losses, want {len(want)}"
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


def _report(diffs: dict[str, float]) -> None:
    """Print every layout's max loss difference (shown with -s / on failure), then check all."""
    for name, diff in diffs.items():
        print(f"{name}: max |loss - single-process loss| = {diff:.2e}")
    bad = {n: d for n, d in diffs.items() if not d <= TOLERANCE}
    assert not bad, f"layouts off by more than {TOLERANCE}: {bad}"


@pytest.mark.slow
def test_two_process_layouts_match_single_process(tmp_path: Path) -> None:
    ref = {
        "gpt": _reference(_plan(tmp_path, "ref-gpt", GPT, 1, tp=1, pp=1, dp=1, micro_batch=2)),
        "llama-tied": _reference(
            _plan(tmp_path, "ref-tied", LLAMA_TIED, 1, tp=1, pp=1, dp=1, micro_batch=4)
        ),
        "llama": _reference(
            _plan(tmp_path, "ref-llama", LLAMA, 1, tp=1, pp=1, dp=1, micro_batch=4)
        ),
    }
    ckpt = tmp_path / "ckpt"
    cases = [
        dict(
            name="dp2-zero3",
            model="gpt",
            plan=_plan(tmp_path, "dp2", GPT, 2, tp=1, pp=1, dp=2, micro_batch=2, zero=3),
        ),
        dict(
            name="dp2-zero0",
            model="llama",
            plan=_plan(
                tmp_path,
                "dp2z0",
                LLAMA,
                2,
                tp=1,
                pp=1,
                dp=2,
                micro_batch=2,
                zero=0,
                recompute="selective",
            ),
        ),
        dict(
            name="pp2-1f1b-1+3",
            model="gpt",
            plan=_plan(
                tmp_path,
                "pp2",
                GPT,
                2,
                tp=1,
                pp=2,
                dp=1,
                micro_batch=2,
                stage_layers=(1, 3),
                recompute="full",
            ),
            opts=dict(checkpoint_dir=str(ckpt), checkpoint_every=3),
        ),
        dict(
            name="pp2-gpipe",
            model="llama",
            plan=_plan(
                tmp_path, "gpipe", LLAMA, 2, tp=1, pp=2, dp=1, micro_batch=4, schedule="gpipe"
            ),
        ),
        dict(
            name="tp2",
            model="llama",
            plan=_plan(tmp_path, "tp2", LLAMA, 2, tp=2, pp=1, dp=1, micro_batch=4),
            opts=dict(checkpoint_dir=str(tmp_path / "ckpt-tp2"), checkpoint_every=3),
        ),
        dict(
            name="tp2-tied-embeddings",
            model="llama-tied",
            plan=_plan(tmp_path, "tp2tied", LLAMA_TIED, 2, tp=2, pp=1, dp=1, micro_batch=4),
        ),
        dict(
            name="resume-tp2-same-plan",
            model="llama",
            plan=_plan(tmp_path, "tp2", LLAMA, 2, tp=2, pp=1, dp=1, micro_batch=4),
            opts=dict(checkpoint_dir=str(tmp_path / "ckpt-tp2"), resume=True),
        ),
        dict(
            name="tp2-sp",
            model="gpt",
            plan=_plan(
                tmp_path,
                "tp2sp",
                GPT,
                2,
                tp=2,
                pp=1,
                dp=1,
                micro_batch=2,
                sequence_parallel=True,
            ),
        ),
        dict(
            name="interleaved-pp2-v2",
            model="gpt",
            plan=_plan(
                tmp_path,
                "ilv",
                GPT,
                2,
                tp=1,
                pp=2,
                dp=1,
                micro_batch=2,
                schedule="interleaved",
                virtual_stages=2,
            ),
        ),
        dict(
            name="resume-dp2-from-pp2",
            model="gpt",
            plan=_plan(tmp_path, "dp2r", GPT, 2, tp=1, pp=1, dp=2, micro_batch=2, zero=3),
            opts=dict(checkpoint_dir=str(ckpt), resume=True),
        ),
    ]
    got = _spawn(2, cases, tmp_path)
    diffs = {}
    for c in cases:
        want = ref[c["model"]]
        if c["name"].startswith("resume"):
            want = want[3:]
        diffs[c["name"]] = _max_diff(c["name"], got[c["name"]], want)
    _report(diffs)
    # Resuming under the same plan repeats the uninterrupted run bit for bit.
    assert got["resume-tp2-same-plan"] == got["tp2"][3:]


@pytest.mark.slow
def test_pp2_dp2_tp2_with_permuted_rank_map_matches_single_process(tmp_path: Path) -> None:
    """(2,2,2) on 8 processes: 1F1B over an uneven 1+3 split, ZeRO-2 (FSDP2 without reshard),
    sequence-parallel TP on a Llama shape, and a rank map that is not torchrun's order."""
    want = _reference(_plan(tmp_path, "ref-llama", LLAMA, 1, tp=1, pp=1, dp=1, micro_batch=1))
    plan = _plan(
        tmp_path,
        "222",
        LLAMA,
        8,
        tp=2,
        pp=2,
        dp=2,
        micro_batch=1,
        zero=2,
        sequence_parallel=True,
        stage_layers=(1, 3),
        rank_to_gpu=(7, 6, 5, 4, 3, 2, 1, 0),
    )
    got = _spawn(8, [dict(name="pp2-dp2-tp2", plan=plan)], tmp_path)
    _report({"pp2-dp2-tp2": _max_diff("pp2-dp2-tp2", got["pp2-dp2-tp2"], want)})
