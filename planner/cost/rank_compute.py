"""Compute per GPU type of one configuration: each part's forward and backward, measured or analytic.

Owns: the inputs every part of planner/cost/rankcosts.py reads (`RankInputs`), and turning them
into the block, embedding and head passes of every GPU type on the cluster (`compute_parts`):
the profile's records where they cover the configuration, else the analytic kernels
(analytic.py) plus the gradient-accumulation traffic (grad_accum.py); the CP attention beyond
a rank's local view (cp.py) on the block either way; and the notes saying which was used.
Does not own: collectives, per-rank assembly or memory (rankcosts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.cost import analytic, compute, grad_accum, memory, moe
from planner.cost import cp as cpcost
from planner.cost.analytic import AnalyticConstants, PassTimes
from planner.cost.comm import ClusterArrays
from planner.cost.kernels import memory_bound_s
from planner.parallel import ParallelConfig
from planner.profile import BlockKind, Profile
from planner.runtime import MemoryRules, RuntimeSemantics
from planner.specs import ClusterSpec, DeviceKind, GpuSpec, ModelSpec, TrainingSpec


@dataclass(frozen=True, kw_only=True)
class RankInputs:
    """What every part of `build_rank_costs` reads: the specs, the runtime and constants, the
    cluster as pipeline ranks see it (`types`: the node entries on each rank, `gpus`: their
    GPU specs) and one micro-batch's local shape (`seq` = seq_len / cp: with context
    parallelism a rank holds that much of each sequence; cp.py adds what the local view
    misses, attention over the whole sequence, CP collectives, K/V)."""

    model: ModelSpec
    training: TrainingSpec
    cluster: ClusterSpec
    config: ParallelConfig
    profile: Profile | None
    constants: AnalyticConstants
    runtime: RuntimeSemantics
    arrays: ClusterArrays
    types: list[list[int]]
    gpus: dict[int, GpuSpec]
    seq: int
    micro_batches: int

    @property
    def rules(self) -> MemoryRules:
        return self.runtime.memory

    def on_cpu(self, r: int) -> bool:
        return all(self.cluster.nodes[i].gpu.kind is DeviceKind.CPU for i in self.types[r])


@dataclass(frozen=True, kw_only=True)
class RankCompute:
    """Per GPU type (node entry index) the block / embedding / head passes, measured when the
    profile covers them, and what the profile said about them."""

    parts: dict[int, dict[str, PassTimes]]
    tp_timed: frozenset[str]  # parts whose records were timed with their TP collectives
    tp_plain: frozenset[str]
    source: str
    use_profile: bool
    device_names: tuple[str | None, ...]


def _profile_matches(profile: Profile, model: ModelSpec) -> bool:
    meta = profile.meta.model
    return meta is not None and replace(meta, name=model.name) == model


def _analytic_parts(x: RankInputs, gpu: GpuSpec) -> dict[str, PassTimes]:
    """Block, embedding and head passes on `gpu` from the analytic kernels (analytic.py)."""
    c, model, training, rules = x.config, x.model, x.training, x.rules
    return {
        "block": analytic.block_times(
            model,
            micro_batch=c.micro_batch,
            seq_len=x.seq,
            tp=c.tp,
            recompute=c.recompute.value,
            flash_attention=training.flash_attention,
            sequence_parallel=c.sequence_parallel,
            dropout=memory.has_dropout(model, rules),
            gpu=gpu,
            dtype=training.dtype,
            gemm_dtype=training.gemm_dtype,
            c=x.constants,
            ep=c.ep,
            moe_imbalance=x.runtime.moe.imbalance(c.ep, model.moe.experts) if model.moe else 1.0,
            per_expert_gemms=x.runtime.moe.gemm_per_local_expert,
            norm_input_bytes=rules.norm_input_bytes,
        ),
        "embedding": analytic.embedding_times(
            model,
            micro_batch=c.micro_batch,
            seq_len=x.seq,
            gpu=gpu,
            dtype=training.dtype,
            c=x.constants,
        ),
        "head": analytic.head_times(
            model,
            micro_batch=c.micro_batch,
            seq_len=x.seq,
            tp=c.tp,
            gpu=gpu,
            dtype=training.dtype,
            c=x.constants,
            norm_input_bytes=rules.norm_input_bytes,
        ),
    }


def compute_parts(x: RankInputs, params: memory.RankParams, notes: list[str]) -> RankCompute:
    """Per GPU type: measured passes where the profile has them, else analytic ones plus the
    gradient-accumulation traffic (grad_accum.py; a measured pass only what it did not stream);
    CP's attention beyond the local view is added to the block either way."""
    model, profile, c = x.model, x.profile, x.config
    use_profile = profile is not None and bool(profile.compute)
    if profile is not None and use_profile and not _profile_matches(profile, model):
        notes.append(
            f"profile was measured for a different model than '{model.name}'; compute from "
            "the analytic model"
        )
        use_profile = False
    device_names = (
        compute.node_device_names(profile, x.cluster) if profile is not None and use_profile else ()
    )
    traffic_bytes, per_param = grad_accum.part_traffic_bytes(x.runtime, c, x.training, params)
    held = (
        grad_accum.profiled_accumulation_bytes(profile.meta.dtype.nbytes, params)
        if profile is not None and use_profile
        else {}
    )
    parts: dict[int, dict[str, PassTimes]] = {}
    tp_timed: set[str] = set()
    tp_plain: set[str] = set()
    measured_blocks = bool(use_profile)
    profiled_activations = False
    for i, gpu in x.gpus.items():
        found = _analytic_parts(x, gpu)
        dev = device_names[i] if use_profile else None
        measured_keys: set[str] = set()
        for key, kind in (
            ("block", BlockKind.TRANSFORMER_BLOCK),
            ("embedding", BlockKind.EMBEDDING),
            ("head", BlockKind.HEAD_AND_LOSS),
        ):
            if key == "block" and model.moe is not None:
                # the profiler times dense blocks only; the MoE block's expert GEMMs depend on
                # ep and the routing, which no record describes yet
                measured_blocks = False
                if use_profile:
                    notes.append("MoE blocks: analytic estimate (no measured MoE block records)")
                continue
            rec = None
            if dev is not None and profile is not None:
                rec = compute.lookup(
                    profile,
                    block=kind,
                    device_name=dev,
                    tp=c.tp,
                    micro_batch=c.micro_batch,
                    seq_len=x.seq,
                    recompute=c.recompute.value,
                )
            if rec is None:
                if key == "block":
                    measured_blocks = False
                if use_profile:
                    notes.append(
                        f"{kind.value} on {gpu.name}: not in the profile, analytic estimate"
                    )
                continue
            found[key] = PassTimes(forward_s=rec.forward_s, backward_s=rec.backward_s)
            measured_keys.add(key)
            if key == "block" and c.cp > 1:
                notes.append(
                    f"block measured at seq_len/cp = {x.seq}; the attention over the whole "
                    "sequence beyond it is analytic (planner/cost/cp.py)"
                )
            (tp_timed if rec.tp_collectives_included else tp_plain).add(key)
            if rec.note:
                notes.append(rec.note)
            if key == "block" and rec.activation_bytes is not None:
                profiled_activations = True
        held_by_pass = {k: held[k] for k in measured_keys}
        found = _with_traffic_and_cp(x, found, held_by_pass, traffic_bytes, gpu)
        parts[i] = found
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
        notes.extend(moe.notes(model, c.ep, x.runtime.moe))
    return RankCompute(
        parts=parts,
        tp_timed=frozenset(tp_timed),
        tp_plain=frozenset(tp_plain),
        source=source,
        use_profile=use_profile,
        device_names=tuple(device_names),
    )


