"""FLOPs formulas (Narayanan et al. 2021 Eq. 3; Korthikanti et al. 2022 Eq. 7) and efficiency."""

from __future__ import annotations

from dataclasses import replace

import pytest

from planner.cost import analytic, kernels
from planner.errors import SpecError
from planner.hf import model_from_fields
from planner.specs import Dtype, GpuSpec

B, S, L, H, V = 8, 2048, 24, 2304, 51200
GPT = model_from_fields(
    "g", {"family": "gpt", "layers": L, "hidden": H, "heads": 24, "vocab": V, "max_seq_len": S}, "g"
)


def test_block_flops_gpt_shape() -> None:
    # forward per block: 24*B*s*h^2 + 4*B*s^2*h
    assert analytic.block_flops(GPT, B, S, 1).total == pytest.approx(
        24 * B * S * H**2 + 4 * B * S**2 * H
    )
    assert analytic.block_flops(GPT, B, S, 4).total == pytest.approx(
        (24 * B * S * H**2 + 4 * B * S**2 * H) / 4
    )


def test_hardware_flops_full_recompute_is_eq3() -> None:
    # Narayanan et al. 2021 Eq. 3: 96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h))
    eq3 = 96 * B * S * L * H**2 * (1 + S / (6 * H) + V / (16 * L * H))
    assert analytic.hardware_flops_per_step(GPT, B, S, "full") == pytest.approx(eq3)


def test_model_flops_is_korthikanti_eq7() -> None:
    # Korthikanti et al. 2022 Eq. 7: 72*B*s*l*h^2*(1 + s/(6h) + V/(12*h*l)), no recompute
    eq7 = 72 * B * S * L * H**2 * (1 + S / (6 * H) + V / (12 * H * L))
    assert analytic.model_flops_per_step(GPT, B, S) == pytest.approx(eq7)
    assert analytic.hardware_flops_per_step(GPT, B, S, "none") == pytest.approx(eq7)


def test_swiglu_gqa_flops_count_each_matmul() -> None:
    m = model_from_fields(
        "l",
        {
            "family": "llama",
            "layers": 2,
            "hidden": 4096,
            "heads": 32,
            "kv_heads": 8,
            "ffn_hidden": 14336,
            "vocab": 128256,
            "max_seq_len": 8192,
        },
        "l",
    )
    t = 1024
    fl = analytic.block_flops(m, 1, t, 1)
    qkv = 2 * t * 4096 * (4096 + 2 * 1024)
    out = 2 * t * 4096 * 4096
    mlp = 3 * 2 * t * 4096 * 14336
    assert sum(fl.gemms) == pytest.approx(qkv + out + mlp)
    assert fl.attention == pytest.approx(4 * t * t * 4096)


GPU = GpuSpec(
    name="x",
    memory_bytes=2**30,
    peak_bf16_flops=1e15,
    peak_fp16_flops=1e15,
    peak_fp32_flops=1e14,
    hbm_bytes_per_s=1e12,
    sm_count=100,
)
C = analytic.DEFAULT_CONSTANTS


def test_gemm_wave_quantisation_by_hand() -> None:
    # 128 x 128 tiles on 100 SMs: 100 tiles fill one wave; 101 tiles take two waves, so the
    # time nearly doubles for 1 % more work (NVIDIA Matrix Multiplication Background guide)
    k = 8192
    fast_hbm = replace(GPU, hbm_bytes_per_s=1e14)  # keep both GEMMs math-bound
    one = kernels.gemm_s(128 * 10, 128 * 10, k, fast_hbm, Dtype.BF16, C)
    two = kernels.gemm_s(128 * 10 + 1, 128 * 10, k, fast_hbm, Dtype.BF16, C)
    wave_s = 2.0 * 128 * 128 * k / (1e15 / 100 * C.eff_max)
    assert one == pytest.approx(wave_s + C.gemm_overhead_s)
    assert two == pytest.approx(2 * wave_s + C.gemm_overhead_s)


def test_gemm_roofline_memory_bound_when_skinny() -> None:
    # M = 1: arithmetic intensity ~1 FLOP/byte, far below the ridge (1e15 / 1e12 = 1000)
    n = k = 16384
    t = kernels.gemm_s(1, n, k, GPU, Dtype.BF16, C)
    bytes_moved = (1 * k + k * n + n) * 2
    assert t == pytest.approx(bytes_moved / (1e12 * C.hbm_efficiency) + C.gemm_overhead_s)


def test_linear_backward_runs_two_gemms_of_other_shapes() -> None:
    f, b = kernels.linear_s(4096, 1024, 1024, GPU, Dtype.BF16, C)
    assert b == pytest.approx(
        kernels.gemm_s(4096, 1024, 1024, GPU, Dtype.BF16, C)
        + kernels.gemm_s(1024, 1024, 4096, GPU, Dtype.BF16, C)
    )
    assert f == pytest.approx(kernels.gemm_s(4096, 1024, 1024, GPU, Dtype.BF16, C))


