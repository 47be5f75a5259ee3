"""Context parallelism (cp > 1): attention FLOPs per rank, CP collectives and CP memory terms.

Owns: the terms a sequence split over cp ranks adds to one transformer block, for the three CP
attentions of `planner.runtime.CpAttention`:
- the attention FLOPs of one rank in the load-balanced causal layout (rank c holds chunks c
  and 2cp-1-c of 2cp), beyond what a block of seq_len/cp tokens already counts;
- the CP communication per block and micro-batch: all-gather of K, V and reduce-scatter of
  dK, dV (Llama 3, Dubey et al. 2024 Sec. 3.3.2), the ring's K/V blocks overlapped with the
  block attention (Liu et al. 2023; load balancing: Brandon et al. 2023, Striped/zig-zag), and
  Ulysses' all-to-alls (Jacobs et al. 2023, Sec. 3), each on the placed CP group's link through
  planner/cost/collectives.py;
- the memory the executor's CP attention keeps: the gathered K, V saved for backward and the
  transient gradient of the gathered K, V (planner/runtime.py ContextParallelRules);
- the CP collectives of each pipeline rank for the plan's attention (`rank_block_comm_times`,
  measured fits when the profile has them) and the sentence that says which attention runs,
  with the others' times for comparison.
Does not own: the block's local terms (analytic.py and memory.py price a block of seq_len/cp
tokens; rankcosts.py calls them with that length), links (comm.py), the executor (executor/cp.py).

Sliding-window attention is not priced: ModelSpec has no window field on this branch (every
model is priced as full causal attention).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.analytic import DEFAULT_CONSTANTS, AnalyticConstants, PassTimes
from planner.cost.collectives import CollectiveOp, collective_s, message_s
from planner.cost.comm import ClusterArrays, measured_collective_s
from planner.cost.kernels import flash_attention_s
from planner.parallel import MeshAxis, ParallelConfig, ulysses_fits
from planner.profile import Profile
from planner.runtime import ContextParallelRules, CpAttention, RuntimeSemantics
from planner.specs import Dtype, GpuSpec, ModelSpec, TrainingSpec

# Bytes per entry of the int64 index that puts the gathered K/V chunks in sequence order
# (executor/cp.py `_sequence_order`, saved by index_select for its backward).
INDEX_BYTES = 8


def attention_square_flops(
    model: ModelSpec, micro_batch: int, seq_len: int, tp: int, cp: int
) -> float:
    """Forward QK^T and AV FLOPs of one CP rank, in the full-square convention of
    analytic.block_flops (a causal kernel executes half of them).

    With chunks of n = S/(2cp) tokens, rank c's queries of chunk c see c*n + (causal n) keys and
    those of chunk j = 2cp-1-c see j*n + (causal n): executed products n^2 (c + j + 1) = 2cp n^2,
    the same on every rank, i.e. S^2 / (2cp) of the causal S^2 / 2. In the full-square
    convention (2 x executed): 4 * b * S^2 * q_dim / (tp * cp)."""
    return 4.0 * micro_batch * seq_len * seq_len * model.q_dim / (tp * cp)


def _core_s(
    executed_flops: float, flash: bool, gpu: GpuSpec, dtype: Dtype, c: AnalyticConstants
) -> tuple[float, float]:
    """(forward, backward) of an attention core executing `executed_flops` forward FLOPs:
    flash per kernels.flash_attention_s; materialised as GEMM FLOPs at the GEMM efficiency
    (backward twice the forward)."""
    if flash:
        return flash_attention_s(executed_flops, gpu, dtype, c)
    fwd = executed_flops / (gpu.peak_flops(dtype) * c.gemm_efficiency(gpu))
    return fwd, 2.0 * fwd


def attention_extra_times(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    cp: int,
    recompute: str,
    flash_attention: bool,
    gpu: GpuSpec,
    dtype: Dtype,
    c: AnalyticConstants = DEFAULT_CONSTANTS,
) -> PassTimes:
    """Attention time of one CP rank beyond a block of seq_len/cp tokens (whose local s^2 square
    analytic.block_times counts), with block_times' own rules: a causal kernel executes half of
    the square with flash attention (kernels.flash_attention_s, backward 2.5 x), the
    materialised square at GEMM efficiency (backward 2 x), and full or selective recompute runs
    the attention forward again."""
    if cp == 1:
        return PassTimes(forward_s=0.0, backward_s=0.0)
    half = 0.5 if flash_attention else 1.0
    local = attention_square_flops(model, micro_batch, seq_len // cp, tp, 1) * half
    rank = attention_square_flops(model, micro_batch, seq_len, tp, cp) * half
    rank_f, rank_b = _core_s(rank, flash_attention, gpu, dtype, c)
    local_f, local_b = _core_s(local, flash_attention, gpu, dtype, c)
    fwd, bwd = rank_f - local_f, rank_b - local_b
    if recompute in ("full", "selective"):
        bwd += fwd
    return PassTimes(forward_s=fwd, backward_s=bwd)


def rank_attention_times(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    cp: int,
    flash_attention: bool,
    gpu: GpuSpec,
    dtype: Dtype,
    c: AnalyticConstants = DEFAULT_CONSTANTS,
) -> PassTimes:
    """The whole attention core of one CP rank (forward, backward without recompute): what a
    ring step's transfer can hide behind, 1/cp of it per step."""
    half = 0.5 if flash_attention else 1.0
    executed = attention_square_flops(model, micro_batch, seq_len, tp, cp) * half
    fwd, bwd = _core_s(executed, flash_attention, gpu, dtype, c)
    return PassTimes(forward_s=fwd, backward_s=bwd)


