"""The cost model's entry points: `estimate` (step time, memory, throughput) and `split_problem`.

Owns: the assembly of a step from per-rank costs (rankcosts.py) and the pipeline event simulation
(schedule.py), the DP gradient-synchronisation overlap model, the optimizer step time and the
throughput figures; the SplitProblem builder for the layer-split ILP.
Does not own: the result types (results.py), the formulas (analytic.py, memory.py, comm.py)
or the ILP (planner/ilp.py).

Step time = pipeline makespan (event simulation over per-chunk forward/backward times incl. TP
collectives, p2p between chunks) + the exposed DP synchronisation + the optimizer step, taken on
the rank that finishes last. Overlap model: gradient all-reduce / reduce-scatter is bucketed and
overlaps the backward of the rank's last micro-batch (PyTorch DDP, Li et al. 2020 VLDB Sec. 3.2;
FSDP) for ZeRO-0/1; ZeRO-2/3 reduce-scatter after every micro-batch so gradients stay sharded;
the parameter all-gather of ZeRO-1/2 follows the optimizer step and is exposed; ZeRO-3
gathers weights in forward and backward of every micro-batch, prefetched under that
micro-batch's compute (only the excess over that compute is exposed). On CPU workers
(DeviceKind.CPU) nothing overlaps: gloo runs collectives on the cores that compute.
Memory: exactly `SplitProblem.rank_memory_bytes` of the split, per pipeline rank.
A profile's calibration corrections, when it has them, are applied last (corrections.py), so
`plan`, `estimate` and `validate` predict alike; the result's notes and JSON say so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.cost import analytic, memory
from planner.cost.analytic import DEFAULT_CONSTANTS, AnalyticConstants
from planner.cost.corrections import correct_estimate, lower_bound_scale, micro_batch_slots
from planner.cost.dp_sync import RankSyncInputs, exposed_dp_s
from planner.cost.rankcosts import AG, AR, RS, RankCosts, build_rank_costs
from planner.cost.regime import regime_reasons
from planner.cost.results import Estimate, MemoryBreakdown, StageEstimate, TimeBreakdown
from planner.cost.schedule import SimResult, simulate
from planner.cost.split_problem import SplitProblem
from planner.parallel import ParallelConfig
from planner.profile import CollectiveOp, Profile
from planner.runtime import EXECUTOR, RuntimeSemantics
from planner.specs import ClusterSpec, DeviceKind, Dtype, ModelSpec, TrainingSpec


def _problem(rc: RankCosts, num_layers: int) -> SplitProblem:
    frag = 1.0 + memory.ALLOCATOR_FRAGMENTATION
    per_param = rc.state.total
    expert_static = (
        rc.params.expert_per_block * rc.expert_state.total if rc.expert_state is not None else 0.0
    )
    chunk_boundaries = rc.pp * rc.virtual_stages - 1
    p2p_chain = sum(rc.p2p_s[k % rc.pp] for k in range(chunk_boundaries))
    return SplitProblem(
        num_layers=num_layers,
        pp=rc.pp,
        virtual_stages=rc.virtual_stages,
        num_micro_batches=rc.num_micro_batches,
        block_time_s=tuple(b.total_s for b in rc.block),
        embedding_time_s=rc.embedding.total_s,
        head_time_s=rc.head.total_s,
        # forward and backward each cross every chunk boundary once on the critical path
        boundary_p2p_s=2.0 * p2p_chain,
        block_static_bytes=rc.params.per_block * per_param + expert_static,
        block_activation_bytes=rc.block_activation_bytes * frag,
        in_flight=rc.in_flight,
        embedding_static_bytes=rc.params.embedding * per_param + rc.embedding_extra_bytes,
        embedding_activation_bytes=rc.embedding_activation_bytes * frag,
        head_static_bytes=rc.params.head * per_param,
        head_activation_bytes=rc.head_activation_bytes * frag,
        fixed_bytes=rc.fixed_bytes,
        capacity_bytes=rc.capacity_bytes,
    )


def split_problem(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    config: ParallelConfig,
    profile: Profile | None = None,
    *,
    constants: AnalyticConstants = DEFAULT_CONSTANTS,
) -> SplitProblem:
    """The plain-number view of this cost model for the layer-split ILP (stage_layers ignored).

    With a profile's corrections its times are scaled by `corrections.lower_bound_scale`, so
    bounds read from it stay below the corrected estimates (a uniform scale leaves the
    optimal split unchanged)."""
    config = replace(config, stage_layers=None)
    problem = _problem(
        build_rank_costs(model, training, cluster, config, profile, constants), model.layers
    )
    if profile is not None and profile.corrections is not None:
        s = lower_bound_scale(profile.corrections.factors)
        problem = replace(
            problem,
            block_time_s=tuple(t * s for t in problem.block_time_s),
            embedding_time_s=problem.embedding_time_s * s,
            head_time_s=problem.head_time_s * s,
            boundary_p2p_s=problem.boundary_p2p_s * s,
        )
    return problem


def _rank_sync_inputs(
    rc: RankCosts, config: ParallelConfig, training: TrainingSpec, split: tuple[int, ...], r: int
) -> RankSyncInputs:
    """Per-unit compute and collective times of pipeline rank r for dp_sync.py: one FSDP unit
    per block and one root unit per chunk (embedding on the first rank, head on the last)."""
    pp, chunks = rc.pp, len(split)
    last_rank = (chunks - 1) % pp
    sync_op = AR if config.zero == 0 else RS
    grad_bytes, param_bytes = training.grad_dtype.nbytes, training.dtype.nbytes
    per_block = rc.params.per_block
    root = (rc.params.embedding if r == 0 else 0) + (rc.params.head if r == last_rank else 0)
    first, last = r == 0, r == last_rank
    blocks = sum(n for k, n in enumerate(split) if k % pp == r)

    unit = rc.dp_sync[r] if rc.dp_sync else None  # measured as the executor syncs a unit

    def coll(op: CollectiveOp, params: float) -> float:
        return rc.dp_collective_s(op, r, params * (grad_bytes if op is not AG else param_bytes))

    def expert_coll(op: CollectiveOp) -> float:
        # routed experts reduce (and gather) over their expert-DP group after the dense part,
        # on the same stream: the unit's collective time is the sum (planner/cost/moe.py)
        if rc.expert_dp is None:
            return 0.0
        nbytes = rc.params.expert_per_block * (grad_bytes if op is not AG else param_bytes)
        return rc.expert_dp.collective_s(op, r, nbytes, rc.profile)

    return RankSyncInputs(
        blocks=blocks,
        last_chunk_blocks=split[max(k for k in range(chunks) if k % pp == r)],
        chunks=rc.virtual_stages,
        micro_batches=rc.num_micro_batches,
        zero=config.zero,
        pp=pp,
        block_fwd_s=rc.block[r].fwd_s,
        block_bwd_s=rc.block[r].bwd_s,
        root_fwd_s=(rc.embedding.fwd_s if first else 0.0) + (rc.head.fwd_s if last else 0.0),
        root_bwd_s=(rc.embedding.bwd_s if first else 0.0) + (rc.head.bwd_s if last else 0.0),
        block_reduce_s=unit.block_s if unit else coll(sync_op, per_block) + expert_coll(sync_op),
        root_reduce_s=(unit.root_s(embedding=first, head=last) if unit else coll(sync_op, root))
        if root
        else 0.0,
        block_gather_s=coll(AG, per_block) + expert_coll(AG) if config.zero >= 1 else 0.0,
        root_gather_s=coll(AG, root) if config.zero >= 1 and root else 0.0,
        root_first_chunk=r != last_rank or pp == 1,
    )


def chunk_times(rc: RankCosts, split: tuple[int, ...], attr: str) -> tuple[float, ...]:
    last = len(split) - 1
    out = []
    for k, n in enumerate(split):
        t = n * getattr(rc.block[k % rc.pp], attr)
        t += getattr(rc.embedding, attr) if k == 0 else 0.0
        t += getattr(rc.head, attr) if k == last else 0.0
        out.append(t)
    return tuple(out)


def estimate(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    config: ParallelConfig,
    profile: Profile | None = None,
    *,
    constants: AnalyticConstants = DEFAULT_CONSTANTS,
    runtime: RuntimeSemantics = EXECUTOR,
) -> Estimate:
    """Predict one training step: time with breakdown, memory per pipeline rank, throughput.

    Raises ConfigError (from config.validate) naming the broken rule. `constants` replaces the
    analytic efficiency constants (the calibration script fits them; everyone else keeps the
    default); `runtime` is the runtime whose rules are priced (this executor unless a
    calibration prices the published system that produced its data).
    """
    rc = build_rank_costs(model, training, cluster, config, profile, constants, runtime)
    # the DP overlap model reads the overlap efficiency: measured when the profile has it
    dp_runtime, overlap_note = _with_measured_overlap(runtime, profile, cluster)
    problem = _problem(rc, model.layers)
    split = config.layers_per_chunk(model)
    pp, v, m = rc.pp, rc.virtual_stages, rc.num_micro_batches
    sim, no_p2p = _pipeline(rc, config, split)
    layers_on = [0] * pp
    for k, n in enumerate(split):
        layers_on[k % pp] += n
    tails = _rank_tails(rc, config, training, cluster, dp_runtime, split, layers_on)
    ends = [sim.rank_finish_s[r] + tails[r].exposed_dp_s + tails[r].optimizer_s for r in range(pp)]
    step = max(ends)
    crit = ends.index(step)
    breakdown, busy = _breakdown(
        rc, split, m, step=step, makespan_s=sim.makespan_s, no_p2p_s=no_p2p,
        optimizer_s=min(tails[crit].optimizer_s, step - sim.makespan_s),
    )  # fmt: skip
    # memory per rank, from the SplitProblem so the ILP and the estimate agree exactly
    rank_mem = problem.rank_memory_bytes(split)
    stages = _stages(rc, split, layers_on, busy, rank_mem, [t.params for t in tails])
    worst = max(range(pp), key=lambda r: rank_mem[r] / rc.capacity_bytes[r])
    tokens = training.global_batch * training.seq_len
    n_gpus = cluster.num_gpus
    model_flops = analytic.model_flops_per_step(model, training.global_batch, training.seq_len)
    hw_flops = analytic.hardware_flops_per_step(
        model,
        training.global_batch,
        training.seq_len,
        config.recompute.value,
        training.flash_attention,
    )
    peak_sum = sum(n.gpu.peak_flops(training.dtype) * n.gpus for n in cluster.nodes)
    notes, reasons = _notes(rc, training, cluster, config, runtime)
    notes += overlap_note
    est = Estimate(
        step_time_s=step,
        tokens_per_s=tokens / step,
        model_tflops_per_gpu=model_flops / n_gpus / step / 1e12,
        hardware_tflops_per_gpu=hw_flops / n_gpus / step / 1e12,
        mfu=model_flops / step / peak_sum,
        peak_memory_bytes=rank_mem[worst],
        memory_capacity_bytes=rc.capacity_bytes[worst],
        fits=problem.fits(split),
        source=rc.source,
        breakdown=breakdown,
        memory_breakdown=stages[worst].memory,
        stages=tuple(stages),
        notes=notes,
        calibrated_regime=None if rc.source != "analytic" else not reasons,
        regime_reasons=reasons,
    )
    if profile is not None and profile.corrections is not None:
        slots = micro_batch_slots(m, pp, v)
        est = correct_estimate(est, profile.corrections, slots=slots, dp=config.dp)
    return est


def _with_measured_overlap(
    runtime: RuntimeSemantics, profile: Profile | None, cluster: ClusterSpec
) -> tuple[RuntimeSemantics, tuple[str, ...]]:
    """The runtime with the profile's measured overlap efficiency (the lowest over its device
    types: profiler/overlap.py) in place of its estimate, on GPUs; CPU workers overlap
    nothing (dp_sync.py), so there the record changes nothing and is not mentioned."""
    records = profile.overlap if profile is not None else None
    if not records or any(n.gpu.kind is DeviceKind.CPU for n in cluster.nodes):
        return runtime, ()
    eff = min(r.efficiency for r in records)
    note = (
        f"overlap efficiency {eff:.2f} measured by the profiler (a block beside an all-reduce), "
        f"not the runtime's estimate {runtime.overlap_efficiency:.2f}"
    )
    return replace(runtime, overlap_efficiency=eff), (note,)


def _pipeline(
    rc: RankCosts, config: ParallelConfig, split: tuple[int, ...]
) -> tuple[SimResult, float]:
    """The schedule's event simulation over per-chunk times, and its makespan without p2p (the
    difference is the exposed pipeline communication)."""
    pp, v, m = rc.pp, rc.virtual_stages, rc.num_micro_batches
    fwd = chunk_times(rc, split, "fwd_s")
    bwd = chunk_times(rc, split, "bwd_s")
    p2p = tuple(rc.p2p_s[k % pp] for k in range(pp * v - 1))
    sched = config.schedule.value
    sim = simulate(
        sched, pp=pp, virtual_stages=v, num_micro_batches=m, fwd_s=fwd, bwd_s=bwd, p2p_s=p2p
    )
    if not any(p2p):
        return sim, sim.makespan_s
    no_p2p = simulate(
        sched,
        pp=pp,
        virtual_stages=v,
        num_micro_batches=m,
        fwd_s=fwd,
        bwd_s=bwd,
        p2p_s=(0.0,) * len(p2p),
    )
    return sim, no_p2p.makespan_s


@dataclass(frozen=True, kw_only=True)
class _RankTail:
    """What a pipeline rank adds after its last backward, and the parameters it holds."""

    exposed_dp_s: float
    optimizer_s: float
    params: int


def _rank_tails(
    rc: RankCosts,
    config: ParallelConfig,
    training: TrainingSpec,
    cluster: ClusterSpec,
    runtime: RuntimeSemantics,
    split: tuple[int, ...],
    layers_on: list[int],
) -> list[_RankTail]:
    """Per rank: the exposed DP synchronisation (dp_sync.py) and the optimizer step (measured
    when profiled, else Adam's bytes at the rank's slowest HBM)."""
    pp, last_rank = rc.pp, (len(split) - 1) % rc.pp
    dtype, grad_bytes = training.dtype, training.grad_dtype.nbytes
    opt_state = (
        memory.ADAM_FP32_BYTES_PER_PARAM
        if dtype is Dtype.FP32
        else memory.ADAM_MIXED_BYTES_PER_PARAM
    )
    # Adam reads state + grads and writes state + weights (fp32 weights are also read)
    touched_per_param = (
        2 * opt_state + grad_bytes + dtype.nbytes * (2 if dtype is Dtype.FP32 else 1)
    )
    # CPU workers run gloo collectives on the cores that compute, so nothing hides behind
    # compute there; GPUs overlap them on separate streams (dp_sync.py).
    overlaps = not any(n.gpu.kind is DeviceKind.CPU for n in cluster.nodes)
    shard = config.dp_cp if config.zero >= 1 else 1
    # routed experts: their own shard (ZeRO over the expert-DP group), same bytes per param
    expert_shard = config.dp_cp // config.ep if config.zero >= 1 else 1
    out = []
    for r in range(pp):
        n_params = layers_on[r] * rc.params.per_block
        n_params += rc.params.embedding if r == 0 else 0
        n_params += rc.params.head if r == last_rank else 0
        sync_in = _rank_sync_inputs(rc, config, training, split, r)
        exposed = exposed_dp_s(sync_in, runtime, overlaps=overlaps) if config.dp_cp > 1 else 0.0
        sharded = n_params / shard + layers_on[r] * rc.params.expert_per_block / expert_shard
        opt = sharded * touched_per_param / rc.hbm_bytes_per_s[r]
        measured_opt = rc.optimizer[r] if rc.optimizer else None
        if measured_opt is not None:  # profiled step (profiler/optimizer.py)
            opt = measured_opt.rank_step_s(
                blocks=layers_on[r],
                embedding=r == 0,
                head=r == last_rank,
                bandwidth_s=opt * shard,
                shard=shard,
            )
        out.append(_RankTail(exposed_dp_s=exposed, optimizer_s=opt, params=n_params))
    return out


def _breakdown(
    rc: RankCosts,
    split: tuple[int, ...],
    m: int,
    *,
    step: float,
    makespan_s: float,
    no_p2p_s: float,
    optimizer_s: float,
) -> tuple[TimeBreakdown, list[float]]:
    """The step's parts on the bottleneck rank (the one with the most work per micro-batch),
    and every rank's busy time per micro-batch."""
    pp, chunks = rc.pp, len(split)
    busy = [0.0] * pp
    comp = [0.0] * pp
    tpc = [0.0] * pp
    epc = [0.0] * pp
    cpc = [0.0] * pp
    for k, n in enumerate(split):
        r = k % pp
        parts = [(n, rc.block[r])]
        if k == 0:
            parts.append((1, rc.embedding))
        if k == chunks - 1:
            parts.append((1, rc.head))
        for cnt, p in parts:
            comp[r] += cnt * (p.fwd_compute_s + p.bwd_compute_s)
            tpc[r] += cnt * (p.fwd_tp_s + p.bwd_tp_s)
            epc[r] += cnt * (p.fwd_ep_s + p.bwd_ep_s)
            cpc[r] += cnt * (p.fwd_cp_s + p.bwd_cp_s)
            busy[r] += cnt * p.total_s
    b = busy.index(max(busy))

    def clean(x: float) -> float:
        # differences of sums: float noise around 0 would print as -0.0
        return 0.0 if abs(x) < 1e-9 * step else x

    return TimeBreakdown(
        compute_s=m * comp[b],
        tp_comm_s=m * tpc[b],
        ep_comm_s=m * epc[b],
        pp_comm_s=clean(makespan_s - no_p2p_s),
        dp_comm_s=clean(step - makespan_s - optimizer_s),
        bubble_s=clean(no_p2p_s - m * busy[b]),
        optimizer_s=optimizer_s,
        cp_comm_s=m * cpc[b],
    ), busy


