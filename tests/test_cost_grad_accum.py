"""Gradient accumulation and the DP wrapper's copies (planner/cost/grad_accum.py).

The byte rules are checked against torch itself: a dispatch mode counts what the ops that touch
parameter-sized tensors read and write while FSDP2 (under a process group that communicates
nothing) and autocast run micro-batches exactly as the executor drives them.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers "fake")
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import presets
from planner.cost.analytic import DEFAULT_CONSTANTS
from planner.cost.grad_accum import StepShape, grad_traffic
from planner.cost.kernels import memory_bound_s
from planner.cost.memory import tp_rank_params
from planner.cost.rankcosts import build_rank_costs
from planner.parallel import ParallelConfig, Recompute
from planner.profile import (
    SCHEMA_VERSION,
    BlockKind,
    ComputeRecord,
    Profile,
    ProfileGpu,
    ProfileMeta,
)
from planner.runtime import EXECUTOR, MEGATRON_2021, GradAccumulation
from planner.specs import Dtype, TrainingSpec

FSDP2 = GradAccumulation.FSDP2
IN, OUT = 64, 96  # the weight has 6,144 elements; no activation of these tests has that many
N = IN * OUT
ROWS = 8


def _shape(**kw: object) -> StepShape:
    base = dict(micro_batches=3, compute_bytes=2, grad_bytes=4, dp=2, zero=1, pp=1,
                reduce_every_micro_batch=False)  # fmt: skip
    base.update(kw)
    return StepShape(**base)  # type: ignore[arg-type]


# Not HBM traffic of the compute stream: allocation, the collectives themselves (comm.py),
# the all-gather's copy-in of the local shard (1/dp of the parameter), views, and the matmul
# that computes the weight's gradient (the block's own compute).
SKIPPED = ("aten::empty", "c10d::", "fsdp::all_gather_copy_in", "aten::mm", "aten::t",
           "aten::detach")  # fmt: skip


class ParamTraffic(TorchDispatchMode):
    """Bytes that ops read from and write to tensors of exactly N elements (one parameter's
    size): positional tensor inputs are read (copy_ reads only its source), the outputs and
    `out=` buffers written."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = {"forward": 0, "backward": 0}
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if func.is_view or name.startswith(SKIPPED):
            return out
        reads = args[1:] if name == "aten::copy_" else args
        read = sum(t.nbytes for t in tree_flatten(reads)[0] if _sized(t))
        outputs = tree_flatten((out, kwargs.get("out")))[0]
        written = sum(t.nbytes for t in outputs if _sized(t))
        self.bytes[self.phase] += read + written
        return out


def _sized(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.numel() == N


def _run_fsdp2(m: int, *, zero: int, pipelined: bool, reduce_every: bool) -> dict[str, int]:
    """m micro-batches of one Linear under FSDP2 over 2 fake ranks, as executor/dp.py wraps
    it (bf16 parameters, fp32 reduction) and train.py / torch pipelining sync it."""
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (2,))
        model = nn.Linear(IN, OUT, bias=False)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(model, mesh=mesh, reshard_after_forward=zero >= 3, mp_policy=mp)
        if pipelined:  # what torch.distributed.pipelining's stage.py sets on FSDP modules
            model.set_reshard_after_backward(False)
        counter = ParamTraffic()
        x = torch.randn(ROWS, IN)
        with counter:
            for i in range(m):
                model.set_requires_gradient_sync(reduce_every or i == m - 1)
                counter.phase = "forward"
                y = model(x)
                counter.phase = "backward"
                y.float().sum().backward()
        return counter.bytes
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("zero", "pipelined", "reduce_every"),
    [(1, False, False), (1, True, False), (3, False, True), (2, True, False)],
    ids=["zero1-pp1", "zero1-pipelined", "zero3-pp1-reduce-every", "zero2-pipelined"],
)
def test_fsdp2_bytes_are_what_torch_streams(zero: int, pipelined: bool, reduce_every: bool) -> None:
    m = 3
    measured = _run_fsdp2(m, zero=zero, pipelined=pipelined, reduce_every=reduce_every)
    shape = _shape(micro_batches=m, zero=zero, pp=2 if pipelined else 1,
                   reduce_every_micro_batch=reduce_every)  # fmt: skip
    t = grad_traffic(FSDP2, shape)
    assert m * N * t.forward_bytes == measured["forward"]
    assert m * N * t.backward_bytes == measured["backward"]


def test_autocast_master_weights_without_dp_are_what_torch_streams() -> None:
    """dp = 1: fp32 weights, CPU autocast casting the linear's weight as CUDA's does."""
    m = 3
    model = nn.Linear(IN, OUT, bias=False)
    counter = ParamTraffic()
    x = torch.randn(ROWS, IN)
    with counter:
        for _ in range(m):
            counter.phase = "forward"
            with torch.autocast("cpu", dtype=torch.bfloat16):  # one region per micro-batch
                y = model(x)
            counter.phase = "backward"
            y.float().sum().backward()
    t = grad_traffic(FSDP2, _shape(micro_batches=m, dp=1, zero=0))
    assert m * N * t.forward_bytes == counter.bytes["forward"]
    assert m * N * t.backward_bytes == counter.bytes["backward"]


