"""Memory formulas pinned against hand-computed cases (Korthikanti et al. 2022 Table 2; ZeRO).

Table 2 is Megatron's runtime (`MEGATRON_MEMORY`); the executor's own rules are checked
against its saved tensors in tests/test_memory_parity.py."""

from __future__ import annotations

import pytest

from planner.cost import memory
from planner.hf import model_from_fields
from planner.runtime import MEGATRON_MEMORY
from planner.specs import Dtype

# GPT shape: h=256, a=8 heads, ffn=4h, dropout; s=128, b=2 -> sbh = 65536
GPT = model_from_fields(
    "t",
    {"family": "gpt", "layers": 4, "hidden": 256, "heads": 8, "vocab": 1000, "max_seq_len": 128},
    "t",
)
SBH = 128 * 2 * 256


def act(tp: int, sp: bool, recompute: str, flash: bool = False) -> float:
    return memory.block_activation_bytes(
        GPT,
        micro_batch=2,
        seq_len=128,
        tp=tp,
        sequence_parallel=sp,
        recompute=recompute,
        flash_attention=flash,
        dtype=Dtype.BF16,
        rules=MEGATRON_MEMORY,
    )


def test_table2_no_parallelism() -> None:
    # sbh(34 + 5as/h) = 65536 * (34 + 5*8*128/256) = 65536 * 54
    assert act(1, False, "none") == 3_538_944 == SBH * 54


def test_table2_tensor_parallel() -> None:
    # sbh(10 + 24/t + 5as/(ht)), t=4: 65536 * (10 + 6 + 5)
    assert act(4, False, "none") == 1_376_256 == SBH * 21


def test_table2_tensor_and_sequence_parallel() -> None:
    # sbh(34/t + 5as/(ht)), t=4: 65536 * (8.5 + 5)
    assert act(4, True, "none") == 884_736 == SBH * 13.5


def test_table2_selective_recompute() -> None:
    # TP: sbh(10 + 24/t); TP+SP: sbh(34/t)
    assert act(4, False, "selective") == SBH * 16
    assert act(4, True, "selective") == SBH * 8.5


def test_table2_full_recompute() -> None:
    # 2sbh (input of the block only); sharded by t with SP
    assert act(4, False, "full") == 2 * SBH
    assert act(4, True, "full") == 2 * SBH / 4


def test_flash_attention_drops_score_term() -> None:
    # flash: no 5as/h term; keeps fp32 log-sum-exp, 4 bytes per head per token: 4*a*s*b/t
    assert act(4, False, "none", flash=True) == SBH * 16 + 4 * 8 * 128 * 2 / 4


def test_gqa_swiglu_no_dropout() -> None:
    llama = model_from_fields(
        "l",
        {
            "family": "llama",
            "layers": 2,
            "hidden": 256,
            "heads": 8,
            "kv_heads": 2,
            "ffn_hidden": 512,
            "vocab": 1000,
            "max_seq_len": 128,
        },
        "l",
    )
    got = memory.block_activation_bytes(
        llama,
        micro_batch=1,
        seq_len=128,
        tp=1,
        sequence_parallel=False,
        recompute="none",
        flash_attention=True,
        dtype=Dtype.BF16,
        rules=MEGATRON_MEMORY,
    )
    # per token: norms+inputs 4*2*256=2048; Q,K 2*(256+64)=640; V 2*64=128; O 2*256=512;
    # SwiGLU gate, up, silu(gate), product 4*2*512=4096; LSE 4*8=32  -> 7456 bytes/token
    assert got == 7456 * 128


def test_parameter_counts_exact() -> None:
    pc = GPT.param_count()
    one = memory.tp_rank_params(GPT, 1, 1)
    assert one.per_block == pc.per_block
    assert one.embedding + one.head == pc.embedding + pc.position + pc.final_norm  # tied, pp=1
    two = memory.tp_rank_params(GPT, 2, 1)
    h = 256
    replicated = 2 * 2 * h + h + h  # two LayerNorms (w+b), attention-out bias, fc2 bias
    assert two.per_block == (pc.per_block - replicated) // 2 + replicated
    # tied embeddings with more than one chunk: the last stage keeps a copy for the head
    assert memory.tp_rank_params(GPT, 1, 2).head == 1000 * h + 2 * h


@pytest.mark.parametrize(
    "zero,expect",
    # ZeRO paper Sec. 5 with 2-byte weights/grads and K=12 over Nd=4: (w, g, o) bytes per param
    [(0, (2, 2, 12)), (1, (2, 2, 3)), (2, (2, 0.5, 3)), (3, (0.5, 0.5, 3))],
)
def test_zero_stages(zero: int, expect: tuple[float, float, float]) -> None:
    s = memory.state_bytes_per_param(Dtype.BF16, Dtype.BF16, zero, 4)
    assert (s.weights, s.grads, s.optimizer) == expect


def test_fp32_grads_and_fp32_weights() -> None:
    assert memory.state_bytes_per_param(Dtype.BF16, Dtype.FP32, 0, 1).total == 18
    assert memory.state_bytes_per_param(Dtype.FP32, Dtype.FP32, 0, 1).total == 16


def test_in_flight_per_schedule() -> None:
    assert memory.in_flight("1f1b", 4, 1, 8) == (4, 3, 2, 1)
    assert memory.in_flight("1f1b", 4, 1, 2) == (2, 2, 2, 1)
    assert memory.in_flight("gpipe", 4, 1, 8) == (8,) * 4
    p, v = 4, 2
    first = memory.in_flight("interleaved", p, v, 8)[0]
    # Korthikanti Eq. 5: first stage holds p micro-batches of L/p layers times (1 + (p-1)/(pv));
    # per chunk of L/(pv) layers over v chunks that is p + (p-1)/v micro-batches
    assert first == pytest.approx(p * (1 + (p - 1) / (p * v)))


def test_pipeline_receive_buffers_per_micro_batch_and_chunk() -> None:
    # 1F1B, pp 4, m 8: the first rank receives only gradients, the last only activations
    got = [
        memory.pipeline_buffer_bytes(1.0, pp=4, virtual_stages=1, num_micro_batches=8, pp_rank=r)
        for r in range(4)
    ]
    assert got == [8.0, 16.0, 16.0, 8.0]
    # interleaved v 2: rank 0 holds chunks 0 and 4 (of 8): 1 + 2 buffers per micro-batch
    assert (
        memory.pipeline_buffer_bytes(1.0, pp=4, virtual_stages=2, num_micro_batches=8, pp_rank=0)
        == 24.0
    )
    assert (
        memory.pipeline_buffer_bytes(
            1.0, pp=4, virtual_stages=2, num_micro_batches=8, pp_rank=0, rules=MEGATRON_MEMORY
        )
        == 2.0
    )