def _stages(
    rc: RankCosts,
    split: tuple[int, ...],
    layers_on: list[int],
    busy: list[float],
    rank_mem: tuple[float, ...],
    rank_params: list[int],
) -> list[StageEstimate]:
    """Per pipeline rank: its layers, time per micro-batch and memory by kind."""
    st, last_rank = rc.state, (len(split) - 1) % rc.pp
    stages = []
    for r in range(rc.pp):
        n_params = rank_params[r]
        act = sum(
            n * rc.in_flight[r] * rc.block_activation_bytes
            for k, n in enumerate(split)
            if k % rc.pp == r
        )
        act += rc.in_flight[0] * rc.embedding_activation_bytes if r == 0 else 0.0
        act += rc.head_activation_bytes if r == last_rank else 0.0
        w, g, o = n_params * st.weights, n_params * st.grads, n_params * st.optimizer
        if rc.expert_state is not None:  # routed experts, sharded over the expert-DP group
            xs, n_exp = rc.expert_state, layers_on[r] * rc.params.expert_per_block
            w, g, o = w + n_exp * xs.weights, g + n_exp * xs.grads, o + n_exp * xs.optimizer
        g += rc.embedding_extra_bytes if r == 0 else 0.0
        mb = MemoryBreakdown(
            weights=w, grads=g, optimizer=o, activations=act, other=rank_mem[r] - w - g - o - act
        )
        stages.append(
            StageEstimate(
                pp_rank=r,
                layers=layers_on[r],
                time_s=busy[r],
                memory_bytes=rank_mem[r],
                capacity_bytes=rc.capacity_bytes[r],
                memory=mb,
            )
        )
    return stages


def _notes(
    rc: RankCosts,
    training: TrainingSpec,
    cluster: ClusterSpec,
    config: ParallelConfig,
    runtime: RuntimeSemantics,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The estimate's notes and, on the analytic path, why it is outside the calibrated regime."""
    notes = rc.notes
    reasons: tuple[str, ...] = ()
    if rc.source == "analytic":
        reasons = regime_reasons(training, cluster, config)
        notes += tuple(f"outside the calibrated regime: {r}" for r in reasons)
    if training.fp8_linears:
        notes += ("fp8: MFU against the bf16 peak",)
    if runtime is not EXECUTOR:
        notes += (f"priced as {runtime.name}, not meshplan's executor",)
    return notes, reasons
