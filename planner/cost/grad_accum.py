"""HBM traffic of gradient accumulation and of the data-parallel wrapper's copies.

Owns: the bytes per locally held parameter that a runtime streams on the compute stream to sum
the micro-batches' gradients of a step and to stage them for, and unpack parameters from, its
data-parallel collectives (`planner.runtime.GradAccumulation` says which runtime does what).
These are memory-bound kernels outside any block's own compute, paid once per parameter and
not per token, so they weigh most where a micro-batch has few tokens per parameter (small
micro-batches on large pipeline stages): a bf16 rank that adds 10 B per parameter per
micro-batch at 2,048 tokens spends about a tenth of its GEMM time (6 x 2,048 FLOPs per
parameter, forward and backward) on it on an A100, whose ridge point is ~150 FLOPs/B.
Does not own: the collectives themselves (comm.py, dp_sync.py), or the time of a byte
(kernels.memory_bound_s); rank_compute.py adds the result to the analytic parts' passes. A
measured block already holds autograd's accumulation (the profiler never clears gradients
between its repeats), so a measured part gets only what the runtime streams beyond it
(`profiled_accumulation_bytes`): on a bf16 GPU profile FSDP2's fp32 accumulator and copies,
on an fp32 CPU profile nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.kernels import KernelConstants, memory_bound_s
from planner.cost.memory import RankParams, tp_rank_params
from planner.parallel import ParallelConfig
from planner.runtime import GradAccumulation, RuntimeSemantics
from planner.specs import GpuSpec, ModelSpec, TrainingSpec

FP32_BYTES = 4  # the executor's master weights (and their gradients) without a DP wrapper


@dataclass(frozen=True, kw_only=True)
class GradTraffic:
    """Bytes per locally held parameter per micro-batch (the step's total over m): the
    forward's and the backward's share."""

    forward_bytes: float
    backward_bytes: float


@dataclass(frozen=True, kw_only=True)
class StepShape:
    """What decides the traffic: micro-batches per step, the compute dtype's and the gradient
    (reduce) dtype's bytes, data-parallel group size, ZeRO stage, pipeline degree, and whether
    the runtime reduce-scatters after every micro-batch at pp = 1 (ZeRO-2/3 that keep
    gradients sharded)."""

    micro_batches: int
    compute_bytes: int
    grad_bytes: int
    dp: int
    zero: int
    pp: int
    reduce_every_micro_batch: bool


def grad_traffic(kind: GradAccumulation, s: StepShape) -> GradTraffic:
    """Per-micro-batch mean bytes per local parameter for runtime `kind` (see the rules)."""
    m = s.micro_batches
    if kind is GradAccumulation.MAIN_GRAD_BUFFER:
        # main_grad.add_(grad) after every micro-batch: read both, write the buffer. PTD-P's
        # pp = 1 rows ran torch DDP instead (autograd adds the micro-batches after the first,
        # the same bytes): priced alike, one micro-batch's add apart
        return GradTraffic(forward_bytes=0.0, backward_bytes=s.compute_bytes + 2 * s.grad_bytes)
    if kind is GradAccumulation.FSDP1_FLAT:
        # views of flat buffers; the cast to the reduce dtype runs on FSDP1's post-backward
        # stream beside compute, like the collective it feeds
        return GradTraffic(forward_bytes=0.0, backward_bytes=0.0)
    if s.dp == 1:
        total_f, total_b = _autocast_master_weights(s)
    else:
        total_f, gathered_b = _fsdp2_gathers(s)
        total_b = gathered_b + _fsdp2_reductions(s)
    return GradTraffic(forward_bytes=total_f / m, backward_bytes=total_b / m)


def part_traffic_bytes(
    runtime: RuntimeSemantics,
    config: ParallelConfig,
    training: TrainingSpec,
    params: RankParams,
) -> tuple[dict[str, tuple[float, float]], GradTraffic]:
    """(forward, backward) bytes per micro-batch that gradient accumulation and the DP
    wrapper's copies stream for each part of one rank, and the dense bytes per parameter;
    routed experts are their own FSDP units over the expert-data-parallel group (dp / ep)."""

    def per_param(dp: int) -> GradTraffic:
        return grad_traffic(
            runtime.grad_accumulation,
            StepShape(
                micro_batches=config.num_micro_batches(training),
                compute_bytes=training.dtype.nbytes,
                grad_bytes=training.grad_dtype.nbytes,
                dp=dp,
                zero=config.zero,
                pp=config.pp,
                reduce_every_micro_batch=config.pp == 1
                and config.zero >= 2
                and runtime.sharded_grads_reduce_every_micro_batch,
            ),
        )

    dense, experts = per_param(config.dp_cp), per_param(max(1, config.dp_cp // config.ep))

    def total(n: int, n_experts: int = 0) -> tuple[float, float]:
        return (
            n * dense.forward_bytes + n_experts * experts.forward_bytes,
            n * dense.backward_bytes + n_experts * experts.backward_bytes,
        )

    parts = {
        "block": total(params.per_block, params.expert_per_block),
        "embedding": total(params.embedding),
        "head": total(params.head),
    }
    return parts, dense


def profiled_accumulation_bytes(profile_bytes: int, params: RankParams) -> dict[str, float]:
    """Backward bytes per micro-batch a profiled pass already holds for each part: the
    profiler never clears gradients between its repeats, so autograd adds every repeat's into
    `.grad` in the profile's dtype (read 2, write 1 per element; profiler/compute.py `_Step`).
    rank_compute.py adds only what the runtime streams beyond that to a measured pass."""
    per = 3.0 * profile_bytes
    return {
        "block": per * params.per_block,
        "embedding": per * params.embedding,
        "head": per * params.head,
    }


def part_traffic_s(
    model: ModelSpec,
    training: TrainingSpec,
    config: ParallelConfig,
    gpu: GpuSpec,
    constants: KernelConstants,
    runtime: RuntimeSemantics,
) -> tuple[float, float, float]:
    """Seconds per micro-batch (forward + backward) that the traffic adds to an analytic
    block, embedding and head on `gpu`: exactly what rankcosts.py adds to their passes."""
    params = tp_rank_params(model, config.tp, config.num_chunks, config.ep)
    parts, _ = part_traffic_bytes(runtime, config, training, params)

    def s(key: str) -> float:
        fwd, bwd = parts[key]
        return memory_bound_s(fwd, gpu, constants) + memory_bound_s(bwd, gpu, constants)

    return s("block"), s("embedding"), s("head")


def _autocast_master_weights(s: StepShape) -> tuple[float, float]:
    """No DP wrapper: fp32 weights under autocast. Autocast casts each weight to the compute
    dtype once per autocast region (read 4, write c: per micro-batch at pp = 1, once per step
    around the pipeline schedule at pp > 1), each micro-batch's backward casts the weight's
    gradient back (read c, write 4), and autograd adds the micro-batches after the first into
    `.grad` (AccumulateGrad: read 4 + 4, write 4)."""
    m, c, f = s.micro_batches, s.compute_bytes, FP32_BYTES
    if c == f:
        return 0.0, 3.0 * f * (m - 1)
    casts = m if s.pp == 1 else 1
    return float(casts * (f + c)), m * (c + f) + 3.0 * f * (m - 1)


def _fsdp2_reductions(s: StepShape) -> float:
    """Backward bytes of a step under FSDP2 (c compute, g reduce dtype), per local parameter.

    Reducing after every micro-batch: each reduction copies the compute-dtype gradient into
    the reduce-scatter buffer (read c, write g). Sync off until the last micro-batch: the first
    gradient is cast into the accumulator (read c, write g), each later one added (read c + g,
    write g), and the one reduction copies the accumulator in (read g, write g); with one
    micro-batch there is nothing to accumulate and the copy reads the gradient itself. When
    c = g FSDP2 keeps no accumulator: autograd adds into `.grad` (read g + g, write g)."""
    m, c, g = s.micro_batches, s.compute_bytes, s.grad_bytes
    if s.reduce_every_micro_batch:
        return float(m * (c + g))
    if m == 1:
        return float(c + g)
    if c == g:
        return 3.0 * g * (m - 1) + 2 * g
    return (c + g) + (c + 2 * g) * (m - 1) + 2 * g


def _fsdp2_gathers(s: StepShape) -> tuple[float, float]:
    """Copy-out of each all-gather into the unsharded parameters (read c, write c), ZeRO >= 1:
    (forward, backward) bytes of a step.

    At pp > 1 one gather per step (torch pipelining keeps the stage's parameters unsharded
    across micro-batches, runtime.MemoryRules.pipelined_fsdp_unsharded); at pp = 1 one per
    micro-batch's forward (parameters reshard after backward) and with ZeRO-3 another in each
    backward."""
    if s.zero == 0:
        return 0.0, 0.0
    copy = 2.0 * s.compute_bytes
    if s.pp > 1:
        return copy, 0.0
    m = s.micro_batches
    return copy * m, copy * m if s.zero >= 3 else 0.0