def _with_traffic_and_cp(
    x: RankInputs,
    found: dict[str, PassTimes],
    held: dict[str, float],
    traffic_bytes: dict[str, tuple[float, float]],
    gpu: GpuSpec,
) -> dict[str, PassTimes]:
    """Each pass plus its gradient-accumulation traffic (a measured pass, keyed in `held`,
    only what it did not already stream), and the block plus CP's attention over the whole
    sequence beyond the local view (cp.py), measured or not."""
    out = dict(found)
    for key, (fwd_bytes, bwd_bytes) in traffic_bytes.items():
        p = out[key]
        out[key] = PassTimes(
            forward_s=p.forward_s + memory_bound_s(fwd_bytes, gpu, x.constants),
            backward_s=p.backward_s
            + memory_bound_s(max(0.0, bwd_bytes - held.get(key, 0.0)), gpu, x.constants),
        )
    c = x.config
    if c.cp > 1:
        extra = cpcost.attention_extra_times(
            x.model,
            micro_batch=c.micro_batch,
            seq_len=x.training.seq_len,
            tp=c.tp,
            cp=c.cp,
            recompute=c.recompute.value,
            flash_attention=x.training.flash_attention,
            gpu=gpu,
            dtype=x.training.dtype,
            c=x.constants,
        )
        b = out["block"]
        out["block"] = PassTimes(
            forward_s=b.forward_s + extra.forward_s, backward_s=b.backward_s + extra.backward_s
        )
    return out
