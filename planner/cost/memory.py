"""Memory per GPU: activations per block, parameter/gradient/optimizer bytes, in-flight counts.

Owns: Korthikanti et al. 2022 Table 2 activation bytes adapted to GQA, SwiGLU and flash
attention; the exact per-TP-rank parameter counts of a block, the embedding and the head;
mixed-precision Adam bytes with ZeRO stages 0-3 (Rajbhandari et al. 2020); micro-batches in
flight per pipeline rank for each schedule; the framework reserve.
Does not own: assembling a rank's total (estimate.py builds the SplitProblem and sums from it).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.specs import Dtype, MlpKind, ModelSpec, NormKind, PositionKind

GIB = 2**30
# CUDA context + cuBLAS/cuDNN workspaces + NCCL communicator buffers, resident outside the
# PyTorch caching allocator. CUDA context with lazy module loading is ~0.5 GiB on A100/H100
# (CUDA 12 "Lazy Loading" notes); cuBLAS workspaces 4-32 MiB per stream; NCCL keeps
# NCCL_BUFFSIZE = 4 MiB per channel per peer and direction (NCCL env docs), ~0.5-1 GiB for the
# 3 communicators (tp, dp, pp) of a 3D-parallel job. Unit: bytes.
FRAMEWORK_RESERVE_BYTES = 2.0 * GIB
# A CPU worker (gloo) has no CUDA context or NCCL buffers: the Python interpreter with torch
# imported is ~220 MiB resident (measured with getrusage on torch 2.13 CPU), plus gloo buffers
# and the allocator's arenas. Unit: bytes.
CPU_WORKER_RESERVE_BYTES = 0.5 * GIB
# Caching-allocator fragmentation on activation memory (blocks freed out of order in
# backward leave holes); PyTorch "CUDA semantics: memory management" describes the effect;
# 10 % is a commonly observed reserved/allocated overhead. Unit: fraction of activation bytes.
ALLOCATOR_FRAGMENTATION = 0.10
# Adam state per parameter with low-precision weights: fp32 master + 2 fp32 moments
# (Rajbhandari et al. 2020, ZeRO Sec. 3.1: K = 12). Unit: bytes per parameter.
ADAM_MIXED_BYTES_PER_PARAM = 12
# With fp32 weights the master copy is the weight itself: 2 moments only. Unit: bytes/param.
ADAM_FP32_BYTES_PER_PARAM = 8


def has_dropout(model: ModelSpec) -> bool:
    """GPT-family (GELU MLP) models train with dropout (Megatron-LM GPT default 0.1);
    Llama-family recipes use none. Dropout masks are 1 byte per element (Korthikanti Sec. 4.1)."""
    return model.mlp is MlpKind.GELU


def block_activation_bytes(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    sequence_parallel: bool,
    recompute: str,
    flash_attention: bool,
    dtype: Dtype,
) -> float:
    """Bytes one block keeps for backward, per micro-batch, on one GPU.

    Korthikanti et al. 2022 Sec. 4.1 / Table 2 (s=seq, b=micro-batch, h=hidden, a=heads,
    t=tp, 2-byte activations): no parallelism sbh(34 + 5as/h); TP sbh(10 + 24/t + 5as/(ht));
    TP+SP sbh(34/t + 5as/(ht)); selective recompute drops the 5as/h term; full recompute keeps
    the block input, 2sbh (sharded by t with SP, as Megatron stores it).
    The 34 = replicated 10 (two norm inputs 4, QKV and MLP inputs 4, two dropout masks 2) +
    sharded 24 (Q,K 4, V 2, attention output 2, MLP 16 = 2 x 4h). Generalised per element:
    Q/K/V/O use q_dim and kv_dim (GQA); a SwiGLU MLP keeps gate, up, silu(gate) and the
    product (4 x ffn) instead of GELU's 2 x ffn; no dropout masks without dropout. The s x s
    term (softmax 2as, dropout mask as, dropout output 2as) exists only for materialised
    attention; flash attention (Dao et al. 2022) keeps the fp32 log-sum-exp (4a bytes/token).
    """
    d = dtype.nbytes
    tokens = micro_batch * seq_len
    h, f = model.hidden, model.ffn_hidden
    if recompute == "full":
        return d * h * tokens / (tp if sequence_parallel else 1)
    drop = has_dropout(model)
    replicated = 4 * d * h + (2 * h if drop else 0)
    sharded = d * (model.q_dim + model.kv_dim) + d * model.kv_dim + d * model.q_dim
    sharded += (2 if model.mlp is MlpKind.GELU else 4) * d * f
    if flash_attention:
        scores = 4.0 * model.heads
    elif recompute == "selective":
        scores = 0.0
    else:
        scores = (2 * d + 1 if drop else d) * model.heads * seq_len
    per_token = replicated / (tp if sequence_parallel else 1) + (sharded + scores) / tp
    return per_token * tokens


def embedding_activation_bytes(
    model: ModelSpec, *, micro_batch: int, seq_len: int, tp: int, sequence_parallel: bool
) -> float:
    """Token ids (int64) kept for the embedding's backward, plus the embedding-dropout mask
    (Korthikanti et al. 2022 Sec. 4.3: sbh bytes, /t with SP) when the model uses dropout."""
    tokens = micro_batch * seq_len
    mask = model.hidden * tokens / (tp if sequence_parallel else 1) if has_dropout(model) else 0
    return 8.0 * tokens + mask


def head_activation_bytes(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    sequence_parallel: bool,
    dtype: Dtype,
) -> float:
    """Final norm input + head input + logits for one micro-batch on the last pipeline rank.

    Korthikanti et al. 2022 Sec. 4.3: the output layer keeps its input and the cross-entropy
    works on fp32 logits, sbv/t elements. We count 8 bytes per logit element: the fp32
    log-probabilities kept for backward plus the fp32 gradient made from them at the peak.
    """
    tokens = micro_batch * seq_len
    d = dtype.nbytes
    norm_in = d * model.hidden * tokens / (tp if sequence_parallel else 1)
    head_in = d * model.hidden * tokens
    logits = 8.0 * tokens * (-(-model.vocab // tp))
    return norm_in + head_in + logits


@dataclass(frozen=True, kw_only=True)
class RankParams:
    """Parameter elements one TP rank holds, by part (exact; replicated norms/biases counted)."""

    per_block: int
    embedding: int
    head: int


def tp_rank_params(model: ModelSpec, tp: int, pp_chunks: int) -> RankParams:
    """Elements per TP rank (Shoeybi et al. 2019 Sec. 3 split): q/k/v, output and MLP weights
    and the column-parallel biases are divided by tp; norms and row-parallel biases are
    replicated. Vocab-parallel embedding/head hold ceil(V/tp) rows. `head` includes the final
    norm; with tied embeddings and more than one chunk the last stage keeps its own copy of
    the embedding matrix for the head (Megatron-LM, Narayanan et al. 2021 Sec. 2.2)."""
    h, q, kv, f = model.hidden, model.q_dim, model.kv_dim, model.ffn_hidden
    norm = 2 * h if model.norm is NormKind.LAYERNORM else h
    attn = (h * q + 2 * h * kv + q * h) // tp
    if model.bias:
        attn += (q + 2 * kv) // tp + h
    elif model.qkv_bias:
        attn += (q + 2 * kv) // tp
    n_mats = 2 if model.mlp is MlpKind.GELU else 3
    mlp = n_mats * h * f // tp
    if model.bias:
        mlp += (n_mats - 1) * f // tp + h
    vocab_rows = -(-model.vocab // tp)
    embedding = vocab_rows * h + (
        model.max_seq_len * h if model.position is PositionKind.LEARNED else 0
    )
    head_matrix = vocab_rows * h if (not model.tied_embeddings or pp_chunks > 1) else 0
    return RankParams(per_block=attn + mlp + 2 * norm, embedding=embedding, head=head_matrix + norm)


@dataclass(frozen=True, kw_only=True)
class StateBytesPerParam:
    """Bytes per parameter on one GPU after ZeRO sharding over dp (ZeRO paper Sec. 5:
    stage 1 shards the optimizer state, 2 also gradients, 3 also weights)."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def state_bytes_per_param(
    dtype: Dtype, grad_dtype: Dtype, zero: int, dp: int
) -> StateBytesPerParam:
    w = float(dtype.nbytes)
    g = float(grad_dtype.nbytes)
    o = float(ADAM_FP32_BYTES_PER_PARAM if dtype is Dtype.FP32 else ADAM_MIXED_BYTES_PER_PARAM)
    return StateBytesPerParam(
        weights=w / dp if zero >= 3 else w,
        grads=g / dp if zero >= 2 else g,
        optimizer=o / dp if zero >= 1 else o,
    )


def in_flight(
    schedule: str, pp: int, virtual_stages: int, num_micro_batches: int
) -> tuple[float, ...]:
    """Micro-batches whose activations pipeline rank r holds at its peak, per chunk it owns.

    1F1B (Narayanan et al. 2021 Sec. 2.2.1): rank r runs pp-r-1 warm-up forwards and one more
    before its first backward: min(pp - r, m). Interleaved (Megatron-LM schedule): rank r has
    2(pp-r-1) + (v-1)pp + 1 chunk-forwards outstanding at its first backward, over v chunks;
    for r = 0 this is the (1 + (pp-1)/(pp*v)) factor of Korthikanti et al. 2022 Eq. 5.
    GPipe (Huang et al. 2019) holds all m micro-batches before the first backward.
    """
    m, v = num_micro_batches, virtual_stages
    if schedule == "gpipe":
        return (float(m),) * pp
    if schedule == "interleaved":
        return tuple(min(2 * (pp - r - 1) + (v - 1) * pp + 1, m * v) / v for r in range(pp))
    return tuple(float(min(pp - r, m)) for r in range(pp))
