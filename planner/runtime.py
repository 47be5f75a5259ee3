"""Runtime semantics: what a training runtime does, as one description the cost model reads.

Owns: `RuntimeSemantics`, the rules of a runtime that decide time and memory but are not
physics: when gradients are reduced, what overlaps with compute and how well, how data-parallel
units are formed. One instance describes meshplan's own executor (`EXECUTOR`); the published
systems the analytic constants are calibrated on are other instances (`MEGATRON_2021`), so
"calibrated on Megatron, executed on torch" is explicit in the code rather than implied.
Does not own: the formulas that price these rules (planner/cost/), or the executor (executor/),
whose docstrings point here.

The description has three parts: the data-parallel synchronisation rules (`RuntimeSemantics`),
the memory rules (`MemoryRules`: what a block saves for backward, which buffers stay
resident), which planner/cost/memory.py prices; the Mixture-of-Experts block (`MoeRules`:
routing, dispatch, what it keeps), which planner/cost/moe.py prices; and the context-parallel
rules (`ContextParallelRules`: which CP attention runs, what it keeps and overlaps), which
planner/cost/cp.py prices.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from planner.errors import SpecError


class GradSync(str, Enum):
    """When a data-parallel rank reduces its gradients within a step."""

    # Per unit (FSDP unit / DDP bucket) as soon as its gradients are ready in the backward of
    # the micro-batch that synchronises, overlapping the rest of that backward.
    OVERLAPPED_UNITS = "overlapped_units"
    # All units at once after the chunk's last backward: torch.distributed.pipelining's
    # REDUCE_GRAD action (torch/distributed/pipelining/schedules.py `_add_reduce_grad`, stage.py
    # `perform_reduce_grad`), and Megatron-LM 2021's all-reduce of its contiguous gradient buffer
    # after the pipeline flush (Narayanan et al. 2021, Sec. 4.1: no overlap of DP communication).
    AFTER_BACKWARD = "after_backward"


class GradAccumulation(str, Enum):
    """How a runtime sums the micro-batches' gradients within a step and stages them for the
    data-parallel reduction; planner/cost/grad_accum.py prices the HBM bytes each streams.

    FSDP2: torch FSDP2 (`fully_shard` / `replicate`) with gradient sync off until the step's
    last micro-batch: the first compute-dtype gradient is cast into a reduce-dtype accumulator
    (_fsdp_param.py `to_accumulated_grad_if_needed`), each later one added into it
    (`accumulate_unsharded_grad_if_needed`); every reduction copies the unit's gradients into
    one reduce-scatter buffer in the reduce dtype (_fsdp_collectives.py
    `foreach_reduce_scatter_copy_in`), and every all-gather copies the gathered buffer out
    into the parameters (`foreach_all_gather_copy_out`), all on the compute stream. Without
    a data-parallel wrapper (dp = 1) autograd accumulates into the fp32 master weights' grads.
    MAIN_GRAD_BUFFER: Megatron-LM 2021's LocalDDP: after every micro-batch's backward a hook
    adds each parameter's gradient into its view of one contiguous buffer
    (megatron/model/distributed.py `param.main_grad.add_(param.grad.data)`), which is
    all-reduced in place. FSDP1_FLAT: PyTorch FSDP1's FlatParameter: gradients and gathered
    parameters are views of one flat buffer (no copies); a gradient is cast to the reduce
    dtype before each reduce-scatter when the two differ."""

    FSDP2 = "fsdp2"
    MAIN_GRAD_BUFFER = "main_grad_buffer"
    FSDP1_FLAT = "fsdp1_flat"


@dataclass(frozen=True, kw_only=True)
class MemoryRules:
    """What a runtime keeps in memory beyond the tensors every implementation must keep.

    Each field was read off the runtime and, for the executor, is tested against the saved
    tensors of its own block (tests/test_memory_parity.py) and memcheck."""

    # Bytes per element a norm keeps of its input, i.e. the precision it runs in. CUDA autocast
    # runs layer_norm / rms_norm in fp32 (AutocastCUDA), so the fused kernel saves an fp32 copy
    # of a bf16 input: 4. None: the compute dtype (Megatron's fused LayerNorm, Korthikanti et
    # al. 2022 Table 2). The time model reads it too: the casts around an fp32 norm
    # (planner/cost/analytic.py norm_bytes_per_element).
    norm_input_bytes: int | None
    # The norm's fp32 statistics (rstd; LayerNorm also the mean) are kept. Table 2 omits them.
    norm_stats: bool
    # With sequence parallelism the all-gathered full-sequence input of q/k/v and of the MLP's
    # first matrices is what the linears save (DTensor's ColwiseParallel after
    # PrepareModuleInput). Megatron saves the shard and re-gathers in backward (Sec. 4.2.2).
    sp_saves_gathered_inputs: bool
    # Dropout after attention and MLP for GELU (GPT) models: 1-byte masks (Table 2). The
    # executor has no dropout.
    dropout: bool
    # The RoPE cos/sin tables [seq, head_dim/2] are made per block and micro-batch in the
    # compute dtype and saved by the rotation's multiplies (executor/model.py rope_cos_sin).
    rope_tables_saved: bool
    # Autocast with fp32 master weights and no FSDP mixed precision (the executor at dp = 1):
    # the residual stream is fp32 (the embedding runs in the weight's dtype) and autocast keeps
    # a compute-dtype copy of every linear weight until backward.
    fp32_residual_without_dp: bool
    # Bytes per logit element alive at the loss's peak (its backward), measured on the
    # executor's `loss_fn`: bf16 logits -> fp32 copy -> log-softmax (kept) -> fp32 gradients:
    # 12 at tp = 1; DTensor's loss_parallel keeps more: 16 (tests/test_memory_parity.py).
    loss_bytes_per_logit: float
    loss_parallel_bytes_per_logit: float
    # Of those, what stays from the loss's forward to its backward (the fp32 log-softmax
    # output): a schedule that runs several forwards before the first backward (GPipe) keeps
    # this per micro-batch on the last stage.
    loss_saved_bytes_per_logit: float
    # torch.distributed.pipelining keeps the last stage's output (the logits) in its forward
    # cache until that micro-batch's backward.
    pipeline_keeps_stage_output: bool
    # torch.distributed.pipelining allocates a receive buffer per micro-batch and chunk for
    # activations (non-first chunks) and for gradients (non-last chunks), kept across steps
    # (stage.py `_make_tensor_from_meta` per `args_recv_info` / `grad_recv_info`). False: one
    # send and one receive buffer (Megatron's p2p communication).
    recv_buffer_per_micro_batch: bool
    # Under torch pipelining an FSDP-wrapped stage turns gradient sync off until the last
    # micro-batch and keeps parameters unsharded after backward (stage.py
    # `set_requires_gradient_sync(False)`, `set_reshard_after_backward(False)`): gradients
    # accumulate unsharded in the reduce dtype for every ZeRO stage, and ZeRO-3 keeps its
    # parameters gathered, so ZeRO-2/3 save no memory with pp > 1.
    pipelined_fsdp_unsharded: bool
    # DTensor's vocab-parallel embedding (RowwiseParallel over the vocab rows, torch 2.13)
    # returns a gradient whose local tensor has every vocabulary row, not the rank's shard:
    # each TP rank holds a full V x h gradient (tests/test_memory_parity.py measures it).
    embedding_grad_full_vocab: bool

    def residual_bytes(self, compute_bytes: int, dp: int) -> int:
        """Bytes per element of the residual stream between blocks (and across stages)."""
        return 4 if self.fp32_residual_without_dp and dp == 1 else compute_bytes


EXECUTOR_MEMORY = MemoryRules(
    norm_input_bytes=4,
    norm_stats=True,
    sp_saves_gathered_inputs=True,
    dropout=False,
    rope_tables_saved=True,
    fp32_residual_without_dp=True,
    loss_bytes_per_logit=12.0,
    loss_parallel_bytes_per_logit=16.0,
    loss_saved_bytes_per_logit=4.0,
    pipeline_keeps_stage_output=True,
    recv_buffer_per_micro_batch=True,
    pipelined_fsdp_unsharded=True,
    embedding_grad_full_vocab=True,
)

# Megatron-LM as Korthikanti et al. 2022 count it (Table 2, Sec. 4.3): the analytic reference.
MEGATRON_MEMORY = MemoryRules(
    norm_input_bytes=None,
    norm_stats=False,
    sp_saves_gathered_inputs=False,
    dropout=True,
    rope_tables_saved=False,
    fp32_residual_without_dp=False,
    loss_bytes_per_logit=8.0,
    loss_parallel_bytes_per_logit=8.0,
    loss_saved_bytes_per_logit=4.0,
    pipeline_keeps_stage_output=False,
    recv_buffer_per_micro_batch=False,
    pipelined_fsdp_unsharded=False,
    embedding_grad_full_vocab=False,
)


# Tokens the busiest expert receives, as a multiple of the mean (T * top_k / experts), when
# routing is dropless and trained with the load-balancing loss. An estimate: 1.25 is
# the capacity factor Switch Transformer trains with (Fedus et al. 2022, Sec. 2.2 and Table 1,
# where tokens above it would be dropped) and GShard's training default for top-2 as a bound
# per expert group (Lepikhin et al. 2021, Sec. 2.2); a profile of measured top-k load spreads
# is to replace it. Unit: dimensionless (>= 1).
ROUTING_IMBALANCE = 1.25


@dataclass(frozen=True, kw_only=True)
class MoeRules:
    """What one Mixture-of-Experts block of a runtime does, as the cost model prices it.

    The executor's MoE block (executor/, written to match these fields) is: a bias-free
    h x experts router linear on the block's normed input, softmax over experts in fp32,
    token-choice top-k (Shazeer et al. 2017; Mixtral, Jiang et al. 2024: the k weights
    renormalised to sum to 1), the Switch load-balancing auxiliary loss experts * sum_i f_i *
    P_i (Fedus et al. 2022, Eq. 4; f_i the routed fraction, no gradient; P_i the mean router
    probability), tokens sorted by expert, dispatched with `all_to_all_single` with per-rank
    splits over the expert-parallel group (ep consecutive data-parallel ranks), each local
    expert a gated MLP of expert_ffn_hidden (split by tp like the dense MLP) run as its own
    GEMMs on the tokens it received, the outputs sent back by a second `all_to_all_single`
    and combined weighted by the router probabilities (index_add into the token order); shared
    experts run on every token beside the routed ones. No token is dropped (dropless), so the
    busiest rank's load is `routing_imbalance` times the mean. With tp > 1 the tokens are
    replicated over the TP group (no sequence sharding inside the MoE block), and every TP rank
    dispatches them to the same-tp-index ranks of its EP group.
    """

    # Busiest expert's tokens / mean (ROUTING_IMBALANCE); see `imbalance` for a rank's.
    routing_imbalance: float
    # Bytes per element of the router logits / probabilities kept for backward (fp32 softmax).
    router_probs_bytes: int
    # Per routed copy (token x k) on the rank that routes it: the int64 sort index and the
    # fp32 combine weight kept.
    routed_index_bytes: int
    routed_weight_bytes: int
    # h-wide compute-dtype tensors kept per routed copy on the expert's rank (the expert input,
    # saved by w1/w3; its count is the busiest rank's, times the imbalance) and on the routing
    # rank (the expert output received back, saved by the probability-weighted combine for the
    # router's gradient; exactly T * k).
    saved_hidden_at_expert: int
    saved_hidden_at_source: int
    # h-wide compute-dtype buffers per routed copy alive only while the block runs: the sorted
    # (permuted) send buffer of the dispatch and the expert output before the combine's
    # all-to-all. Counted once per rank, not per block (freed before the next block).
    transient_hidden_per_routed_copy: int
    # Each local expert is its own GEMMs (a loop over experts), not one grouped GEMM: each pays
    # the per-GEMM ramp of planner/cost/analytic.py at its own (smaller) shape.
    gemm_per_local_expert: bool
    # Before the rows, the dispatch exchanges the per-expert counts (an all_to_all_single of
    # E int64 per rank) so receivers know their splits; backward reuses them. Unit: bytes per
    # expert.
    count_bytes_per_expert: int
    # With tp > 1 every TP rank routes the same tokens and holds ffn/tp of each expert, so the
    # routing weights' gradient [T, k] (and the shared gate's [T, 1]) is a partial sum: it is
    # all-reduced over TP in backward, in the compute dtype.
    tp_reduces_routing_grad: bool

    def imbalance(self, ep: int, experts: int) -> float:
        """Busiest EP rank's routed copies / mean (T * top_k) when it holds g = experts / ep
        experts: 1 + (routing_imbalance - 1) * sqrt((E - g) / (g * (E - 1))). The per-expert
        excess shrinks as a rank's g expert loads add up, by the finite-population correction
        of a sum of g of E loads with a fixed total (Cochran 1977, Sampling Techniques, Eq.
        2.8): the full excess at g = 1, none at ep = 1 (every expert local, load exactly the
        mean). An estimate of the same standing as ROUTING_IMBALANCE."""
        if ep <= 1 or experts <= 1:
            return 1.0
        g = experts / ep
        return 1.0 + (self.routing_imbalance - 1.0) * ((experts - g) / (g * (experts - 1))) ** 0.5


EXECUTOR_MOE = MoeRules(
    routing_imbalance=ROUTING_IMBALANCE,
    router_probs_bytes=4,
    routed_index_bytes=8,
    routed_weight_bytes=4,
    saved_hidden_at_expert=1,
    saved_hidden_at_source=1,
    transient_hidden_per_routed_copy=2,
    gemm_per_local_expert=True,
    count_bytes_per_expert=8,
    tp_reduces_routing_grad=True,
)


class CpAttention(str, Enum):
    """How attention runs over a sequence split into cp load-balanced shards (planner/cost/cp.py).

    ALL_GATHER_KV: every rank all-gathers K and V of the whole sequence, attends its own
    queries, and reduce-scatters dK, dV in backward (Llama 3, Dubey et al. 2024 Sec. 3.3.2).
    RING: K/V blocks travel around the CP ring, each step overlapped with the attention of the
    block received before (Liu et al. 2023, Ring Attention; Brandon et al. 2023 for the
    load-balanced causal layout). ULYSSES: all-to-alls swap the sequence shard for a head shard
    before and after attention (Jacobs et al. 2023, DeepSpeed-Ulysses)."""

    ALL_GATHER_KV = "all_gather_kv"
    RING = "ring"
    ULYSSES = "ulysses"


@dataclass(frozen=True, kw_only=True)
class ContextParallelRules:
    """What a runtime's context parallelism runs and keeps (executor/cp.py for the executor)."""

    # The CP attentions the runtime can run (a plan chooses among these:
    # ParallelConfig.cp_attention, whose default is all-gather K/V).
    supported: tuple[CpAttention, ...]
    # The K/V all-gather (and the dK/dV reduce-scatter) is issued inside the attention core on
    # the compute stream and waited for: no overlap with compute.
    comm_overlapped: bool
    # SDPA saves its K and V inputs for backward, which under all-gather are the gathered
    # full-sequence K, V of the layer (without recompute: per layer and micro-batch).
    saves_gathered_kv: bool
    # The gather runs inside the attention core, which selective recompute checkpoints, so
    # selective (and full) recompute gather again in backward and keep only the local K, V.
    gather_in_core: bool
    # Backward holds gradients of the gathered K, V (whole sequence, compute dtype) until the
    # reduce-scatter, one layer at a time: this many copies of that layer's K, V bytes at the
    # peak. An estimate from the autograd graph of executor/cp.py, not a measurement: the two
    # SDPA calls' dK, dV reach the gathered tensor through slice/select backward (each a full
    # zero-filled buffer, accumulated in place into a second), the reorder's backward writes a
    # third, and the collective's input is made contiguous: about 2.5 copies alive at once.
    # (On CPU the lower-right mask is materialised and SDPA's math backward adds quadratic
    # temporaries, so a CPU run cannot isolate the CUDA figure.)
    kv_grad_copies: float