def kv_bytes(model: ModelSpec, micro_batch: int, seq_len: int, tp: int, dtype: Dtype) -> float:
    """K and V of `seq_len` tokens of one micro-batch on one TP rank (kv_dim/tp each)."""
    return 2.0 * micro_batch * seq_len * model.kv_dim / tp * dtype.nbytes


@dataclass(frozen=True, kw_only=True)
class CpLink:
    """The CP group's slowest link: group size, bandwidth (bytes/s), per-step latency (s)."""

    size: int
    bandwidth_bytes_per_s: float
    latency_s: float


def block_comm_times(
    kind: CpAttention,
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    link: CpLink,
    recompute: str,
    dtype: Dtype,
    attention: PassTimes,
    rules: ContextParallelRules,
) -> PassTimes | None:
    """CP communication of one block and micro-batch on one rank (seconds exposed), or None
    when `kind` cannot run this model (Ulysses with cp not dividing the KV heads).

    All-gather: forward AG of the sequence's K, V (nccl-tests size: the gathered buffer);
    backward RS of dK, dV of the same size, plus one more AG when recompute re-runs the core
    (full, or selective with the gather inside the core); not overlapped unless the rules say.
    Ring: cp-1 steps each sending one rank's K, V (S/cp tokens) to the next rank while the
    attention of the block in hand runs (attention / cp per step): exposed
    (cp-1) * max(0, message - attention/cp); backward sends K, V and dK, dV (2x bytes) per step.
    Ulysses: `ulysses_times` of the all-to-alls of q, k, v and the output."""
    cp = link.size
    if cp == 1:
        return PassTimes(forward_s=0.0, backward_s=0.0)
    bw, lat = link.bandwidth_bytes_per_s, link.latency_s
    regather = recompute == "full" or (recompute == "selective" and rules.gather_in_core)
    full_kv = kv_bytes(model, micro_batch, seq_len, tp, dtype)
    if kind is CpAttention.ALL_GATHER_KV:
        ag = float(collective_s(CollectiveOp.ALL_GATHER, cp, full_kv, bw, lat))
        rs = float(collective_s(CollectiveOp.REDUCE_SCATTER, cp, full_kv, bw, lat))
        fwd, bwd = ag, rs + (ag if regather else 0.0)
        if rules.comm_overlapped:
            fwd = max(0.0, fwd - attention.forward_s)
            bwd = max(0.0, bwd - attention.backward_s)
        return PassTimes(forward_s=fwd, backward_s=bwd)
    if kind is CpAttention.RING:
        step = float(message_s(full_kv / cp, bw, lat))
        step_bwd = float(message_s(2.0 * full_kv / cp, bw, lat))
        fwd = (cp - 1) * max(0.0, step - attention.forward_s / cp)
        bwd = (cp - 1) * max(0.0, step_bwd - attention.backward_s / cp)
        return PassTimes(forward_s=fwd, backward_s=bwd + (fwd if recompute != "none" else 0.0))
    if not ulysses_fits(model, tp, cp):
        return None
    q, kv = ulysses_buffers(model, micro_batch, seq_len, tp, cp, dtype)
    a2a_q = float(collective_s(CollectiveOp.ALL_TO_ALL, cp, q, bw, lat))
    a2a_kv = float(collective_s(CollectiveOp.ALL_TO_ALL, cp, kv, bw, lat))
    return ulysses_times(a2a_q, a2a_kv, recompute)


