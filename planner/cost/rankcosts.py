"""Per-pipeline-rank cost coefficients of one configuration (split-independent).

Owns: turning specs + config (+ profile) into the per-block, per-rank numbers that both the
event-simulated estimate and the ILP's SplitProblem use: block/embedding/head forward and
backward times (compute and TP collectives apart), p2p times per pipeline boundary, DP
collective links, memory coefficients, capacities, and the notes saying where each number
came from. Computing them once keeps `estimate` and `split_problem` consistent by construction.
Does not own: each GPU type's passes, measured or analytic (rank_compute.py), the schedule
(schedule.py) or the final assembly (estimate.py).

Heterogeneous clusters: a pipeline rank's time is its slowest GPU type's time and its capacity
the smallest GPU memory among its GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from planner.cost import compute, memory, moe
from planner.cost import cp as cpcost
from planner.cost.analytic import AnalyticConstants
from planner.cost.comm import ClusterArrays, GroupLink, measured_collective_s, ring_time_s
from planner.cost.rank_compute import RankCompute, RankInputs, compute_parts
from planner.parallel import MeshAxis, ParallelConfig
from planner.profile import CollectiveOp, Profile
from planner.runtime import EXECUTOR, RuntimeSemantics
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

AR, AG, RS = CollectiveOp.ALL_REDUCE, CollectiveOp.ALL_GATHER, CollectiveOp.REDUCE_SCATTER


@dataclass(frozen=True, kw_only=True)
class PartTimes:
    """Per-micro-batch seconds of one part on one rank: compute and TP collectives apart."""

    fwd_compute_s: float
    bwd_compute_s: float
    fwd_tp_s: float
    bwd_tp_s: float
    # MoE dispatch + combine all-to-all over the EP group (planner/cost/moe.py); 0 when dense
    fwd_ep_s: float = 0.0
    bwd_ep_s: float = 0.0
    # context-parallel collectives of a block (planner/cost/cp.py), exposed seconds
    fwd_cp_s: float = 0.0
    bwd_cp_s: float = 0.0

    @property
    def fwd_s(self) -> float:
        return self.fwd_compute_s + self.fwd_tp_s + self.fwd_ep_s + self.fwd_cp_s

    @property
    def bwd_s(self) -> float:
        return self.bwd_compute_s + self.bwd_tp_s + self.bwd_ep_s + self.bwd_cp_s

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s


@dataclass(frozen=True, kw_only=True)
class RankCosts:
    pp: int
    virtual_stages: int
    num_micro_batches: int
    block: tuple[PartTimes, ...]  # per pipeline rank, one block
    embedding: PartTimes  # on rank 0
    head: PartTimes  # on the last chunk's rank
    p2p_s: tuple[float, ...]  # rank r -> rank (r+1) % pp, per micro-batch and direction
    dp_links: tuple[GroupLink, ...]
    dp_groups: tuple[np.ndarray, ...]  # per pipeline rank, rows = DP groups of GPU ids
    profile: Profile | None
    params: memory.RankParams
    state: memory.StateBytesPerParam
    block_activation_bytes: float  # raw, per micro-batch
    embedding_activation_bytes: float
    head_activation_bytes: float
    in_flight: tuple[float, ...]
    fixed_bytes: tuple[float, ...]
    capacity_bytes: tuple[float, ...]
    hbm_bytes_per_s: tuple[float, ...]  # slowest HBM per rank (optimizer step)
    embedding_extra_bytes: float = 0.0  # memory.embedding_gradient_excess_bytes
    source: str
    # measured optimizer step per rank (compute.OptimizerTimes), None: priced from bandwidth
    optimizer: tuple[compute.OptimizerTimes | None, ...] = ()
    # measured DP sync per FSDP unit per rank (compute.DpUnitSync), None: from the collective fit
    dp_sync: tuple[compute.DpUnitSync | None, ...] = ()
    # MoE: routed-expert state per parameter (ZeRO over the dp / ep expert-DP group) and the
    # expert-DP groups that reduce expert gradients; None for dense models
    expert_state: memory.StateBytesPerParam | None = None
    expert_dp: moe.GroupLinks | None = None
    notes: tuple[str, ...]

    def dp_collective_s(self, op: CollectiveOp, rank: int, nbytes: float) -> float:
        """A DP collective of rank `rank`'s groups: measured fit when profiled, else ring model."""
        measured = measured_collective_s(self.profile, op, self.dp_groups[rank], nbytes)
        return measured if measured is not None else ring_time_s(op, nbytes, self.dp_links[rank])