def test_fp8_linears_are_faster_and_pay_their_casts() -> None:
    # an H100's ratios: 989 / 1979 TFLOP/s, 3.35 TB/s, 132 SMs
    fp8_gpu = replace(GPU, peak_fp8_flops=2e15, hbm_bytes_per_s=3.4e12, sm_count=132)
    kw = dict(
        micro_batch=4,
        seq_len=2048,
        tp=1,
        flash_attention=True,
        sequence_parallel=False,
        dropout=False,
        gpu=fp8_gpu,
        dtype=Dtype.BF16,
        recompute="none",
    )
    bf16 = analytic.block_times(GPT, **kw)
    fp8 = analytic.block_times(GPT, gemm_dtype=Dtype.FP8, **kw)
    assert fp8.forward_s < bf16.forward_s
    # never more than the GEMMs' halving: the casts and the non-GEMM kernels stay
    gemms = sum(
        kernels.linear_s(rows, n, k, fp8_gpu, Dtype.BF16, C)[0]
        for rows, n, k, _ in analytic._block_linears(GPT, 4 * 2048, 1)
    )
    assert fp8.forward_s > bf16.forward_s - gemms / 2 - 1e-12
    with pytest.raises(SpecError, match="no FP8 peak"):
        analytic.block_times(GPT, gemm_dtype=Dtype.FP8, **{**kw, "gpu": GPU})


def test_recompute_adds_the_forward_to_backward() -> None:
    kw = dict(
        micro_batch=1,
        seq_len=512,
        tp=1,
        flash_attention=False,
        sequence_parallel=False,
        dropout=True,
        gpu=GPU,
        dtype=Dtype.BF16,
    )
    none = analytic.block_times(GPT, recompute="none", **kw)
    full = analytic.block_times(GPT, recompute="full", **kw)
    assert full.backward_s == pytest.approx(none.backward_s + none.forward_s)


def test_sliding_window_prices_the_window_in_flash_attention() -> None:
    s, w = 8192, 4096
    mistral = replace(GPT, sliding_window=w, sliding_layers=tuple(range(GPT.layers)))
    # w*s - w(w-1)/2 of s(s+1)/2 products: 0.75 of causal attention at w = s/2
    frac = analytic.causal_window_fraction(mistral, s)
    assert frac == pytest.approx((w * s - w * (w - 1) / 2) / (s * (s + 1) / 2))
    assert frac == pytest.approx(0.75, rel=1e-3)
    half = replace(mistral, sliding_layers=tuple(range(0, GPT.layers, 2)))
    assert analytic.causal_window_fraction(half, s) == pytest.approx((frac + 1) / 2)
    assert analytic.causal_window_fraction(mistral, w) == 1.0  # the window covers the sequence
    kw = dict(micro_batch=1, seq_len=s, tp=1, flash_attention=True, sequence_parallel=False,
              dropout=False, gpu=GPU, dtype=Dtype.BF16, recompute="none")  # fmt: skip
    assert analytic.block_times(mistral, **kw).forward_s < analytic.block_times(GPT, **kw).forward_s


def test_norms_in_fp32_pay_their_casts() -> None:
    # fused norm in bf16: read x, write y (2 + 2); under CUDA autocast the executor's norm runs
    # in fp32: cast up (2 + 4), fp32 kernel (4 + 4), cast back (4 + 2) = 20
    assert analytic.norm_bytes_per_element(2, None) == 4
    assert analytic.norm_bytes_per_element(2, 4) == 20
    assert analytic.norm_bytes_per_element(4, 4) == 8  # fp32 training: no casts
    kw = dict(micro_batch=2, seq_len=1024, tp=2, flash_attention=True, sequence_parallel=True,
              dropout=False, gpu=GPU, dtype=Dtype.BF16, recompute="none")  # fmt: skip
    fused = analytic.block_times(GPT, **kw)
    autocast = analytic.block_times(GPT, norm_input_bytes=4, **kw)
    # two norms over the sequence-parallel shard, 16 extra bytes per element each
    extra = kernels.memory_bound_s(2 * 16 * 2 * 1024 * H / 2, GPU, C)
    assert autocast.forward_s - fused.forward_s == pytest.approx(extra)
    assert autocast.backward_s - fused.backward_s == pytest.approx(2 * extra)
    head = analytic.head_times(GPT, micro_batch=2, seq_len=1024, tp=2, gpu=GPU, dtype=Dtype.BF16)
    head32 = analytic.head_times(
        GPT, micro_batch=2, seq_len=1024, tp=2, gpu=GPU, dtype=Dtype.BF16, norm_input_bytes=4
    )
    assert head32.forward_s - head.forward_s == pytest.approx(
        kernels.memory_bound_s(16 * 2 * 1024 * H, GPU, C)
    )
