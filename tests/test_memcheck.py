"""`meshplan memcheck`: fake-tensor measurements agree with real allocations, report every stage
and kind, extrapolate to the same peak a full-depth run measures, and print one JSON document.

Every measurement runs in a spawned process (as `run_memcheck` does): a fake process group
leaves DTensor caches behind that would break later process groups in the pytest process.
The honesty check runs the same plan for real on CPU (real tensors under the fake process
group, so every collective's output is allocated as in a real run) and reads the CPU
allocator's own record of every allocation (torch.profiler, profile_memory=True), independent
of memcheck's tracker.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import presets
from planner.cost.estimate import estimate
from planner.parallel import ParallelConfig
from planner.plan import Plan, build_plan, save_plan
from planner.specs import Dtype, ModelSpec, TrainingSpec

# memcheck (fake tensors) against the same plan on real tensors, both seen by its tracker:
# the fake environment must not change what is allocated (bytes of optimizer step counters
# may differ). Unit: fraction.
FAKE_VS_REAL_TRACKED = 0.001
# Allocator-level peak (every allocation, incl. kernels' internal buffers that never surface
# as an op's output) over memcheck's peak, for these tiny models where such buffers weigh most:
# measured 1.05-1.09 on torch 2.13 CPU. memcheck must never exceed it. Unit: ratio.
ALLOCATOR_OVER_MEMCHECK_MAX = 1.12
# Layer and micro-batch extrapolation against a full-depth run: exact in our trials; the
# slack allows for rounding of the linear model. Unit: fraction.
EXTRAPOLATION_TOLERANCE = 0.002
CHILD_TIMEOUT_S = 1800  # a hang guard for busy hosts, not a speed check


def _cpu_cluster(workers: int) -> Any:
    two = presets.load_cluster("cpu-2")
    return replace(two, name=f"cpu-{workers}", nodes=(replace(two.nodes[0], gpus=workers),))


def _gpu_cluster(gpus: int, capacity_bytes: int | None = None) -> Any:
    node = presets.load_cluster("dgx-h100").nodes[0]
    gpu = (
        node.gpu
        if capacity_bytes is None
        else replace(node.gpu, usable_memory_bytes=capacity_bytes)
    )
    return replace(
        presets.load_cluster("dgx-h100"),
        name=f"h100-{gpus}",
        nodes=(replace(node, gpus=gpus, gpu=gpu),),
    )


def _plan(model: str | ModelSpec, cluster: Any, global_batch: int, **config: Any) -> Plan:
    spec = presets.load_model(model) if isinstance(model, str) else model
    cpu = cluster.nodes[0].gpu.kind.value == "cpu"
    training = TrainingSpec(
        global_batch=global_batch, seq_len=128, dtype=Dtype.FP32 if cpu else Dtype.BF16
    )
    cfg = ParallelConfig(**config)
    return build_plan(
        model=spec,
        training=training,
        cluster=cluster,
        config=cfg,
        prediction=estimate(spec, training, cluster, cfg).to_json(),
        source="analytic",
    )


def _in_child(fn: Callable[..., Any], *args: Any) -> Any:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        return pool.submit(fn, *args).result(timeout=CHILD_TIMEOUT_S)


def _live_storage_bytes() -> int:
    """Bytes of every CPU tensor storage alive in the process (found through the GC)."""
    from torch.distributed._tools.common_utils import get_untyped_storages

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            for st in get_untyped_storages(obj):
                if st.device.type == "cpu":
                    seen[id(st)] = st.nbytes()
    return sum(seen.values())


class _AllocatorPeak:
    """Live bytes at the start of the wrapped region plus the highest running sum of the CPU
    allocator's allocation (+) and free (-) events inside it."""

    peak_bytes = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        start = _live_storage_bytes()
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            yield
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        running = top = 0
        for _, nbytes in deltas:
            running += nbytes
            top = max(top, running)
        self.peak_bytes = start + top