def test_hand_counted_bytes() -> None:
    """gpt3-175b's winner shape (96 micro-batches, pp 16, ZeRO-1, bf16 / fp32): cast 6,
    95 adds of 10, copy-in 8 per parameter; one gather copy-out of 4."""
    t = grad_traffic(FSDP2, _shape(micro_batches=96, pp=16, dp=16))
    assert t.backward_bytes * 96 == pytest.approx(6 + 95 * 10 + 8)
    assert t.forward_bytes * 96 == pytest.approx(4)
    # one micro-batch: nothing accumulates, the copy-in reads the bf16 gradient
    one = grad_traffic(FSDP2, _shape(micro_batches=1, zero=0))
    assert (one.forward_bytes, one.backward_bytes) == (0.0, 6.0)
    # fp32 training on CPU workers: no accumulator, autograd adds; no casts
    cpu = grad_traffic(FSDP2, _shape(micro_batches=4, compute_bytes=4, zero=0))
    assert cpu.backward_bytes * 4 == pytest.approx(3 * 4 * 3 + 8)
    # Megatron 2021 (fp16 main_grad): read both, write the buffer, every micro-batch
    meg = grad_traffic(GradAccumulation.MAIN_GRAD_BUFFER, _shape(grad_bytes=2))
    assert (meg.forward_bytes, meg.backward_bytes) == (0.0, 6.0)
    flat = grad_traffic(GradAccumulation.FSDP1_FLAT, _shape())
    assert (flat.forward_bytes, flat.backward_bytes) == (0.0, 0.0)


def test_analytic_block_backward_pays_the_accumulation() -> None:
    model = presets.load_model("gpt3-175b")
    cluster = presets.load_cluster("dgx-a100-80gb", 16)
    training = TrainingSpec(global_batch=256, seq_len=2048, flash_attention=True)
    cfg = ParallelConfig(tp=8, pp=8, dp=2, micro_batch=1, zero=1)
    none = replace(EXECUTOR, grad_accumulation=GradAccumulation.FSDP1_FLAT)  # streams nothing
    with_acc = build_rank_costs(model, training, cluster, cfg, None, DEFAULT_CONSTANTS, EXECUTOR)
    without = build_rank_costs(model, training, cluster, cfg, None, DEFAULT_CONSTANTS, none)
    t = grad_traffic(FSDP2, _shape(micro_batches=128, pp=8, dp=2))
    per_block = tp_rank_params(model, 8, 8).per_block
    gpu = cluster.nodes[0].gpu
    grown = with_acc.block[1].bwd_compute_s - without.block[1].bwd_compute_s
    assert grown == pytest.approx(
        memory_bound_s(per_block * t.backward_bytes, gpu, DEFAULT_CONSTANTS)
    )
    assert grown > 0.05 * without.block[1].bwd_compute_s  # 10 B per parameter at 2,048 tokens
    meg = build_rank_costs(model, training, cluster, cfg, None, DEFAULT_CONSTANTS, MEGATRON_2021)
    assert meg.block[1].bwd_compute_s < with_acc.block[1].bwd_compute_s


def _gpu_profile(model: object, tp: int, dtype: Dtype) -> Profile:
    """One measured transformer-block record (micro-batch 2, seq 128) on an A100."""
    rec = ComputeRecord(
        block=BlockKind.TRANSFORMER_BLOCK, device_name="NVIDIA A100-SXM4-80GB", tp=tp,
        micro_batch=2, seq_len=128, recompute=Recompute.NONE, forward_s=0.001,
        forward_spread_s=0.0, backward_s=0.002, backward_spread_s=0.0, activation_bytes=1000,
        parameter_bytes=10, repeats=5,
    )  # fmt: skip
    meta = ProfileMeta(
        hosts=("h",), device_kind="gpu", torch_version="x", dtype=dtype, date="2026-12-02",
        method="test", model=model,
    )  # fmt: skip
    gpus = tuple(
        ProfileGpu(gpu_id=i, host="h", local_index=i, device_name=rec.device_name, memory_bytes=1)
        for i in range(8)
    )
    return Profile(schema_version=SCHEMA_VERSION, meta=meta, gpus=gpus, compute=(rec,))


@pytest.mark.parametrize("dtype", [Dtype.BF16, Dtype.FP32])
def test_a_measured_block_pays_only_what_its_profile_did_not_stream(dtype: Dtype) -> None:
    """The profiler's repeats add each gradient into .grad (3 x the profile's bytes per
    parameter); FSDP2's fp32 accumulator streams 10 B per later micro-batch: a bf16 profile's
    block gets the excess, an fp32 one (CPU profiles) nothing more."""
    model = presets.load_model("tiny-gpt")
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    training = TrainingSpec(global_batch=64, seq_len=128, dtype=dtype)
    cfg = ParallelConfig(tp=2, pp=1, dp=4, micro_batch=2, zero=0)
    profile = _gpu_profile(model, 2, dtype)
    none = replace(EXECUTOR, grad_accumulation=GradAccumulation.FSDP1_FLAT)
    with_acc = build_rank_costs(model, training, cluster, cfg, profile, DEFAULT_CONSTANTS, EXECUTOR)
    without = build_rank_costs(model, training, cluster, cfg, profile, DEFAULT_CONSTANTS, none)
    assert with_acc.source == "measured"
    c = dtype.nbytes
    t = grad_traffic(FSDP2, _shape(micro_batches=8, compute_bytes=c, zero=0, dp=4))
    per_block = tp_rank_params(model, 2, 1).per_block
    excess = max(0.0, t.backward_bytes - 3 * c) * per_block
    grown = with_acc.block[0].bwd_compute_s - without.block[0].bwd_compute_s
    gpu = cluster.nodes[0].gpu
    assert grown == pytest.approx(memory_bound_s(excess, gpu, DEFAULT_CONSTANTS), abs=1e-15)
    assert (grown > 0) == (dtype is Dtype.BF16)
