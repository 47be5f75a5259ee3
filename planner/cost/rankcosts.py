"""Per-pipeline-rank cost coefficients of one configuration (split-independent).

Owns: turning specs + config (+ profile) into the per-block, per-rank numbers that both the
event-simulated estimate and the ILP's SplitProblem use: block/embedding/head forward and
backward times (compute and TP collectives apart), p2p times per pipeline boundary, DP
collective links, memory coefficients, capacities, and the notes saying where each number
came from. Computing them once keeps `estimate` and `split_problem` consistent by construction.
Does not own: the schedule (schedule.py) or the final assembly (estimate.py).

Heterogeneous clusters: a pipeline rank's time is its slowest GPU type's time and its capacity
the smallest GPU memory among its GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from planner.cost import analytic, compute, grad_accum, memory, moe
from planner.cost import cp as cpcost
from planner.cost.analytic import AnalyticConstants, PassTimes
from planner.cost.comm import ClusterArrays, GroupLink, measured_collective_s, ring_time_s
from planner.cost.kernels import memory_bound_s
from planner.parallel import MeshAxis, ParallelConfig
from planner.profile import BlockKind, CollectiveOp, Profile
from planner.runtime import EXECUTOR, RuntimeSemantics
from planner.specs import ClusterSpec, DeviceKind, GpuSpec, ModelSpec, TrainingSpec

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


def _profile_matches(profile: Profile, model: ModelSpec) -> bool:
    meta = profile.meta.model
    return meta is not None and replace(meta, name=model.name) == model


def _rank_gpu_types(arrays: ClusterArrays, cluster: ClusterSpec, pp: int) -> list[list[int]]:
    """Indices of the distinct node entries (by GPU name) present on each pipeline rank."""
    names = [n.gpu.name for n in cluster.nodes]
    first_of = {name: names.index(name) for name in names}
    canon = np.array([first_of[n] for n in names])
    return [sorted(set(np.unique(canon[arrays.node[r]]).tolist())) for r in range(pp)]


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
    pp, tp, v, cp = config.pp, config.tp, config.virtual_stages, config.cp
    # with context parallelism a rank holds seq_len/cp tokens of each sequence; cp.py adds
    # what the local view misses (attention over the whole sequence, CP collectives, K/V)
    mb, seq, dtype = config.micro_batch, training.seq_len // cp, training.dtype
    sp, rc, flash = config.sequence_parallel, config.recompute.value, training.flash_attention
    m = config.num_micro_batches(training)
    notes: list[str] = []
    arrays = ClusterArrays(
        cluster, config, constants.intra_link_efficiency, constants.network_efficiency
    )
    types = _rank_gpu_types(arrays, cluster, pp)
    gpus: dict[int, GpuSpec] = {i: cluster.nodes[i].gpu for t in types for i in t}

    rules = runtime.memory
    residual = rules.residual_bytes(dtype.nbytes, config.dp_cp)
    cp_rules = runtime.cp

    def act(seq_par: bool, recompute: str) -> float:
        return memory.block_activation_bytes(
            model,
            micro_batch=mb,
            seq_len=seq,
            tp=tp,
            sequence_parallel=seq_par,
            recompute=recompute,
            flash_attention=flash,
            dtype=dtype,
            residual_bytes=residual,
            rules=rules,
            ep=config.ep,
        )

    def cp_kv(recompute: str) -> float:
        return cpcost.saved_extra_bytes(
            model,
            micro_batch=mb,
            seq_len=training.seq_len,
            tp=tp,
            cp=cp,
            recompute=recompute,
            dtype=dtype,
            rules=cp_rules,
            kind=config.cp_attention,
        )

    block_act = act(sp, rc) + cp_kv(rc)
    block_act_none = act(sp, "none") + cp_kv("none")

    # --- compute per GPU type: measured when the profile covers it, else analytic
    use_profile = profile is not None and bool(profile.compute)
    if profile is not None and use_profile and not _profile_matches(profile, model):
        notes.append(
            f"profile was measured for a different model than '{model.name}'; compute from the analytic model"
        )
        use_profile = False
    device_names = (
        compute.node_device_names(profile, cluster) if profile is not None and use_profile else ()
    )
    params = memory.tp_rank_params(model, tp, config.num_chunks, config.ep)
    traffic_bytes, per_param = grad_accum.part_traffic_bytes(runtime, config, training, params)
    parts: dict[int, dict[str, PassTimes]] = {}
    tp_timed: set[str] = set()  # parts whose records were timed with their TP collectives
    tp_plain: set[str] = set()
    measured_blocks = bool(use_profile)
    profiled_activations = False
    for i, gpu in gpus.items():
        analytic_parts = {
            "block": analytic.block_times(
                model,
                micro_batch=mb,
                seq_len=seq,
                tp=tp,
                recompute=rc,
                flash_attention=flash,
                sequence_parallel=sp,
                dropout=memory.has_dropout(model, rules),
                gpu=gpu,
                dtype=dtype,
                gemm_dtype=training.gemm_dtype,
                c=constants,
                ep=config.ep,
                moe_imbalance=runtime.moe.imbalance(config.ep, model.moe.experts)
                if model.moe
                else 1.0,
                per_expert_gemms=runtime.moe.gemm_per_local_expert,
                norm_input_bytes=rules.norm_input_bytes,
            ),
            "embedding": analytic.embedding_times(
                model, micro_batch=mb, seq_len=seq, gpu=gpu, dtype=dtype, c=constants
            ),
            "head": analytic.head_times(
                model,
                micro_batch=mb,
                seq_len=seq,
                tp=tp,
                gpu=gpu,
                dtype=dtype,
                c=constants,
                norm_input_bytes=rules.norm_input_bytes,
            ),
        }
        if cp > 1:
            cp_extra = cpcost.attention_extra_times(
                model,
                micro_batch=mb,
                seq_len=training.seq_len,
                tp=tp,
                cp=cp,
                recompute=rc,
                flash_attention=flash,
                gpu=gpu,
                dtype=dtype,
                c=constants,
            )
        dev = device_names[i] if use_profile else None
        measured_keys: set[str] = set()
        for key, kind in (
            ("block", BlockKind.TRANSFORMER_BLOCK),
            ("embedding", BlockKind.EMBEDDING),
            ("head", BlockKind.HEAD_AND_LOSS),
        ):
            rec = None
            if key == "block" and model.moe is not None:
                # the profiler times dense blocks only; the MoE block's expert GEMMs depend on
                # ep and the routing, which no record describes yet
                measured_blocks = False
                if use_profile:
                    notes.append("MoE blocks: analytic estimate (no measured MoE block records)")
                continue
            if dev is not None and profile is not None:
                rec = compute.lookup(
                    profile,
                    block=kind,
                    device_name=dev,
                    tp=tp,
                    micro_batch=mb,
                    seq_len=seq,
                    recompute=rc,
                )
            if rec is None:
                if key == "block":
                    measured_blocks = False
                if use_profile:
                    notes.append(
                        f"{kind.value} on {gpu.name}: not in the profile, analytic estimate"
                    )
                continue
            analytic_parts[key] = PassTimes(forward_s=rec.forward_s, backward_s=rec.backward_s)
            measured_keys.add(key)
            if key == "block" and cp > 1:
                notes.append(
                    f"block measured at seq_len/cp = {seq}; the attention over the whole "
                    "sequence beyond it is analytic (planner/cost/cp.py)"
                )
            (tp_timed if rec.tp_collectives_included else tp_plain).add(key)
            if rec.note:
                notes.append(rec.note)
            if key == "block" and rec.activation_bytes is not None:
                profiled_activations = True
        for key, (fwd_bytes, bwd_bytes) in traffic_bytes.items():
            if key not in measured_keys:  # a measured pass holds autograd's accumulation
                p = analytic_parts[key]
                analytic_parts[key] = PassTimes(
                    forward_s=p.forward_s + memory_bound_s(fwd_bytes, gpu, constants),
                    backward_s=p.backward_s + memory_bound_s(bwd_bytes, gpu, constants),
                )
        if cp > 1:
            b = analytic_parts["block"]
            analytic_parts["block"] = PassTimes(
                forward_s=b.forward_s + cp_extra.forward_s,
                backward_s=b.backward_s + cp_extra.backward_s,
            )
        parts[i] = analytic_parts
    source = "measured" if measured_blocks else "analytic"
    if not measured_blocks and per_param.forward_bytes + per_param.backward_bytes > 0:
        notes.append(
            "gradient accumulation and DP-wrapper copies: "
            f"{per_param.forward_bytes + per_param.backward_bytes:.1f} B per parameter per "
            "micro-batch through HBM, in compute (planner/cost/grad_accum.py)"
        )
    if measured_blocks and profiled_activations:
        # The profiler times blocks in one dtype without autocast, which saves other tensors
        # than training does (fp32 norm copies, runtime.py MemoryRules); memory comes from the
        # executor's rules, which memcheck checks against the executor itself.
        notes.append("activation memory from the executor's memory rules, not the profile")
    if source == "analytic":
        notes.insert(0, "analytic estimate")
    if model.moe is not None:
        notes.extend(moe.notes(model, config.ep, runtime.moe))

    # --- collectives
    buf = float(mb * seq * model.hidden * dtype.nbytes)
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
        model, training, config, arrays, profile, constants, runtime, gpus, notes
    )
    blocks, emb, head = [], None, None
    last_rank = (pp * v - 1) % pp
    a2a = (
        moe.ep_links(
            cluster, config, (constants.intra_link_efficiency, constants.network_efficiency)
        )
        if config.ep > 1
        else None
    )
    a2a_bytes = (
        moe.dispatch_bytes(model, mb * seq, config.ep, dtype.nbytes, runtime.moe) if a2a else 0.0
    )
    for r in range(pp):
        worst = max(
            types[r], key=lambda i: parts[i]["block"].forward_s + parts[i]["block"].backward_s
        )
        bt = parts[worst]["block"]
        # Megatron: 2 all-reduces per pass (f/g operators); SP: all-gather + reduce-scatter
        # in their place, same volume (Korthikanti et al. 2022 Sec. 4.2.2)
        once = 2 * tp_coll(AG, r, buf) + 2 * tp_coll(RS, r, buf) if sp else 2 * tp_coll(AR, r, buf)
        # MoE: dispatch + combine per pass; full recompute runs the forward's pair again
        a2a_pass = moe.all_to_all_pass_s(a2a_bytes, a2a, r, profile) if a2a else 0.0
        counts = moe.count_exchange_s(model, a2a, r, profile, runtime.moe) if a2a else 0.0
        routing_grad = (
            sum(
                tp_coll(AR, r, n)
                for n in moe.routing_grad_bytes(model, mb * seq, dtype.nbytes, runtime.moe)
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
                (parts[i]["embedding"] for i in types[r]), key=lambda p: p.forward_s + p.backward_s
            )
            emb = PartTimes(
                fwd_compute_s=et.forward_s,
                bwd_compute_s=et.backward_s,
                fwd_tp_s=tp_coll(RS if sp else AR, r, buf),
                bwd_tp_s=tp_coll(AG, r, buf) if sp else 0.0,
            )
        if r == last_rank:
            ht = max((parts[i]["head"] for i in types[r]), key=lambda p: p.forward_s + p.backward_s)
            loss = 3 * tp_coll(
                AR, r, 4.0 * mb * seq
            )  # vocab-parallel cross-entropy (max, sum, target)
            head = PartTimes(
                fwd_compute_s=ht.forward_s,
                bwd_compute_s=ht.backward_s,
                fwd_tp_s=(tp_coll(AG, r, buf) if sp else 0.0) + loss,
                bwd_tp_s=tp_coll(RS if sp else AR, r, buf),
            )
    assert emb is not None and head is not None
    # parts timed under the executor's DTensor TP already hold their collectives (profile.py)
    with_tp = tp_timed - tp_plain
    blocks = [replace(b, fwd_tp_s=0.0, bwd_tp_s=0.0) if "block" in with_tp else b for b in blocks]
    emb = replace(emb, fwd_tp_s=0.0, bwd_tp_s=0.0) if "embedding" in with_tp else emb
    head = replace(head, fwd_tp_s=0.0, bwd_tp_s=0.0) if "head" in with_tp else head
    if with_tp:
        notes.append(
            f"TP collectives measured inside the profiled {', '.join(sorted(with_tp))} times"
        )

    # stages exchange the residual stream (fp32 without FSDP mixed precision, runtime.py)
    p2p_bytes = mb * seq * model.hidden * residual / (tp if sp else 1)
    p2p = tuple(
        arrays.boundary_p2p_s(r, (r + 1) % pp, p2p_bytes, profile) if pp > 1 else 0.0
        for r in range(pp)
    )
    if profile is None or not (profile.p2p or profile.collectives):
        notes.append("links from the cluster's link classes (no measured link profile)")

    # --- memory
    head_act = memory.head_activation_bytes(
        model,
        micro_batch=mb,
        seq_len=seq,
        tp=tp,
        sequence_parallel=sp,
        dtype=dtype,
        pipelined=pp > 1,
        # GPipe runs every forward before the first backward; the other schedules run the last
        # chunk's backward right after its forward
        in_flight=float(m) if config.schedule.value == "gpipe" else 1.0,
        rules=rules,
    )
    state = memory.state_bytes_per_param(
        dtype, training.grad_dtype, config.zero, config.dp_cp, pipelined=pp > 1, rules=rules
    )
    expert_dp = config.dp_cp // config.ep  # ZeRO shards over dp x cp (estimate.py alike)
    expert_state = (
        memory.state_bytes_per_param(
            dtype, training.grad_dtype, config.zero, expert_dp, pipelined=pp > 1, rules=rules
        )
        if model.moe is not None
        else None
    )
    frag = memory.ALLOCATOR_FRAGMENTATION
    kv_grad = cpcost.kv_grad_transient_bytes(
        model,
        micro_batch=mb,
        seq_len=training.seq_len,
        tp=tp,
        cp=cp,
        dtype=dtype,
        rules=cp_rules,
        kind=config.cp_attention,
    )
    fixed = []
    for r in range(pp):
        on_cpu = all(cluster.nodes[i].gpu.kind is DeviceKind.CPU for i in types[r])
        extra = memory.CPU_WORKER_RESERVE_BYTES if on_cpu else memory.FRAMEWORK_RESERVE_BYTES
        if rc == "full":
            # one block's recompute working set in backward; on the last rank it comes after
            # the head's backward has freed the loss's peak, so only the larger of the two counts
            working = block_act_none
            if r == pp - 1:
                working = max(working - head_act, 0.0)
            extra += working * (1 + frag)
        # one layer's gradient of the gathered K, V waits for its reduce-scatter (runtime.py)
        extra += kv_grad * (1 + frag)
        if config.zero >= 3 and state.weights < dtype.nbytes:  # sharded weights (runtime.py)
            gathered = params.per_block + (params.expert_per_block if expert_dp > 1 else 0)
            extra += 2 * gathered * dtype.nbytes  # gathered weights: current + prefetch
        if model.moe is not None:
            extra += moe.transient_bytes(model, mb * seq, config.ep, dtype.nbytes, runtime.moe)
        if pp > 1:
            extra += memory.pipeline_buffer_bytes(
                p2p_bytes, pp=pp, virtual_stages=v, num_micro_batches=m, pp_rank=r, rules=rules
            )
        fixed.append(extra)
    capacity = tuple(
        float(min(cluster.nodes[i].gpu.capacity_bytes for i in types[r])) for r in range(pp)
    )
    hbm = tuple(min(cluster.nodes[i].gpu.hbm_bytes_per_s for i in types[r]) for r in range(pp))
    # DTensor parameters (FSDP2/replicate, TP) pay per-op dispatch in the optimizer step
    opt_dist = config.dp_cp > 1 or tp > 1
    opt_times = tuple(
        compute.rank_optimizer_times(
            profile, [device_names[i] for i in types[r]], tp=tp, distributed=opt_dist
        )
        # the records are of dense blocks; an MoE rank's step is priced from bytes (moe.py)
        if profile is not None and use_profile and model.moe is None
        else None
        for r in range(pp)
    )
    # ZeRO-0 on CPU workers at tp = 1: the unit's sync as the executor's replicate runs it
    sync_measured = config.zero == 0 and tp == 1 and config.dp_cp > 1 and model.moe is None
    dp_sync = tuple(
        compute.rank_dp_sync(profile, [device_names[i] for i in types[r]], group_size=config.dp_cp)
        if profile is not None
        and use_profile
        and sync_measured
        and all(cluster.nodes[i].gpu.kind is DeviceKind.CPU for i in types[r])
        else None
        for r in range(pp)
    )
    dp_links = arrays.axis_links(MeshAxis.DP)
    blocks, emb, head = _with_dp_wrapper_overhead(blocks, emb, head, dp_sync, last_rank)
    return RankCosts(
        pp=pp,
        virtual_stages=v,
        num_micro_batches=m,
        block=tuple(blocks),
        embedding=emb,
        head=head,
        p2p_s=p2p,
        dp_links=dp_links,
        dp_groups=tuple(arrays.gpu[r].T for r in range(pp)),
        profile=profile,
        params=params,
        state=state,
        block_activation_bytes=block_act,
        embedding_activation_bytes=memory.embedding_activation_bytes(
            model, micro_batch=mb, seq_len=seq, tp=tp, sequence_parallel=sp, rules=rules
        ),
        head_activation_bytes=head_act,
        # kept to the peak where gradients accumulate across micro-batches; ZeRO-2/3 without
        # pipelining reduce-scatter (and free) it after every micro-batch's backward
        embedding_extra_bytes=memory.embedding_gradient_excess_bytes(
            model, tp, training.grad_dtype, rules
        )
        if pp > 1 or config.zero < 2
        else 0.0,
        in_flight=memory.in_flight(config.schedule.value, pp, v, m),
        fixed_bytes=tuple(fixed),
        capacity_bytes=capacity,
        hbm_bytes_per_s=hbm,
        optimizer=opt_times,
        dp_sync=dp_sync,
        expert_state=expert_state,
        expert_dp=moe.expert_dp_links(
            cluster, config, (constants.intra_link_efficiency, constants.network_efficiency)
        )
        if model.moe is not None and expert_dp > 1
        else None,
        source=source,
        notes=tuple(dict.fromkeys(notes)),
    )


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