EXECUTOR_CP = ContextParallelRules(
    supported=(CpAttention.ALL_GATHER_KV, CpAttention.ULYSSES),
    comm_overlapped=False,
    saves_gathered_kv=True,
    gather_in_core=True,
    kv_grad_copies=2.5,
)


@dataclass(frozen=True, kw_only=True)
class RuntimeSemantics:
    """The data-parallel rules of one runtime (see the module docstring)."""

    name: str
    # How gradients are reduced without pipelining (pp = 1) and with it (pp > 1).
    grad_sync_pp1: GradSync
    grad_sync_pipelined: GradSync
    # Fraction of a collective's time that really hides when it runs beside compute on a GPU;
    # the rest shows up as slower compute (NCCL kernels take SMs and memory bandwidth).
    overlap_efficiency: float
    # The chunk's root unit (embedding, final norm, head) is reduced only after the whole
    # backward (FSDP2's root post-backward), so its collective never overlaps that backward.
    root_unit_last: bool
    # ZeRO-2/3 reduce-scatter after every micro-batch's backward (gradients stay sharded);
    # ZeRO-0/1 reduce only in the last micro-batch.
    sharded_grads_reduce_every_micro_batch: bool
    # Under pipelining, each model chunk reduces after its own last backward (torch's
    # REDUCE_GRAD per stage), so earlier chunks overlap the rest of the backward; otherwise one
    # reduction of everything after the flush.
    reduce_per_chunk: bool
    # ZeRO-1 runs as ZeRO-2 (FSDP2 has no mode with sharded optimizer state and replicated
    # gradients; executor/dp.py).
    zero1_runs_as_zero2: bool
    # How micro-batch gradients are summed and staged for the reduction (GradAccumulation).
    grad_accumulation: GradAccumulation
    memory: MemoryRules
    moe: MoeRules = EXECUTOR_MOE
    # Context parallelism (cp > 1); a runtime without it is priced as the executor runs it.
    cp: ContextParallelRules = EXECUTOR_CP

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap_efficiency <= 1.0:
            raise SpecError(
                f"runtime '{self.name}': overlap_efficiency={self.overlap_efficiency} "
                "must be in [0, 1]"
            )

    def grad_sync(self, pp: int) -> GradSync:
        return self.grad_sync_pipelined if pp > 1 else self.grad_sync_pp1


