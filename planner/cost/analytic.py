"""Analytic (no-profile) compute costs: FLOPs of each block and calibrated efficiency constants.

Owns: matmul FLOPs of a transformer block, the embedding and the head, per GPU for a tensor-
parallel degree; the model / hardware FLOPs of a training step (throughput figures); the
efficiency model that turns FLOPs into seconds without a measured profile; the fitted constants.
Does not own: activation memory (memory.py), collectives (comm.py), measured times (compute.py).

Efficiency model (a roofline with a saturating GEMM efficiency):
  gemm time       = F / (peak(dtype) * eff(F)),  eff(F) = EFF_MAX * F / (F + F_half),
                    F = the GEMM's FLOPs on one GPU, F_half = peak(dtype) * GEMM_HALF_TIME_S
                    (small GEMMs under-fill the SMs; the saturating form is the usual
                    occupancy curve, cf. Williams et al. 2009 "Roofline" for the bound and
                    NVIDIA's "Matrix Multiplication Background" guide for the wave-quantisation
                    / tile-utilisation loss of small GEMMs). Equivalently
                    time = (GEMM_HALF_TIME_S + F / peak) / EFF_MAX: a fixed ramp per GEMM plus
                    the FLOPs at the attainable peak. Scaling F_half with the peak is Little's
                    law (work in flight = throughput x latency): a faster device needs
                    proportionally more work per GEMM to hide the same latencies, which is how
                    the A100 fit carries over to H100s and to CPU workers;
  memory-bound    = ELEMENTWISE_PASSES * (bytes of the activations a block produces) / HBM
                    bandwidth (layer norms, activations, dropout, softmax, residual adds read and
                    write the tensors the block stores; backward touches them twice as often).
The constants are fitted by benchmarks/calibrate_analytic.py on Narayanan et al. 2021 (PTD-P)
Table 1 (../shared/calibration/ptdp_table1.json); see benchmarks/results/calibration_report.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost import moe
from planner.specs import Dtype, GpuSpec, MlpKind, ModelSpec

# Fitted by benchmarks/calibrate_analytic.py on PTD-P Table 1 (A100-80GB, fp16), with the rows
# priced as Megatron-LM 2021 ran them (planner/runtime.py MEGATRON_2021: the data-parallel
# all-reduce after the flush, not overlapped): MAPE 1.92 %, leave-one-out MAPE 2.78 %
# (benchmarks/results/calibration_report.md). LINK_EFFICIENCY sits at its upper bound 1.0:
# these rows do not identify it (the issue on analytic transfer asks for nccl-tests-based
# link efficiency per link class instead).
# Fraction of the dtype's dense datasheet peak a large GEMM attains (dimensionless).
EFF_MAX = 0.7150
# A GEMM reaches half of EFF_MAX when its FLOPs equal what the GPU does at peak in this time
# (per-GEMM ramp: launch, wave quantisation, tile tails) (seconds).
GEMM_HALF_TIME_S = 9.264e-5
# Passes over the bytes of the stored activations made by memory-bound kernels in forward
# (backward makes twice as many) (dimensionless).
ELEMENTWISE_PASSES = 2.1672
# Fraction of a link's nominal per-direction bandwidth that NCCL collectives and p2p attain
# (dimensionless).
LINK_EFFICIENCY = 1.0


@dataclass(frozen=True, kw_only=True)
class AnalyticConstants:
    """The efficiency constants of the analytic path (defaults: the committed fit)."""

    eff_max: float = EFF_MAX
    gemm_half_time_s: float = GEMM_HALF_TIME_S
    elementwise_passes: float = ELEMENTWISE_PASSES
    link_efficiency: float = LINK_EFFICIENCY


DEFAULT_CONSTANTS = AnalyticConstants()


@dataclass(frozen=True, kw_only=True)
class BlockFlops:
    """Forward matmul FLOPs of one transformer block for one micro-batch on one TP rank.

    `gemms` are the dense projections (one entry per GEMM call); `attention` is the score and
    value products (QK^T and AV) counted over the full s x s square, as Narayanan et al. 2021
    Eq. 3 and Korthikanti et al. 2022 Eq. 7 do.
    """

    gemms: tuple[float, ...]
    attention: float

    @property
    def total(self) -> float:
        return sum(self.gemms) + self.attention


def block_flops(
    model: ModelSpec,
    micro_batch: int,
    seq_len: int,
    tp: int,
    *,
    ep: int = 1,
    moe_imbalance: float = 1.0,
) -> BlockFlops:
    """Forward FLOPs of one block per TP rank (2 FLOPs per multiply-add).

    GPT shape (Narayanan et al. 2021 Sec. 5.1 / Eq. 3): 24*B*s*h^2 + 4*B*s^2*h, generalised by
    counting each matmul: q/k/v projections 2*T*h*(q_dim + 2*kv_dim) (GQA), output 2*T*q_dim*h,
    MLP 2 (GELU) or 3 (SwiGLU) GEMMs of 2*T*h*ffn, attention 2 * 2*B*s^2*q_dim. An MoE block's
    feed-forward is the router, shared and local-expert GEMMs of planner/cost/moe.py at expert-
    parallel degree `ep` with the busiest rank's `moe_imbalance` (1: the model FLOPs).
    """
    tokens = micro_batch * seq_len
    h, f = model.hidden, model.ffn_hidden
    qkv = 2.0 * tokens * h * (model.q_dim + 2 * model.kv_dim) / tp
    out = 2.0 * tokens * model.q_dim * h / tp
    mlp_one = 2.0 * tokens * h * f / tp
    mlp = (mlp_one,) * (2 if model.mlp is MlpKind.GELU else 3)
    if model.moe is not None:
        mlp = moe.mlp_gemm_flops(model, tokens, tp, ep, moe_imbalance)
    attention = 4.0 * micro_batch * seq_len * seq_len * model.q_dim / tp
    return BlockFlops(gemms=(qkv, out, *mlp), attention=attention)


def head_flops(model: ModelSpec, micro_batch: int, seq_len: int, tp: int) -> float:
    """Forward FLOPs of the vocabulary projection per TP rank: 2*T*h*V/tp (vocab-parallel)."""
    return 2.0 * micro_batch * seq_len * model.hidden * model.vocab / tp


def model_flops_per_step(model: ModelSpec, global_batch: int, seq_len: int) -> float:
    """Model FLOPs of one step without recompute (Korthikanti et al. 2022 Eq. 7, PaLM App. B).

    3 x forward (forward + 2x backward) of every block and of the head; for the GPT shape this
    is 72*B*s*l*h^2*(1 + s/(6h) + V/(12*l*h)).
    """
    fwd = block_flops(model, global_batch, seq_len, 1).total * model.layers
    return 3.0 * (fwd + head_flops(model, global_batch, seq_len, 1))


def hardware_flops_per_step(
    model: ModelSpec, global_batch: int, seq_len: int, recompute: str, flash_attention: bool = False
) -> float:
    """FLOPs executed in one step, counting recompute (Narayanan et al. 2021 Eq. 3 style).

    Full recompute adds one forward of every block: for the GPT shape
    96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)). Selective recompute adds the attention products
    (Korthikanti et al. 2022 Sec. 5), flash attention too: the executor checkpoints the whole
    attention core, so its forward runs again before its backward.
    """
    base = model_flops_per_step(model, global_batch, seq_len)
    blk = block_flops(model, global_batch, seq_len, 1)
    if recompute == "full":
        return base + blk.total * model.layers
    if recompute == "selective":
        return base + blk.attention * model.layers
    return base


# FlashAttention-2's backward runs five matmuls per tile (S = QK^T and dP recomputed, dV, dQ,
# dK) against the forward's two: 2.5 x the forward's FLOPs (Dao 2023, FlashAttention-2,
# Sec. 3.1.2 and the FLOP count of its benchmarks, which use 2.5x for backward).
FLASH_BACKWARD_FACTOR = 2.5


def gemm_efficiency(flops: float, peak_flops: float, c: AnalyticConstants) -> float:
    """Fraction of peak a GEMM of `flops` FLOPs attains: EFF_MAX * F / (F + peak * t_half)."""
    return c.eff_max * flops / (flops + peak_flops * c.gemm_half_time_s)


def gemm_time_s(flops: float, gpu: GpuSpec, dtype: Dtype, c: AnalyticConstants) -> float:
    if flops <= 0:
        return 0.0
    peak = gpu.peak_flops(dtype)
    return flops / (peak * gemm_efficiency(flops, peak, c))


@dataclass(frozen=True, kw_only=True)
class PassTimes:
    """Seconds of one micro-batch through a block on one GPU, TP collectives excluded.

    `backward_s` includes the recompute forward when recompute is on (as profile records do).
    """

    forward_s: float
    backward_s: float


def block_times(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    recompute: str,
    flash_attention: bool,
    elementwise_bytes: float,
    gpu: GpuSpec,
    dtype: Dtype,
    c: AnalyticConstants = DEFAULT_CONSTANTS,
    ep: int = 1,
    moe_imbalance: float = 1.0,
) -> PassTimes:
    """Analytic forward/backward time of one block (see the module docstring for the model).

    Backward runs two GEMMs per forward GEMM (input and weight gradients). Flash attention
    skips the masked upper triangle of a causal s x s product (Dao et al. 2022), so half of the
    attention FLOPs are executed; the materialised path computes the full square.
    `elementwise_bytes` is the block's stored-activation bytes without recompute (memory.py).
    """
    fl = block_flops(model, micro_batch, seq_len, tp, ep=ep, moe_imbalance=moe_imbalance)
    gemm_fwd = sum(gemm_time_s(g, gpu, dtype, c) for g in fl.gemms)
    attn_exec = fl.attention * (0.5 if flash_attention else 1.0)
    attn_fwd = gemm_time_s(attn_exec, gpu, dtype, c)
    mem_fwd = c.elementwise_passes * elementwise_bytes / gpu.hbm_bytes_per_s
    fwd = gemm_fwd + attn_fwd + mem_fwd
    bwd = 2.0 * gemm_fwd + FLASH_BACKWARD_FACTOR * attn_fwd + 2.0 * mem_fwd
    if not flash_attention:
        bwd = 2.0 * (gemm_fwd + attn_fwd + mem_fwd)
    if recompute == "full":
        bwd += fwd
    elif recompute == "selective":
        # the checkpointed attention core runs its forward again in backward (executor/model.py
        # Attention.core under torch.utils.checkpoint), flash or not
        bwd += attn_fwd
    return PassTimes(forward_s=fwd, backward_s=bwd)


def head_times(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    gpu: GpuSpec,
    dtype: Dtype,
    c: AnalyticConstants = DEFAULT_CONSTANTS,
) -> PassTimes:
    """Final norm + vocabulary projection + cross-entropy (logits in fp32: 4 B per element
    written, read by the softmax, and again in backward)."""
    fwd_gemm = gemm_time_s(head_flops(model, micro_batch, seq_len, tp), gpu, dtype, c)
    logits_bytes = 4.0 * micro_batch * seq_len * model.vocab / tp
    mem = c.elementwise_passes * 2.0 * logits_bytes / gpu.hbm_bytes_per_s
    return PassTimes(forward_s=fwd_gemm + mem, backward_s=2.0 * fwd_gemm + 2.0 * mem)


def embedding_times(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    gpu: GpuSpec,
    dtype: Dtype,
    c: AnalyticConstants = DEFAULT_CONSTANTS,
) -> PassTimes:
    """Token (+ position) lookup: memory bound, reads and writes T*h elements; backward
    scatters the gradient into the table."""
    nbytes = 2.0 * micro_batch * seq_len * model.hidden * dtype.nbytes
    t = c.elementwise_passes * nbytes / gpu.hbm_bytes_per_s
    return PassTimes(forward_s=t, backward_s=2.0 * t)