def _rank_gpu_types(arrays: ClusterArrays, cluster: ClusterSpec, pp: int) -> list[list[int]]:
    """Indices of the distinct node entries (by GPU name) present on each pipeline rank."""
    names = [n.gpu.name for n in cluster.nodes]
    first_of = {name: names.index(name) for name in names}
    canon = np.array([first_of[n] for n in names])
    return [sorted(set(np.unique(canon[arrays.node[r]]).tolist())) for r in range(pp)]


def _block_activation_bytes(x: RankInputs, residual: int, recompute: str) -> float:
    """One block's saved bytes per micro-batch (memory.py), with CP's gathered K, V (cp.py)."""
    c = x.config
    block = memory.block_activation_bytes(
        x.model,
        micro_batch=c.micro_batch,
        seq_len=x.seq,
        tp=c.tp,
        sequence_parallel=c.sequence_parallel,
        recompute=recompute,
        flash_attention=x.training.flash_attention,
        dtype=x.training.dtype,
        residual_bytes=residual,
        rules=x.rules,
        ep=c.ep,
    )
    return block + cpcost.saved_extra_bytes(
        x.model,
        micro_batch=c.micro_batch,
        seq_len=x.training.seq_len,
        tp=c.tp,
        cp=c.cp,
        recompute=recompute,
        dtype=x.training.dtype,
        rules=x.runtime.cp,
        kind=c.cp_attention,
    )


def build_rank_costs(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    config: ParallelConfig,
    profile: Profile | None,
    constants: AnalyticConstants,
    runtime: RuntimeSemantics = EXECUTOR,
) -> RankCosts:
    config.validate(model, training, cluster)
    moe.check_priceable(model)
    pp, v = config.pp, config.virtual_stages
    arrays = ClusterArrays(
        cluster, config, constants.intra_link_efficiency, constants.network_efficiency
    )
    types = _rank_gpu_types(arrays, cluster, pp)
    x = RankInputs(
        model=model,
        training=training,
        cluster=cluster,
        config=config,
        profile=profile,
        constants=constants,
        runtime=runtime,
        arrays=arrays,
        types=types,
        gpus={i: cluster.nodes[i].gpu for t in types for i in t},
        seq=training.seq_len // config.cp,
        micro_batches=config.num_micro_batches(training),
    )
    notes: list[str] = []
    params = memory.tp_rank_params(model, config.tp, config.num_chunks, config.ep)
    comp = compute_parts(x, params, notes)
    blocks, emb, head = _rank_parts(x, comp, notes)
    residual = x.rules.residual_bytes(training.dtype.nbytes, config.dp_cp)
    # stages exchange the residual stream (fp32 without FSDP mixed precision, runtime.py)
    p2p_bytes = float(config.micro_batch * x.seq * model.hidden * residual)
    p2p_bytes /= config.tp if config.sequence_parallel else 1
    p2p = tuple(
        arrays.boundary_p2p_s(r, (r + 1) % pp, p2p_bytes, profile) if pp > 1 else 0.0
        for r in range(pp)
    )
    if profile is None or not (profile.p2p or profile.collectives):
        notes.append("links from the cluster's link classes (no measured link profile)")

    block_act = _block_activation_bytes(x, residual, config.recompute.value)
    head_act = memory.head_activation_bytes(
        model,
        micro_batch=config.micro_batch,
        seq_len=x.seq,
        tp=config.tp,
        sequence_parallel=config.sequence_parallel,
        dtype=training.dtype,
        pipelined=pp > 1,
        # GPipe runs every forward before the first backward; the other schedules run the last
        # chunk's backward right after its forward
        in_flight=float(x.micro_batches) if config.schedule.value == "gpipe" else 1.0,
        rules=x.rules,
    )
    state, expert_state = _state_bytes(x)
    fixed = _fixed_bytes(
        x,
        params=params,
        weights_bytes=state.weights,
        recompute_working_bytes=_block_activation_bytes(x, residual, "none"),
        head_activation_bytes=head_act,
        p2p_bytes=p2p_bytes,
    )
    opt_times, dp_sync = _measured_step_parts(x, comp)
    last_rank = (pp * v - 1) % pp
    blocks, emb, head = _with_dp_wrapper_overhead(blocks, emb, head, dp_sync, last_rank)
    expert_dp = config.dp_cp // config.ep  # ZeRO shards over dp x cp (estimate.py alike)
    return RankCosts(
        pp=pp,
        virtual_stages=v,
        num_micro_batches=x.micro_batches,
        block=tuple(blocks),
        embedding=emb,
        head=head,
        p2p_s=p2p,
        dp_links=arrays.axis_links(MeshAxis.DP),
        dp_groups=tuple(arrays.gpu[r].T for r in range(pp)),
        profile=profile,
        params=params,
        state=state,
        block_activation_bytes=block_act,
        embedding_activation_bytes=memory.embedding_activation_bytes(
            model,
            micro_batch=config.micro_batch,
            seq_len=x.seq,
            tp=config.tp,
            sequence_parallel=config.sequence_parallel,
            rules=x.rules,
        ),
        head_activation_bytes=head_act,
        # kept to the peak where gradients accumulate across micro-batches; ZeRO-2/3 without
        # pipelining reduce-scatter (and free) it after every micro-batch's backward
        embedding_extra_bytes=memory.embedding_gradient_excess_bytes(
            model, config.tp, training.grad_dtype, x.rules
        )
        if pp > 1 or config.zero < 2
        else 0.0,
        in_flight=memory.in_flight(config.schedule.value, pp, v, x.micro_batches),
        fixed_bytes=fixed,
        capacity_bytes=tuple(
            float(min(cluster.nodes[i].gpu.capacity_bytes for i in types[r])) for r in range(pp)
        ),
        hbm_bytes_per_s=tuple(
            min(cluster.nodes[i].gpu.hbm_bytes_per_s for i in types[r]) for r in range(pp)
        ),
        optimizer=opt_times,
        dp_sync=dp_sync,
        expert_state=expert_state,
        expert_dp=moe.expert_dp_links(
            cluster, config, (constants.intra_link_efficiency, constants.network_efficiency)
        )
        if model.moe is not None and expert_dp > 1
        else None,
        source=comp.source,
        notes=tuple(dict.fromkeys(notes)),
    )


