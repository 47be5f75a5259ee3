"""FLOPs formulas (Narayanan et al. 2021 Eq. 3; Korthikanti et al. 2022 Eq. 7) and efficiency."""

from __future__ import annotations

import pytest

from planner.cost import analytic
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


def test_efficiency_saturates_and_backward_is_twice_forward() -> None:
    c = analytic.DEFAULT_CONSTANTS
    small = analytic.gemm_efficiency(1e6, 312e12, c)
    big = analytic.gemm_efficiency(1e17, 312e12, c)
    assert small < big < c.eff_max
    assert big == pytest.approx(c.eff_max, rel=1e-3)
    gpu = GpuSpec(
        name="x",
        memory_bytes=2**30,
        peak_bf16_flops=1e15,
        peak_fp16_flops=1e15,
        peak_fp32_flops=1e14,
        hbm_bytes_per_s=1e12,
    )
    kw = dict(
        micro_batch=1,
        seq_len=512,
        tp=1,
        flash_attention=False,
        elementwise_bytes=1e6,
        gpu=gpu,
        dtype=Dtype.BF16,
    )
    none = analytic.block_times(GPT, recompute="none", **kw)
    full = analytic.block_times(GPT, recompute="full", **kw)
    assert none.backward_s == pytest.approx(2 * none.forward_s)
    assert full.backward_s == pytest.approx(3 * none.forward_s)
