"""Memory per GPU: activations per block, parameter/gradient/optimizer bytes, in-flight counts.

Owns: Korthikanti et al. 2022 Table 2 activation bytes adapted to GQA, SwiGLU and flash
attention; the exact per-TP-rank parameter counts of a block, the embedding and the head;
mixed-precision Adam bytes with ZeRO stages 0-3 (Rajbhandari et al. 2020); micro-batches in
flight per pipeline rank for each schedule; the framework reserve.
Does not own: assembling a rank's total (estimate.py builds the SplitProblem and sums from it).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost import moe
from planner.runtime import EXECUTOR_MEMORY, MemoryRules
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


def has_dropout(model: ModelSpec, rules: MemoryRules) -> bool:
    """GPT-family (GELU MLP) models train with dropout in Megatron-LM (GPT default 0.1);
    Llama-family recipes use none; the executor has none. Masks are 1 byte per element
    (Korthikanti Sec. 4.1)."""
    return rules.dropout and model.mlp is MlpKind.GELU


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
    residual_bytes: int | None = None,
    rules: MemoryRules = EXECUTOR_MEMORY,
    ep: int = 1,
) -> float:
    """Bytes one block keeps for backward, per micro-batch, on one GPU.

    Korthikanti et al. 2022 Sec. 4.1 / Table 2 (s=seq, b=micro-batch, h=hidden, a=heads,
    t=tp, 2-byte activations): no parallelism sbh(34 + 5as/h); TP sbh(10 + 24/t + 5as/(ht));
    TP+SP sbh(34/t + 5as/(ht)); selective recompute drops the 5as/h term; full recompute keeps
    the block input, 2sbh (sharded by t with SP, as Megatron stores it). With
    `rules=MEGATRON_MEMORY` this function is exactly Table 2, generalised per element: Q/K/V/O
    use q_dim and kv_dim (GQA); a SwiGLU MLP keeps gate, up, silu(gate) and the product
    (4 x ffn) instead of GELU's 2 x ffn; no dropout masks without dropout. The s x s term
    (softmax 2as, dropout mask as, dropout output 2as) exists only for materialised attention;
    flash attention (Dao et al. 2022) keeps the fp32 log-sum-exp (4a bytes/token).
    The runtime's own rules (`MemoryRules`) change four terms: what a norm keeps of its input
    and its statistics, whether SP's linears keep the gathered full-sequence input, dropout,
    and the RoPE tables; `residual_bytes` (default: the compute dtype) is what full recompute
    keeps per element of the block input. An MoE block keeps its feed-forward's bytes of
    planner/cost/moe.py (router, k routed copies at expert-parallel degree `ep`, shared experts)
    in place of the dense MLP's.
    """
    d = dtype.nbytes
    tokens = micro_batch * seq_len
    h, f = model.hidden, model.ffn_hidden
    t_sp = tp if sequence_parallel else 1
    if recompute == "full":
        return (residual_bytes or d) * h * tokens / t_sp
    norm_in = rules.norm_input_bytes or d
    stats = (8 if model.norm is NormKind.LAYERNORM else 4) if rules.norm_stats else 0
    seq_sharded = 2 * (norm_in * h + stats) + (2 * h if has_dropout(model, rules) else 0)
    linear_inputs = 2 * d * h  # the input of q/k/v and of the MLP's first matrices
    sharded = d * (model.q_dim + model.kv_dim) + d * model.kv_dim + d * model.q_dim
    if model.moe is None:
        sharded += (2 if model.mlp is MlpKind.GELU else 4) * d * f
        routed = 0.0
    else:  # tokens are replicated over TP inside the MoE block (runtime.py MoeRules)
        routed = moe.mlp_activation_bytes_per_token(model, tp, ep, d)
    if flash_attention:
        scores = 0.0 if recompute == "selective" and rules.rope_tables_saved else 4.0 * model.heads
    elif recompute == "selective":
        scores = 0.0
    else:
        scores = (2 * d + 1 if has_dropout(model, rules) else d) * model.heads * seq_len
    gathered = sequence_parallel and rules.sp_saves_gathered_inputs
    per_token = (
        seq_sharded / t_sp
        + linear_inputs / (1 if gathered else t_sp)
        + (sharded + scores) / tp
        + routed
    )
    # cos and sin [seq, head_dim/2] per micro-batch, recomputed with the core under selective
    rope = (
        seq_len * model.head_dim * d
        if rules.rope_tables_saved
        and model.position is PositionKind.ROPE
        and recompute != "selective"
        else 0.0
    )
    return per_token * tokens + rope


def embedding_activation_bytes(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    sequence_parallel: bool,
    rules: MemoryRules = EXECUTOR_MEMORY,
) -> float:
    """Token ids (int64) kept for the embedding's backward, plus the embedding-dropout mask
    (Korthikanti et al. 2022 Sec. 4.3: sbh bytes, /t with SP) when the model uses dropout."""
    tokens = micro_batch * seq_len
    dropout = has_dropout(model, rules)
    mask = model.hidden * tokens / (tp if sequence_parallel else 1) if dropout else 0
    return 8.0 * tokens + mask


def head_activation_bytes(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    sequence_parallel: bool,
    dtype: Dtype,
    pipelined: bool = False,
    in_flight: float = 1.0,
    rules: MemoryRules = EXECUTOR_MEMORY,
) -> float:
    """Final norm + head input + the loss's peak for one micro-batch on the last pipeline rank.

    Korthikanti et al. 2022 Sec. 4.3: the output layer keeps its input and the cross-entropy
    works on fp32 logits, sbv/t elements; the bytes per logit element alive at the loss's peak
    are the runtime's (`MemoryRules.loss_bytes_per_logit`, measured for the executor). Under
    torch pipelining the stage also keeps its output (the compute-dtype logits) until the
    micro-batch's backward. With `in_flight` micro-batches between their forward and backward
    (GPipe: all of them) the saved part is kept per micro-batch and the rest of the loss's
    peak comes once.
    """
    tokens = micro_batch * seq_len
    d = dtype.nbytes
    t_sp = tp if sequence_parallel else 1
    norm_in = (rules.norm_input_bytes or d) * model.hidden * tokens / t_sp
    head_in = d * model.hidden * tokens
    peak = rules.loss_parallel_bytes_per_logit if tp > 1 else rules.loss_bytes_per_logit
    saved = rules.loss_saved_bytes_per_logit
    if pipelined and rules.pipeline_keeps_stage_output:
        saved += d
        peak += d
    logits = tokens * (-(-model.vocab // tp))
    kept = norm_in + head_in + saved * logits
    return in_flight * kept + (peak - saved) * logits


@dataclass(frozen=True, kw_only=True)
class RankParams:
    """Parameter elements one TP rank holds, by part (exact; replicated norms/biases counted)."""

    per_block: int
    embedding: int
    head: int
    # An MoE block's routed-expert parameters on this rank (E / ep experts, split by tp);
    # sharded by ZeRO over the expert-data-parallel group, not over dp. `per_block` is the rest.
    expert_per_block: int = 0


def tp_rank_params(model: ModelSpec, tp: int, pp_chunks: int, ep: int = 1) -> RankParams:
    """Elements per TP rank (Shoeybi et al. 2019 Sec. 3 split): q/k/v, output and MLP weights
    and the column-parallel biases are divided by tp; norms and row-parallel biases are
    replicated. Vocab-parallel embedding/head hold ceil(V/tp) rows. `head` includes the final
    norm; with tied embeddings and more than one chunk the last stage keeps its own copy of
    the embedding matrix for the head (Megatron-LM, Narayanan et al. 2021 Sec. 2.2). An MoE
    block's feed-forward is planner/cost/moe.py's router + shared experts, and its routed
    experts are counted apart (`expert_per_block`)."""
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
    experts = 0
    if model.moe is not None:
        mlp, experts = (
            moe.non_expert_mlp_params(model, tp),
            moe.expert_params_per_rank(model, tp, ep),
        )
    vocab_rows = -(-model.vocab // tp)
    embedding = vocab_rows * h + (
        model.max_seq_len * h if model.position is PositionKind.LEARNED else 0
    )
    head_matrix = vocab_rows * h if (not model.tied_embeddings or pp_chunks > 1) else 0
    return RankParams(
        per_block=attn + mlp + 2 * norm,
        embedding=embedding,
        head=head_matrix + norm,
        expert_per_block=experts,
    )


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
    dtype: Dtype,
    grad_dtype: Dtype,
    zero: int,
    dp: int,
    *,
    pipelined: bool = False,
    rules: MemoryRules = EXECUTOR_MEMORY,
) -> StateBytesPerParam:
    """`pipelined` with `rules.pipelined_fsdp_unsharded`: weights and gradients stay unsharded
    across the step whatever the ZeRO stage (only the optimizer state is sharded)."""
    w = float(dtype.nbytes)
    g = float(grad_dtype.nbytes)
    o = float(ADAM_FP32_BYTES_PER_PARAM if dtype is Dtype.FP32 else ADAM_MIXED_BYTES_PER_PARAM)
    unsharded = pipelined and rules.pipelined_fsdp_unsharded and dp > 1
    return StateBytesPerParam(
        weights=w / dp if zero >= 3 and not unsharded else w,
        grads=g / dp if zero >= 2 and not unsharded else g,
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


def pipeline_buffer_bytes(
    p2p_bytes: float,
    *,
    pp: int,
    virtual_stages: int,
    num_micro_batches: int,
    pp_rank: int,
    rules: MemoryRules = EXECUTOR_MEMORY,
) -> float:
    """Receive buffers pipeline rank `pp_rank` keeps: with torch pipelining one activation
    buffer per micro-batch for each chunk that is not the first and one gradient buffer per
    micro-batch for each chunk that is not the last (chunk k on rank k % pp); otherwise a send
    and a receive buffer (Megatron's p2p)."""
    if pp == 1:
        return 0.0
    if not rules.recv_buffer_per_micro_batch:
        return 2 * p2p_bytes
    last = pp * virtual_stages - 1
    chunks = range(pp_rank, last + 1, pp)
    buffers = sum((k != 0) + (k != last) for k in chunks)
    return buffers * num_micro_batches * p2p_bytes


def embedding_gradient_excess_bytes(
    model: ModelSpec, tp: int, grad_dtype: Dtype, rules: MemoryRules = EXECUTOR_MEMORY
) -> float:
    """Bytes the embedding's gradient holds beyond the rank's vocabulary shard: with
    `rules.embedding_grad_full_vocab` and tp > 1 the gradient has all V rows on every TP rank,
    in the gradient dtype (FSDP accumulates unsharded gradients in its reduce dtype)."""
    if not rules.embedding_grad_full_vocab or tp == 1:
        return 0.0
    return float(grad_dtype.nbytes * (model.vocab - -(-model.vocab // tp)) * model.hidden)