def _rank_parts(
    x: RankInputs, comp: RankCompute, notes: list[str]
) -> tuple[list[PartTimes], PartTimes, PartTimes]:
    """Each pipeline rank's block (its slowest GPU type's), the first rank's embedding and the
    last chunk's head, with their TP, EP and CP collectives per micro-batch."""
    model, config, profile, arrays = x.model, x.config, x.profile, x.arrays
    pp, tp, sp, rc = config.pp, config.tp, config.sequence_parallel, config.recompute.value
    mb, dtype = config.micro_batch, x.training.dtype
    buf = float(mb * x.seq * model.hidden * dtype.nbytes)
    tp_links = arrays.axis_links(MeshAxis.TP)
    tp_measured = profile is not None and bool(profile.collectives)

    def tp_coll(op: CollectiveOp, r: int, nbytes: float) -> float:
        if tp == 1:
            return 0.0
        if tp_measured:
            t = measured_collective_s(profile, op, arrays.gpu[r], nbytes)
            if t is not None:
                return t
        return ring_time_s(op, nbytes, tp_links[r])

    cp_block = cpcost.rank_block_comm_times(
        model, x.training, config, arrays, profile, x.constants, x.runtime, x.gpus, notes
    )
    blocks, emb, head = [], None, None
    last_rank = (pp * config.virtual_stages - 1) % pp
    effs = (x.constants.intra_link_efficiency, x.constants.network_efficiency)
    a2a = moe.ep_links(x.cluster, config, effs) if config.ep > 1 else None
    a2a_bytes = (
        moe.dispatch_bytes(model, mb * x.seq, config.ep, dtype.nbytes, x.runtime.moe)
        if a2a
        else 0.0
    )
    parts = comp.parts
    for r in range(pp):
        worst = max(
            x.types[r], key=lambda i: parts[i]["block"].forward_s + parts[i]["block"].backward_s
        )
        bt = parts[worst]["block"]
        # Megatron: 2 all-reduces per pass (f/g operators); SP: all-gather + reduce-scatter
        # in their place, same volume (Korthikanti et al. 2022 Sec. 4.2.2)
        once = 2 * tp_coll(AG, r, buf) + 2 * tp_coll(RS, r, buf) if sp else 2 * tp_coll(AR, r, buf)
        # MoE: dispatch + combine per pass; full recompute runs the forward's pair again
        a2a_pass = moe.all_to_all_pass_s(a2a_bytes, a2a, r, profile) if a2a else 0.0
        counts = moe.count_exchange_s(model, a2a, r, profile, x.runtime.moe) if a2a else 0.0
        routing_grad = (
            sum(
                tp_coll(AR, r, n)
                for n in moe.routing_grad_bytes(model, mb * x.seq, dtype.nbytes, x.runtime.moe)
            )
            if model.moe is not None
            else 0.0
        )
        blocks.append(
            PartTimes(
                fwd_compute_s=bt.forward_s,
                bwd_compute_s=bt.backward_s,
                fwd_tp_s=once,
                bwd_tp_s=once * (2 if rc == "full" else 1) + routing_grad,
                fwd_ep_s=a2a_pass + counts,
                bwd_ep_s=a2a_pass + (a2a_pass + counts if rc == "full" else 0.0),
                fwd_cp_s=cp_block[r].forward_s,
                bwd_cp_s=cp_block[r].backward_s,
            )
        )
        if r == 0:
            et = max(
                (parts[i]["embedding"] for i in x.types[r]),
                key=lambda p: p.forward_s + p.backward_s,
            )
            emb = PartTimes(
                fwd_compute_s=et.forward_s,
                bwd_compute_s=et.backward_s,
                fwd_tp_s=tp_coll(RS if sp else AR, r, buf),
                bwd_tp_s=tp_coll(AG, r, buf) if sp else 0.0,
            )
        if r == last_rank:
            ht = max(
                (parts[i]["head"] for i in x.types[r]), key=lambda p: p.forward_s + p.backward_s
            )
            # vocab-parallel cross-entropy (max, sum, target)
            loss = 3 * tp_coll(AR, r, 4.0 * mb * x.seq)
            head = PartTimes(
                fwd_compute_s=ht.forward_s,
                bwd_compute_s=ht.backward_s,
                fwd_tp_s=(tp_coll(AG, r, buf) if sp else 0.0) + loss,
                bwd_tp_s=tp_coll(RS if sp else AR, r, buf),
            )
    assert emb is not None and head is not None
    # parts timed under the executor's DTensor TP already hold their collectives (profile.py)
    with_tp = comp.tp_timed - comp.tp_plain
    blocks = [replace(b, fwd_tp_s=0.0, bwd_tp_s=0.0) if "block" in with_tp else b for b in blocks]
    emb = replace(emb, fwd_tp_s=0.0, bwd_tp_s=0.0) if "embedding" in with_tp else emb
    head = replace(head, fwd_tp_s=0.0, bwd_tp_s=0.0) if "head" in with_tp else head
    if with_tp:
        notes.append(
            f"TP collectives measured inside the profiled {', '.join(sorted(with_tp))} times"
        )
    return blocks, emb, head