def _real_and_fake(plan: Plan, pp_rank: int) -> tuple[int, int, int]:
    """(allocator peak of the real run, memcheck's tracker on the real run, memcheck)."""
    from executor.memcheck import measure_rank

    torch.set_num_threads(1)
    allocator = _AllocatorPeak()
    real = measure_rank(plan, pp_rank, steps=2, fake=False, around_measured=allocator)
    fake = measure_rank(plan, pp_rank, steps=2)
    return allocator.peak_bytes, real.peak[0], fake.peak[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "workers", "config"),
    [
        ("tiny-llama", 1, dict(tp=1, pp=1, dp=1, micro_batch=2)),
        ("tiny-gpt", 4, dict(tp=2, pp=1, dp=2, micro_batch=2, zero=3)),
        ("tiny-llama", 4, dict(tp=2, pp=2, dp=1, micro_batch=2, sequence_parallel=True)),
    ],
    ids=["single", "tp2-dp2-zero3", "tp2-pp2-sp"],
)
def test_memcheck_matches_real_cpu_allocations(model: str, workers: int, config: dict) -> None:
    plan = _plan(model, _cpu_cluster(workers), 8, **config)
    allocator, tracked_real, memcheck = _in_child(_real_and_fake, plan, 0)
    print(f"allocator {allocator} B, tracked real {tracked_real} B, memcheck {memcheck} B")
    assert abs(memcheck - tracked_real) <= FAKE_VS_REAL_TRACKED * tracked_real
    assert memcheck <= allocator <= ALLOCATOR_OVER_MEMCHECK_MAX * memcheck


def _chunk_param_elements(plan: Plan, pp_rank: int) -> int:
    """Parameter elements of pipeline rank `pp_rank` at tp = dp = 1."""
    from executor.model import Transformer
    from executor.pp import local_chunks, prune_to_chunk

    elements = 0
    for stage in local_chunks(plan, pp_rank):
        with torch.device("meta"):
            chunk = prune_to_chunk(Transformer(plan.model, tie_embeddings=False), stage)
        elements += sum(p.numel() for p in chunk.parameters())
    return elements


def test_cpu_plan_counts_parameters_and_optimizer_state_exactly() -> None:
    from executor.memcheck import run_memcheck

    plan = _plan("tiny-llama", _cpu_cluster(2), 8, tp=1, pp=2, dp=1, micro_batch=2)
    report = run_memcheck(plan)
    for stage in report.stages:
        elements = _chunk_param_elements(plan, stage.pp_rank)
        kinds = stage.measured.by_kind_bytes
        assert kinds["parameters"] == 4 * elements  # fp32 on CPU workers
        # Two fp32 moments per element; AdamW's step counters are host scalars (on CUDA too),
        # which memcheck leaves out.
        assert kinds["optimizer_state"] == 8 * elements


def test_tiny_gpu_plans_report_every_stage_and_kind() -> None:
    from executor.memcheck import run_memcheck

    plan = _plan(
        "tiny-llama",
        _gpu_cluster(8),
        16,
        tp=2,
        pp=2,
        dp=2,
        micro_batch=2,
        zero=1,
        sequence_parallel=True,
        recompute="full",  # checkpoint recomputation runs the CUDA norm shims again
    )
    report = run_memcheck(plan, jobs=2)
    assert [s.pp_rank for s in report.stages] == [0, 1]
    capacity = plan.cluster.nodes[0].gpu.capacity_bytes
    for stage in report.stages:
        kinds = stage.measured.by_kind_bytes
        for kind in (
            "parameters",
            "gathered_parameters",
            "gradients",
            "optimizer_state",
            "activations",
            "pipeline_buffers",
        ):
            assert kinds[kind] > 0, kind
        assert sum(kinds.values()) == stage.measured.peak_bytes
        assert all(v % 512 == 0 for v in kinds.values())  # CUDA blocks
        assert stage.predicted_bytes is not None and stage.capacity_bytes == capacity
        assert stage.required_bytes > stage.measured.peak_bytes and stage.fits
    doc = report.to_json()
    assert doc["fits"] is True and len(doc["stages"]) == 2
    assert set(doc["stages"][0]["predicted_by_kind"]) >= {"weights", "grads", "optimizer"}


def _extrapolated_and_exact(plan: Plan, pp_rank: int) -> tuple[Any, Any]:
    from executor.memcheck import measure_stage

    torch.set_num_threads(1)
    return (
        measure_stage(plan, pp_rank, steps=2, exact=False),
        measure_stage(plan, pp_rank, steps=2, exact=True),
    )