def ulysses_buffers(
    model: ModelSpec, micro_batch: int, seq_len: int, tp: int, cp: int, dtype: Dtype
) -> tuple[float, float]:
    """Per-rank all-to-all buffers (nccl-tests size: the send buffer) of Ulysses: the local
    tokens of q (and of the output) and of k or v, on one TP rank."""
    local = micro_batch * (seq_len // cp) * dtype.nbytes / tp
    return local * model.q_dim, local * model.kv_dim


def ulysses_times(a2a_q_s: float, a2a_kv_s: float, recompute: str) -> PassTimes:
    """The executor's Ulysses per block: forward one all-to-all each for q, k, v and one for
    the output; backward the same four for the gradients, and the forward's again when
    recompute re-runs the core."""
    fwd = 2 * a2a_q_s + 2 * a2a_kv_s
    return PassTimes(forward_s=fwd, backward_s=fwd + (fwd if recompute != "none" else 0.0))


def saved_extra_bytes(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    cp: int,
    recompute: str,
    dtype: Dtype,
    rules: ContextParallelRules,
    kind: CpAttention = CpAttention.ALL_GATHER_KV,
) -> float:
    """Bytes a block keeps for backward beyond a block of seq_len/cp tokens, as the executor's
    CP attention `kind` runs (tests/test_executor_cp.py measures them). All-gather:
    - SDPA saves the gathered K, V (the whole sequence) instead of the local ones;
    - the reorder of the gathered chunks into sequence order (index_select) keeps its int64
      index of seq_len entries;
    - the two query chunks run as two SDPA calls, whose outputs SDPA saves, and their
      concatenation is a second copy (the output projection's input): q_dim/tp per token more.
    Ulysses: SDPA's head-sharded whole-sequence q, k, v, output and log-sum-exp hold the bytes
    of the local ones; the reorders into and out of sequence order keep two int64 indices, and
    the output after the all-to-all back is a second copy of the attention output.
    Recompute that re-runs the core keeps none of it (full: only the block input is kept;
    selective with the collectives in the core: the local q, k, v and the core's output are)."""
    if cp == 1 or not rules.saves_gathered_kv:
        return 0.0
    if recompute == "full" or (recompute == "selective" and rules.gather_in_core):
        return 0.0
    out_copy = micro_batch * (seq_len // cp) * model.q_dim / tp * dtype.nbytes
    if kind is CpAttention.ULYSSES:
        return 2 * INDEX_BYTES * seq_len + out_copy
    full = kv_bytes(model, micro_batch, seq_len, tp, dtype)
    return full - full / cp + INDEX_BYTES * seq_len + out_copy


def kv_grad_transient_bytes(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    cp: int,
    dtype: Dtype,
    rules: ContextParallelRules,
    kind: CpAttention = CpAttention.ALL_GATHER_KV,
) -> float:
    """Gradients of one layer's gathered K, V (whole sequence, compute dtype) alive in backward
    until its reduce-scatter: `rules.kv_grad_copies` copies (an estimate, runtime.py). Ulysses'
    backward all-to-alls move local-sized buffers only: 0."""
    if cp == 1 or kind is not CpAttention.ALL_GATHER_KV:
        return 0.0
    return rules.kv_grad_copies * kv_bytes(model, micro_batch, seq_len, tp, dtype)


def describe(
    chosen: CpAttention, times: dict[CpAttention, PassTimes | None], cp: int, micro_batches: int
) -> str:
    """The note a plan carries: the attention priced (the runtime's) and the others' CP time
    per block and step for comparison."""

    def per_step(t: PassTimes | None) -> str:
        if t is None:
            return "cannot run (cp must divide the KV heads per TP rank)"
        return f"{1e3 * micro_batches * (t.forward_s + t.backward_s):.3g} ms per block per step"

    others = ", ".join(f"{k.value} {per_step(v)}" for k, v in times.items() if k is not chosen)
    return (
        f"context parallelism cp={cp}: {chosen.value} attention (the plan's; the executor runs "
        "it), "
        f"load-balanced causal chunks (rank c holds chunks c and {2 * cp - 1}-c of {2 * cp}), "
        f"{per_step(times[chosen])}; for comparison: {others}"
    )


def rank_block_comm_times(
    model: ModelSpec,
    training: TrainingSpec,
    config: ParallelConfig,
    arrays: ClusterArrays,
    profile: Profile | None,
    constants: AnalyticConstants,
    runtime: RuntimeSemantics,
    gpus: dict[int, GpuSpec],
    notes: list[str],
) -> tuple[PassTimes, ...]:
    """CP collectives of one block per micro-batch, per pipeline rank, for the plan's CP
    attention on that rank's worst CP group link (rankcosts.py adds them to the block); the
    profile's measured all-gather / reduce-scatter or all-to-all fits replace the link model
    when it has them. Appends the plan's note (`describe`) to `notes`."""
    cp, pp, tp = config.cp, config.pp, config.tp
    zero = PassTimes(forward_s=0.0, backward_s=0.0)
    if cp == 1:
        return (zero,) * pp
    mb, seq, dtype, rc = (
        config.micro_batch,
        training.seq_len,
        training.dtype,
        config.recompute.value,
    )
    links = arrays.axis_links(MeshAxis.CP)
    slowest = min(gpus.values(), key=lambda g: g.peak_flops(dtype))
    attention = rank_attention_times(
        model,
        micro_batch=mb,
        seq_len=seq,
        tp=tp,
        cp=cp,
        flash_attention=training.flash_attention,
        gpu=slowest,
        dtype=dtype,
        c=constants,
    )
    out = []
    for r in range(pp):
        link = CpLink(
            size=cp,
            bandwidth_bytes_per_s=links[r].bandwidth_bytes_per_s,
            latency_s=links[r].latency_s,
        )
        times = {
            kind: block_comm_times(
                kind,
                model,
                micro_batch=mb,
                seq_len=seq,
                tp=tp,
                link=link,
                recompute=rc,
                dtype=dtype,
                attention=attention,
                rules=runtime.cp,
            )
            for kind in CpAttention
        }
        kind = config.cp_attention
        chosen = times[kind]
        assert chosen is not None  # validate() refused a Ulysses plan whose heads do not split
        groups = arrays.cp_groups(r)
        full_kv = kv_bytes(model, mb, seq, tp, dtype)
        ag = measured_collective_s(profile, CollectiveOp.ALL_GATHER, groups, full_kv)
        rs = measured_collective_s(profile, CollectiveOp.REDUCE_SCATTER, groups, full_kv)
        if kind is CpAttention.ALL_GATHER_KV and ag is not None and rs:
            regather = rc != "none"
            chosen = PassTimes(forward_s=ag, backward_s=rs + (ag if regather else 0.0))
            notes.append("CP all-gather / reduce-scatter from the profile's measured fits")
        q_bytes, kv_b = ulysses_buffers(model, mb, seq, tp, cp, dtype)
        a2a_q = measured_collective_s(profile, CollectiveOp.ALL_TO_ALL, groups, q_bytes)
        a2a_kv = measured_collective_s(profile, CollectiveOp.ALL_TO_ALL, groups, kv_b)
        if kind is CpAttention.ULYSSES and a2a_q is not None and a2a_kv is not None:
            chosen = ulysses_times(a2a_q, a2a_kv, rc)
            notes.append("CP all-to-alls from the profile's measured fits")
        if r == 0:
            notes.append(
                describe(
                    kind,
                    {**times, kind: chosen},
                    cp,
                    config.num_micro_batches(training),
                )
            )
        out.append(chosen)
    return tuple(out)
