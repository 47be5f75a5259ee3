"""Seconds of one kernel on one device from its shape: GEMMs, attention, memory-bound kernels.

Owns: the analytic (no-profile) time of a GEMM of shape (M, N, K) with tile and wave
quantisation and a roofline bound, of flash and materialised attention, and of elementwise
kernels from the bytes they read and write; the efficiency constants those use
(`KernelConstants`, fitted in planner/cost/calibration.py).
Does not own: which kernels a block runs (analytic.py lists them), collectives (collectives.py).

GEMM (NVIDIA "Matrix Multiplication Background" user guide, sections "Math and memory bounds",
"Tile quantization", "Wave quantization"; Williams et al. 2009 for the roofline):
  tiles  = ceil(M / TILE_M) * ceil(N / TILE_N)       output tiles, one per SM at a time
  waves  = ceil(tiles / SMs)                          the last wave may leave SMs idle
  math   = waves * 2 * TILE_M * TILE_N * K / (peak / SMs * eff_max)
  memory = (M*K + K*N + M*N) * bytes / (HBM bandwidth * hbm_efficiency)   operands once
  time   = max(math, memory) + gemm_overhead_s        (launch, prologue/epilogue)
A device without an SM count (a CPU worker) has one "SM" and tiles of one element, so
quantisation vanishes and the math term is F / (peak * eff_max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.specs import DeviceKind, Dtype, GpuSpec

# Output tile of a tensor-core GEMM: cuBLAS's large kernels use 128 x 128 and 256 x 128 CTA
# tiles (NVIDIA Matrix Multiplication Background guide, "Tile quantization"); the smaller one
# is taken because cuBLAS's heuristics pick it for the shapes where quantisation would bite.
TILE_M = 128
TILE_N = 128


@dataclass(frozen=True, kw_only=True)
class KernelConstants:
    """Efficiency constants of the kernel model (dimensionless unless the name says).

    eff_max: fraction of the dense datasheet peak a GEMM's full waves attain.
    gemm_overhead_s: fixed time per GEMM call (launch, prologue, epilogue, tails).
    attention_efficiency: fraction of peak a flash-attention kernel attains on its executed
      (causal-halved) FLOPs (FlashAttention-2 reports 50-73 % forward on A100, Dao 2023 Fig. 5).
    hbm_efficiency: fraction of the HBM datasheet bandwidth memory-bound kernels attain.
    hopper_eff_max / hopper_attention_efficiency: the same two for `arch: hopper` GPUs (H100,
      H200), fitted on the calibration's H100 rows: Hopper reaches a smaller fraction of its
      datasheet peak than Ampere with the 2023 kernels (cuBLAS, Triton flash attention without
      wgmma). Other architectures use the Ampere values: an extrapolation, said in the output.
    """

    eff_max: float
    gemm_overhead_s: float
    attention_efficiency: float
    hbm_efficiency: float
    hopper_eff_max: float
    hopper_attention_efficiency: float

    def gemm_efficiency(self, gpu: GpuSpec) -> float:
        return self.hopper_eff_max if gpu.arch == "hopper" else self.eff_max

    def flash_efficiency(self, gpu: GpuSpec) -> float:
        return (
            self.hopper_attention_efficiency if gpu.arch == "hopper" else self.attention_efficiency
        )


# Architectures the constants were fitted on (planner/cost/calibration.py sources).
CALIBRATED_ARCHS = ("ampere", "hopper")


def _sms(gpu: GpuSpec) -> int:
    return 1 if gpu.kind is DeviceKind.CPU or gpu.sm_count is None else gpu.sm_count


def gemm_s(m: float, n: float, k: float, gpu: GpuSpec, dtype: Dtype, c: KernelConstants) -> float:
    """One GEMM C[M,N] = A[M,K] B[K,N] with inputs in `dtype` (see the module docstring)."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    sms = _sms(gpu)
    peak = gpu.peak_flops(dtype)
    if sms == 1:
        math_s = 2.0 * m * n * k / (peak * c.gemm_efficiency(gpu))
    else:
        tiles = math.ceil(m / TILE_M) * math.ceil(n / TILE_N)
        waves = math.ceil(tiles / sms)
        math_s = waves * 2.0 * TILE_M * TILE_N * k / (peak / sms * c.gemm_efficiency(gpu))
    # FP8 GEMMs write bf16 outputs (torchao float8 / Transformer Engine)
    out_bytes = 2 if dtype is Dtype.FP8 else dtype.nbytes
    nbytes = (m * k + k * n) * dtype.nbytes + m * n * out_bytes
    memory_s = nbytes / (gpu.hbm_bytes_per_s * c.hbm_efficiency)
    return max(math_s, memory_s) + c.gemm_overhead_s


def linear_s(
    tokens: float, n_out: float, k_in: float, gpu: GpuSpec, dtype: Dtype, c: KernelConstants
) -> tuple[float, float]:
    """(forward, backward) seconds of a linear layer y[T, N] = x[T, K] W[K, N].

    Backward runs the input gradient dX[T, K] = dY W^T (inner N) and the weight gradient
    dW[K, N] = X^T dY (inner T): two GEMMs of the forward's FLOPs but other shapes.
    """
    fwd = gemm_s(tokens, n_out, k_in, gpu, dtype, c)
    bwd = gemm_s(tokens, k_in, n_out, gpu, dtype, c) + gemm_s(k_in, n_out, tokens, gpu, dtype, c)
    return fwd, bwd


def memory_bound_s(nbytes: float, gpu: GpuSpec, c: KernelConstants) -> float:
    """A kernel that streams `nbytes` through HBM (reads plus writes) at attainable bandwidth."""
    return nbytes / (gpu.hbm_bytes_per_s * c.hbm_efficiency) if nbytes > 0 else 0.0


# FlashAttention-2's backward runs five matmuls per tile (S = QK^T and dP recomputed, dV, dQ,
# dK) against the forward's two: 2.5 x the forward's FLOPs (Dao 2023, FlashAttention-2,
# Sec. 3.1.2 and the FLOP count of its benchmarks, which use 2.5x for backward).
FLASH_BACKWARD_FACTOR = 2.5


def flash_attention_s(
    executed_flops: float, gpu: GpuSpec, dtype: Dtype, c: KernelConstants
) -> tuple[float, float]:
    """(forward, backward) seconds of a flash-attention kernel executing `executed_flops`
    forward FLOPs (QK^T and PV over the unmasked tiles)."""
    if executed_flops <= 0:
        return 0.0, 0.0
    rate = gpu.peak_flops(dtype) * c.flash_efficiency(gpu)
    fwd = executed_flops / rate + c.gemm_overhead_s
    return fwd, FLASH_BACKWARD_FACTOR * (fwd - c.gemm_overhead_s) + c.gemm_overhead_s