def _state_bytes(
    x: RankInputs,
) -> tuple[memory.StateBytesPerParam, memory.StateBytesPerParam | None]:
    """Model-state bytes per parameter: dense (ZeRO over dp x cp) and, for MoE, the routed
    experts' (ZeRO over their expert-data-parallel group)."""
    c, t = x.config, x.training
    pipelined = c.pp > 1

    def state(shard: int) -> memory.StateBytesPerParam:
        return memory.state_bytes_per_param(
            t.dtype, t.grad_dtype, c.zero, shard, pipelined=pipelined, rules=x.rules
        )

    return state(c.dp_cp), state(c.dp_cp // c.ep) if x.model.moe is not None else None


def _fixed_bytes(
    x: RankInputs,
    *,
    params: memory.RankParams,
    weights_bytes: float,
    recompute_working_bytes: float,
    head_activation_bytes: float,
    p2p_bytes: float,
) -> tuple[float, ...]:
    """Per rank, the bytes that do not scale with the rank's blocks: the framework reserve,
    full recompute's working set, CP's K/V gradient, ZeRO-3's gathered weights, MoE transients
    and the pipeline's buffers."""
    c, model, dtype = x.config, x.model, x.training.dtype
    frag = memory.ALLOCATOR_FRAGMENTATION
    expert_dp = c.dp_cp // c.ep
    kv_grad = cpcost.kv_grad_transient_bytes(
        model,
        micro_batch=c.micro_batch,
        seq_len=x.training.seq_len,
        tp=c.tp,
        cp=c.cp,
        dtype=dtype,
        rules=x.runtime.cp,
        kind=c.cp_attention,
    )
    fixed = []
    for r in range(c.pp):
        extra = memory.CPU_WORKER_RESERVE_BYTES if x.on_cpu(r) else memory.FRAMEWORK_RESERVE_BYTES
        if c.recompute.value == "full":
            # one block's recompute working set in backward; on the last rank it comes after
            # the head's backward has freed the loss's peak, so only the larger of the two counts
            working = recompute_working_bytes
            if r == c.pp - 1:
                working = max(working - head_activation_bytes, 0.0)
            extra += working * (1 + frag)
        # one layer's gradient of the gathered K, V waits for its reduce-scatter (runtime.py)
        extra += kv_grad * (1 + frag)
        if c.zero >= 3 and weights_bytes < dtype.nbytes:  # sharded weights (runtime.py)
            gathered = params.per_block + (params.expert_per_block if expert_dp > 1 else 0)
            extra += 2 * gathered * dtype.nbytes  # gathered weights: current + prefetch
        if model.moe is not None:
            extra += moe.transient_bytes(
                model, c.micro_batch * x.seq, c.ep, dtype.nbytes, x.runtime.moe
            )
        if c.pp > 1:
            extra += memory.pipeline_buffer_bytes(
                p2p_bytes,
                pp=c.pp,
                virtual_stages=c.virtual_stages,
                num_micro_batches=x.micro_batches,
                pp_rank=r,
                rules=x.rules,
            )
        fixed.append(extra)
    return tuple(fixed)


def _measured_step_parts(
    x: RankInputs, comp: RankCompute
) -> tuple[tuple[compute.OptimizerTimes | None, ...], tuple[compute.DpUnitSync | None, ...]]:
    """Per rank, the profile's optimizer step and (ZeRO-0 on CPU workers at tp = 1, the only
    case it measures) each FSDP unit's sync as the executor's replicate runs it; None where
    the model prices them instead."""
    c, profile, model = x.config, x.profile, x.model

    def names(r: int) -> list[str | None]:
        return [comp.device_names[i] for i in x.types[r]]

    # DTensor parameters (FSDP2/replicate, TP) pay per-op dispatch in the optimizer step
    opt_dist = c.dp_cp > 1 or c.tp > 1
    opt_times = tuple(
        compute.rank_optimizer_times(profile, names(r), tp=c.tp, distributed=opt_dist)
        # the records are of dense blocks; an MoE rank's step is priced from bytes (moe.py)
        if profile is not None and comp.use_profile and model.moe is None
        else None
        for r in range(c.pp)
    )
    sync_measured = c.zero == 0 and c.tp == 1 and c.dp_cp > 1 and model.moe is None
    dp_sync = tuple(
        compute.rank_dp_sync(profile, names(r), group_size=c.dp_cp)
        if profile is not None and comp.use_profile and sync_measured and x.on_cpu(r)
        else None
        for r in range(c.pp)
    )
    return opt_times, dp_sync


def _with_dp_wrapper_overhead(
    blocks: list[PartTimes],
    emb: PartTimes,
    head: PartTimes,
    dp_sync: tuple[compute.DpUnitSync | None, ...],
    last_rank: int,
) -> tuple[list[PartTimes], PartTimes, PartTimes]:
    """The data-parallel wrapper's own cost per micro-batch (its hooks, sync off; measured by
    the profiler as `DpSyncRecord.forward/backward_overhead_s`) on the compute of every unit,
    where the rank's sync is measured (ZeRO-0 on CPU workers: nothing overlaps it there)."""

    def add(p: PartTimes, overhead: tuple[float, float]) -> PartTimes:
        return replace(
            p,
            fwd_compute_s=p.fwd_compute_s + overhead[0],
            bwd_compute_s=p.bwd_compute_s + overhead[1],
        )

    out = [add(b, u.block_overhead) if (u := dp_sync[r]) else b for r, b in enumerate(blocks)]
    if dp_sync and (u := dp_sync[0]) is not None:
        emb = add(emb, u.embedding_overhead)
    if dp_sync and (u := dp_sync[last_rank]) is not None:
        head = add(head, u.head_overhead)
    return out, emb, head
