"""Analytic (no-profile) compute costs: FLOPs of each block, the kernels a block runs, and the
fitted constants.

Owns: matmul FLOPs of a transformer block, the embedding and the head, per GPU for a tensor-
parallel degree; the model / hardware FLOPs of a training step (throughput figures); the list
of kernels one block, the head and the embedding run (each linear by its GEMM shapes, the
attention core by kind, every memory-bound kernel by the bytes it reads and writes), timed by
planner/cost/kernels.py; the fitted constants (`AnalyticConstants`).
Does not own: activation memory (memory.py), collectives (collectives.py), measured times
(compute.py), the fit (calibration.py).

The constants are fitted by planner/cost/calibration.py (run through
benchmarks/calibrate_analytic.py) on two published sources together, each priced as the system
that produced it ran (planner/runtime.py): Narayanan et al. 2021 (PTD-P) Table 1 and
MosaicML llm-foundry's MPT benchmarks (../shared/calibration/); see
benchmarks/results/calibration_report.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.kernels import (
    KernelConstants,
    flash_attention_s,
    gemm_s,
    linear_s,
    memory_bound_s,
)
from planner.specs import Dtype, GpuSpec, MlpKind, ModelSpec, PositionKind

# Fitted by planner/cost/calibration.py on PTD-P Table 1 and llm-foundry together (226 rows):
# fitted MAPE 2.90 % (PTD-P) and 4.87 % (llm-foundry); leave-one-source-out 7.67 % and
# 32.21 % (without llm-foundry nothing identifies flash attention or Hopper: see
# benchmarks/results/calibration_report.md). Units and meaning in kernels.KernelConstants.
EFF_MAX = 0.764
GEMM_OVERHEAD_S = 1.126e-4
ATTENTION_EFFICIENCY = 0.3028
HBM_EFFICIENCY = 0.8005
HOPPER_EFF_MAX = 0.5966
HOPPER_ATTENTION_EFFICIENCY = 0.1779
# Fraction of a link's nominal per-direction bandwidth that NCCL's collectives attain, per link
# class. Not fitted (the calibration rows do not identify them): estimates from nccl-tests'
# bus bandwidth (NVIDIA nccl-tests doc/PERFORMANCE.md defines busbw so it is comparable with
# the link's speed). NVSwitch NVLink: all_reduce busbw of about 230-240 GB/s of 300 on DGX A100
# and 360-370 of 450 on DGX H100 without NVLS as commonly reported: 0.78. InfiniBand /
# RoCE: 23-24 GB/s of a 25 GB/s HDR NIC per GPU (perftest ib_write_bw and nccl-tests
# inter-node busbw): 0.92.
INTRA_LINK_EFFICIENCY = 0.78
NETWORK_EFFICIENCY = 0.92


@dataclass(frozen=True, kw_only=True)
class AnalyticConstants(KernelConstants):
    """The constants of the analytic path (defaults: the committed fit and link estimates)."""

    eff_max: float = EFF_MAX
    gemm_overhead_s: float = GEMM_OVERHEAD_S
    attention_efficiency: float = ATTENTION_EFFICIENCY
    hbm_efficiency: float = HBM_EFFICIENCY
    hopper_eff_max: float = HOPPER_EFF_MAX
    hopper_attention_efficiency: float = HOPPER_ATTENTION_EFFICIENCY
    intra_link_efficiency: float = INTRA_LINK_EFFICIENCY
    network_efficiency: float = NETWORK_EFFICIENCY


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
    """Forward FLOPs of one block per TP rank (2 FLOPs per multiply-add), one entry per GEMM
    of `_block_linears` (the same list block_times prices).

    GPT shape (Narayanan et al. 2021 Sec. 5.1 / Eq. 3): 24*B*s*h^2 + 4*B*s^2*h, generalised by
    counting each matmul: q/k/v projections 2*T*h*(q_dim + 2*kv_dim) (GQA), output 2*T*q_dim*h,
    MLP 2 (GELU) or 3 (SwiGLU) GEMMs of 2*T*h*ffn, attention 2 * 2*B*s^2*q_dim. An MoE block's
    feed-forward is the router, shared and local-expert GEMMs (planner/cost/moe.py's rules) at
    expert-parallel degree `ep` with the busiest rank's `moe_imbalance` (1: the model FLOPs).
    """
    tokens = micro_batch * seq_len
    linears = _block_linears(model, tokens, tp, ep, moe_imbalance)
    attention = 4.0 * micro_batch * seq_len * seq_len * model.q_dim / tp
    return BlockFlops(gemms=tuple(2.0 * r * n * k for r, n, k, _ in linears), attention=attention)


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


@dataclass(frozen=True, kw_only=True)
class PassTimes:
    """Seconds of one micro-batch through a block on one GPU, TP collectives excluded.

    `backward_s` includes the recompute forward when recompute is on (as profile records do).
    """

    forward_s: float
    backward_s: float


Linear = tuple[float, float, float, bool]  # (rows, out width, in width, feeds the activation)


def _mlp(rows: float, model: ModelSpec, ffn: float) -> list[Linear]:
    """One MLP's linears: GELU's up projection or SwiGLU's gate and up, then the down."""
    h = model.hidden
    ups = 1 if model.mlp is MlpKind.GELU else 2
    return [(rows, ffn, h, True)] * ups + [(rows, h, ffn, False)]


def _block_linears(
    model: ModelSpec,
    tokens: float,
    tp: int,
    ep: int = 1,
    imbalance: float = 1.0,
    per_expert_gemms: bool = True,
) -> list[Linear]:
    """The linears of a block on one TP rank (Megatron split: q/k/v and the MLP's first
    matrices column-parallel, the output and down projections row-parallel). An MoE block's
    feed-forward (moe.py, the executor's rules): the router over all experts, the shared-expert
    gate, each shared expert on every token, and each of the E/ep local experts on its
    T*k*imbalance*ep/E routed rows (one expert set over all copies without per-expert GEMMs)."""
    h = model.hidden
    out: list[Linear] = [
        (tokens, (model.q_dim + 2 * model.kv_dim) / tp, h, False),
        (tokens, h, model.q_dim / tp, False),
    ]
    m = model.moe
    if m is None:
        return out + _mlp(tokens, model, model.ffn_hidden / tp)
    out.append((tokens, m.experts, h, False))
    if m.shared_expert_gate:
        out.append((tokens, 1, h, False))
    for _ in range(m.shared_experts):
        out += _mlp(tokens, model, m.shared_ffn_hidden / tp)
    copies = tokens * m.top_k * imbalance
    if per_expert_gemms:
        local = m.experts // ep
        for _ in range(local):
            out += _mlp(copies / local, model, m.expert_ffn_hidden / tp)
    else:
        out += _mlp(copies, model, m.expert_ffn_hidden / tp)
    return out


def _elementwise_bytes(
    model: ModelSpec,
    linears: list[Linear],
    tokens: float,
    tp: int,
    sequence_parallel: bool,
    dtype: Dtype,
    dropout: bool,
    norm_input_bytes: int | None = None,
) -> float:
    """Bytes the memory-bound kernels of one block's forward read plus write (one TP rank).

    Two norms (`norm_bytes_per_element`), two residual adds (read 2, write 1), the MLP activation over
    the outputs of the linears that feed it (GELU: read and write; SwiGLU: read gate and up,
    write the product), RoPE on q and k (read and write), and with dropout two dropouts (read,
    write, 1-byte mask; Megatron fuses the bias add into them). Norms and adds run on the whole
    sequence on every TP rank unless sequence parallelism splits it (Korthikanti et al. 2022
    Sec. 4.2.2).
    """
    d = dtype.nbytes
    seq_part = tokens * model.hidden / (tp if sequence_parallel else 1)
    norms = 2 * norm_bytes_per_element(d, norm_input_bytes)
    per_seq = norms + 2 * 3 * d + (2 * (2 * d + 1) if dropout else 0)
    per_up = 2.0 if model.mlp is MlpKind.GELU else 1.5
    act = sum(per_up * d * rows * n for rows, n, _, up in linears if up)
    rope = 2 * d * tokens * (model.q_dim + model.kv_dim) / tp
    return per_seq * seq_part + act + (rope if model.position is PositionKind.ROPE else 0.0)


def norm_bytes_per_element(compute_bytes: int, norm_input_bytes: int | None) -> float:
    """Bytes one norm's forward streams per element. A fused norm in the compute dtype reads x
    and writes y: 2d (Megatron's fused LayerNorm; `norm_input_bytes` None). A runtime whose
    norms run in another precision (`MemoryRules.norm_input_bytes` f: CUDA autocast runs
    layer_norm / rms_norm in fp32) adds the casts around the kernel: the input cast up (read d,
    write f), the kernel in f (read f, write f), the output cast back to the compute dtype
    (read f, write d; executor/model.py `_to_compute_dtype`): 2d + 4f."""
    f = norm_input_bytes
    if f is None or f == compute_bytes:
        return 2.0 * compute_bytes
    return 2.0 * compute_bytes + 4.0 * f


def causal_window_fraction(model: ModelSpec, seq_len: int) -> float:
    """Executed share of the causal attention products, averaged over the model's blocks:
    1 for full causal attention; a block with a sliding window of w < s tokens computes
    w*s - w(w-1)/2 of the s(s+1)/2 query-key products (FlashAttention-2's `window_size`
    skips the tiles outside the window, Dao 2023 Sec. 3; Mistral, Gemma 2). The cost model
    prices uniform blocks, so alternating window/full layers are priced at their mean."""
    w, s = model.sliding_window, seq_len
    if not w or w >= s or not model.sliding_layers:
        return 1.0
    windowed = (w * s - w * (w - 1) / 2) / (s * (s + 1) / 2)
    share = len(model.sliding_layers) / model.layers
    return share * windowed + (1.0 - share)


def _attention_core(
    model: ModelSpec,
    micro_batch: int,
    seq_len: int,
    tp: int,
    flash: bool,
    dtype: Dtype,
    dropout: bool,
    gpu: GpuSpec,
    c: KernelConstants,
) -> tuple[float, float]:
    """(forward, backward) seconds of the attention core: flash executes the causal half of
    QK^T and PV (Dao et al. 2022); the materialised path runs both batched GEMMs over the full
    square plus the softmax (and dropout) over b*a/t*s^2 scores (Megatron's fused scaled masked
    softmax reads the scores and writes the probabilities). A sliding window shrinks what
    flash executes (causal_window_fraction); the materialised path masks the full square."""
    full = block_flops(model, micro_batch, seq_len, tp).attention
    if flash:
        return flash_attention_s(0.5 * full * causal_window_fraction(model, seq_len), gpu, dtype, c)
    rows = micro_batch * model.heads / tp * seq_len
    qk = gemm_s(rows, seq_len, model.head_dim, gpu, dtype, c)
    pv = gemm_s(rows, model.head_dim, seq_len, gpu, dtype, c)
    d = dtype.nbytes
    scores = rows * seq_len
    softmax = memory_bound_s(scores * (2 * d + ((2 * d + 1) if dropout else 0)), gpu, c)
    fwd = qk + pv + softmax
    return fwd, 2.0 * fwd


def block_times(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    recompute: str,
    flash_attention: bool,
    sequence_parallel: bool,
    dropout: bool,
    gpu: GpuSpec,
    dtype: Dtype,
    gemm_dtype: Dtype | None = None,
    c: KernelConstants = DEFAULT_CONSTANTS,
    ep: int = 1,
    moe_imbalance: float = 1.0,
    per_expert_gemms: bool = True,
    norm_input_bytes: int | None = None,
) -> PassTimes:
    """Analytic forward/backward time of one block: its linears by GEMM shape
    (kernels.linear_s, in `gemm_dtype`: FP8 with fp8 linears; an MoE block's router, shared and
    local-expert GEMMs at their own row counts, moe.py), the attention core, and its
    memory-bound kernels by bytes; backward streams twice the forward's elementwise bytes
    (saved input and incoming gradient read, gradient written). Full recompute runs the
    forward again in backward; selective re-runs the checkpointed attention core (executor/
    model.py Attention.core under torch.utils.checkpoint), flash or not."""
    gd = gemm_dtype or dtype
    tokens = micro_batch * seq_len
    linears = _block_linears(model, tokens, tp, ep, moe_imbalance, per_expert_gemms)
    fwd = bwd = 0.0
    for rows, n, k, _ in linears:
        f, b = linear_s(rows, n, k, gpu, gd, c)
        fwd, bwd = fwd + f, bwd + b
    attn_f, attn_b = _attention_core(
        model, micro_batch, seq_len, tp, flash_attention, dtype, dropout, gpu, c
    )
    elem = _elementwise_bytes(
        model, linears, tokens, tp, sequence_parallel, dtype, dropout, norm_input_bytes
    )
    if gd is Dtype.FP8:
        # casts of the inputs in forward; of the output gradients and weights again in backward
        elem += sum(rows * k + k * n for rows, n, k, _ in linears) * (2 * dtype.nbytes + 1)
    mem_f = memory_bound_s(elem, gpu, c)
    fwd += attn_f + mem_f
    bwd += attn_b + 2.0 * mem_f
    if recompute == "full":
        bwd += fwd
    elif recompute == "selective":
        bwd += attn_f
    return PassTimes(forward_s=fwd, backward_s=bwd)


# Bytes per logit element the loss streams: the head's output written in the compute dtype,
# read and written as an fp32 copy, log-softmax read and written in fp32 (forward); backward
# reads the saved log-softmax, writes the fp32 gradient and its compute-dtype cast.
LOSS_FORWARD_BYTES_PER_LOGIT = 12.0


def head_times(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    gpu: GpuSpec,
    dtype: Dtype,
    c: KernelConstants = DEFAULT_CONSTANTS,
    norm_input_bytes: int | None = None,
) -> PassTimes:
    """Final norm (`norm_bytes_per_element`) + vocabulary projection (vocab-parallel,
    T x V/t x h) + cross-entropy."""
    tokens = micro_batch * seq_len
    f, b = linear_s(tokens, -(-model.vocab // tp), model.hidden, gpu, dtype, c)
    d = dtype.nbytes
    logits = tokens * model.vocab / tp
    mem = memory_bound_s(
        (LOSS_FORWARD_BYTES_PER_LOGIT + 2 * d) * logits
        + norm_bytes_per_element(d, norm_input_bytes) * tokens * model.hidden,
        gpu,
        c,
    )
    return PassTimes(forward_s=f + mem, backward_s=b + mem)


def embedding_times(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    gpu: GpuSpec,
    dtype: Dtype,
    c: KernelConstants = DEFAULT_CONSTANTS,
) -> PassTimes:
    """Token (+ position) lookup: reads and writes T*h elements; backward reads the gradient
    and read-modify-writes the table rows it touches."""
    nbytes = 2.0 * micro_batch * seq_len * model.hidden * dtype.nbytes
    t = memory_bound_s(nbytes, gpu, c)
    return PassTimes(forward_s=t, backward_s=1.5 * t)