# An estimate, used where no profile measured it: NCCL ring kernels occupy one SM per channel,
# up to 16-32 channels on Hopper (NCCL_MAX_NCHANNELS, NCCL environment docs) of 132 SMs, so
# compute beside a collective runs ~10-25 % slower. 0.85 takes the middle; a GPU profile's
# overlap record (profiler/overlap.py: a block timed beside an all-reduce) replaces it
# (planner/cost/estimate.py). Unit: fraction of collective time.
GPU_OVERLAP_EFFICIENCY = 0.85

EXECUTOR = RuntimeSemantics(
    name="meshplan executor (torch FSDP2 + torch.distributed.pipelining)",
    grad_sync_pp1=GradSync.OVERLAPPED_UNITS,
    grad_sync_pipelined=GradSync.AFTER_BACKWARD,
    overlap_efficiency=GPU_OVERLAP_EFFICIENCY,
    root_unit_last=True,
    sharded_grads_reduce_every_micro_batch=True,
    reduce_per_chunk=True,
    zero1_runs_as_zero2=True,
    grad_accumulation=GradAccumulation.FSDP2,
    memory=EXECUTOR_MEMORY,
)

# Composer + PyTorch FSDP1 running MPT as llm-foundry's benchmarks did (its
# scripts/train/benchmarking/README.md): MPT's low-precision LayerNorm runs in the autocast
# dtype (saves a bf16 input), no dropout (MPT's benchmark configs use p = 0), ALiBi (no RoPE
# tables), flash_attn's fused cross-entropy (ComposerMPTCausalLM's default `loss_fn:
# fused_crossentropy`, llmfoundry/models/mpt/modeling_mpt.py): the bf16 logits and their bf16
# gradient, one fp32 log-sum-exp per token; no pipelining.
FSDP1_MPT_MEMORY = MemoryRules(
    norm_input_bytes=None,
    norm_stats=True,
    sp_saves_gathered_inputs=False,
    dropout=False,
    rope_tables_saved=False,
    fp32_residual_without_dp=False,
    loss_bytes_per_logit=4.0,
    loss_parallel_bytes_per_logit=4.0,
    loss_saved_bytes_per_logit=2.0,
    pipeline_keeps_stage_output=False,
    recv_buffer_per_micro_batch=False,
    pipelined_fsdp_unsharded=False,
    embedding_grad_full_vocab=False,
)