def _deep(layers: int) -> ModelSpec:
    return replace(presets.load_model("tiny-llama"), name=f"tiny-llama-{layers}", layers=layers)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("plan_args", "pp_rank", "layers_from", "micro_batches_from"),
    [
        # 6 blocks per stage (> 2k = 4) and 8 micro-batches (> 3 pp = 6), the last stage
        # (tp = 1: extrapolation is over layers and micro-batches; DTensor TP under fake
        # tensors took 110 s of the suite and is covered by the other memcheck tests)
        (dict(tp=1, pp=2, dp=1, micro_batch=2), 1, (2, 4), (4, 6)),
        # chunks of 5 and 4 blocks on rank 1 (one run per chunk), 12 micro-batches (> 2 pp v + pp)
        (dict(tp=1, pp=2, dp=1, micro_batch=1, schedule="interleaved", virtual_stages=2), 1, (4, 6), (8, 10)),
    ],
    ids=["1f1b-last-rank", "interleaved-uneven-chunks"],
)  # fmt: skip
def test_extrapolation_matches_a_full_depth_run(
    plan_args: dict, pp_rank: int, layers_from: tuple, micro_batches_from: tuple
) -> None:
    gpus = plan_args["tp"] * plan_args["pp"]
    layers, batch = (19, 12) if plan_args.get("schedule") == "interleaved" else (12, 16)
    plan = _plan(_deep(layers), _gpu_cluster(gpus), batch, **plan_args)
    approx, exact = _in_child(_extrapolated_and_exact, plan, pp_rank)
    assert approx.extrapolated_from_layers == layers_from
    assert approx.extrapolated_from_micro_batches == micro_batches_from
    assert exact.extrapolated_from_layers is None and exact.runs == 1
    assert abs(approx.peak_bytes - exact.peak_bytes) <= EXTRAPOLATION_TOLERANCE * exact.peak_bytes
    for kind, value in exact.by_kind_bytes.items():
        assert abs(approx.by_kind_bytes[kind] - value) <= EXTRAPOLATION_TOLERANCE * exact.peak_bytes


def test_fused_rms_norm_shim_matches_torch_and_keeps_one_activation() -> None:
    from executor.fake_dist import cuda_kernels

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cuda_kernels():
        got = F.rms_norm(x, (16,), w, 1e-5)
    got.backward(torch.ones_like(got))
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    want = F.rms_norm(x, (16,), w, 1e-5)
    want.backward(torch.ones_like(want))
    assert torch.allclose(got, want) and torch.allclose(gx, x.grad) and torch.allclose(gw, w.grad)
    # CUDA's fused kernel keeps the input and rstd; the CPU decomposition also keeps x * rstd.
    assert saved.count((2, 5, 16)) == 1


_CLI = (
    "import sys, cli.main as m\n"
    "if 'cli.memcheck_cmd' not in m.COMMAND_MODULES:\n"
    "    m.COMMAND_MODULES = (*m.COMMAND_MODULES, 'cli.memcheck_cmd')\n"
    "sys.exit(m.main(sys.argv[1:]))\n"
)


def _with_memcheck(modules: tuple[str, ...]) -> tuple[str, ...]:
    return modules if "cli.memcheck_cmd" in modules else (*modules, "cli.memcheck_cmd")


def _meshplan(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with memcheck registered, in a subprocess (the real stdout descriptor)."""
    return subprocess.run(
        [sys.executable, "-c", _CLI, *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )


def test_json_is_one_document_and_a_plan_that_does_not_fit_exits_3(tmp_path: Path) -> None:
    from planner.cost.memory import FRAMEWORK_RESERVE_BYTES

    # GPUs with room for the framework reserve and 1 MiB of tensors: nothing real fits.
    small = _gpu_cluster(2, capacity_bytes=int(FRAMEWORK_RESERVE_BYTES) + 2**20)
    path = tmp_path / "plan.json"
    save_plan(_plan("tiny-gpt", small, 8, tp=1, pp=2, dp=1, micro_batch=2), path)
    r = _meshplan("memcheck", str(path), "--json")
    assert r.returncode == 3, r.stderr[-2000:]
    doc, end = json.JSONDecoder().raw_decode(r.stdout.lstrip())
    assert r.stdout.lstrip()[end:].strip() == ""
    assert doc["fits"] is False and [s["pp_rank"] for s in doc["stages"]] == [0, 1]
    assert all(s["measured_bytes"] > 0 and not s["fits"] for s in doc["stages"])
    assert "pp rank 1:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--steps", "1"), "--steps 1: must be >= 2"),
        (("--pp-rank", "5"), "pipeline rank 5 is outside the plan's 0..1"),
        (("--jobs", "0"), "--jobs 0: must be a positive integer"),
    ],
)
def test_bad_options_are_one_error_line(
    args: tuple[str, ...],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    import cli.main

    path = tmp_path / "plan.json"
    save_plan(_plan("tiny-gpt", _gpu_cluster(2), 8, tp=1, pp=2, dp=1, micro_batch=2), path)
    monkeypatch.setattr(cli.main, "COMMAND_MODULES", _with_memcheck(cli.main.COMMAND_MODULES))
    assert cli.main.main(["memcheck", str(path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"] or (len(err) == 1 and message in err[0])


def test_missing_plan_is_an_error(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import cli.main

    monkeypatch.setattr(cli.main, "COMMAND_MODULES", _with_memcheck(cli.main.COMMAND_MODULES))
    assert cli.main.main(["memcheck", "no-such-plan.json"]) == 2
    assert capsys.readouterr().err.strip() == "error: plan file not found: no-such-plan.json"