# FSDP1 FULL_SHARD: one unit per block plus the root (embedding, final norm, head) whose
# gradients reduce after the whole backward; reduce-scatter per unit as its gradients are
# ready, in every micro-batch (Composer does not skip the sync when accumulating); prefetch of
# the next unit's all-gather (BACKWARD_PRE, Zhao et al. 2023 "PyTorch FSDP" Sec. 3.3).
LLM_FOUNDRY_FSDP1 = RuntimeSemantics(
    name="llm-foundry (Composer + PyTorch FSDP1)",
    grad_sync_pp1=GradSync.OVERLAPPED_UNITS,
    grad_sync_pipelined=GradSync.OVERLAPPED_UNITS,
    overlap_efficiency=GPU_OVERLAP_EFFICIENCY,
    root_unit_last=True,
    sharded_grads_reduce_every_micro_batch=True,
    reduce_per_chunk=False,
    zero1_runs_as_zero2=False,
    grad_accumulation=GradAccumulation.FSDP1_FLAT,
    memory=FSDP1_MPT_MEMORY,
)

MEGATRON_2021 = RuntimeSemantics(
    name="Megatron-LM 2021 (PTD-P, Narayanan et al. 2021)",
    grad_sync_pp1=GradSync.AFTER_BACKWARD,
    grad_sync_pipelined=GradSync.AFTER_BACKWARD,
    overlap_efficiency=GPU_OVERLAP_EFFICIENCY,
    root_unit_last=False,
    sharded_grads_reduce_every_micro_batch=False,
    reduce_per_chunk=False,
    zero1_runs_as_zero2=False,
    grad_accumulation=GradAccumulation.MAIN_GRAD_BUFFER,
    memory=MEGATRON_MEMORY,
)

# Runtimes by the name `meshplan estimate --runtime` takes: the executor's (the default, what
# plans launch) and the published systems the analytic constants are calibrated on, so a
# calibration row can be priced through the CLI exactly as the calibration prices it.
RUNTIMES = {
    "executor": EXECUTOR,
    "megatron-2021": MEGATRON_2021,
    "llm-foundry-fsdp1": LLM_FOUNDRY_FSDP1,
}


def runtime_named(name: str) -> RuntimeSemantics:
    if name not in RUNTIMES:
        raise SpecError(f"--runtime {name!r} is not allowed; use one of {'|'.join(RUNTIMES)}")
    return RUNTIMES[name]
