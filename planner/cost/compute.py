"""Block times and activation bytes from a measured Profile.

Owns: looking up ComputeRecords by (block, device_name, tp, micro_batch, seq_len, recompute)
and OptimizerRecords by (device_name, tp, plain or DTensor parameters);
a least-squares line of time (and activation bytes) vs micro_batch when the asked size was not
measured (said in the result's note); deriving a full-recompute backward from a no-recompute
record (backward + one forward, as checkpointing runs); mapping cluster nodes to the profile's
device names.
Does not own: the analytic fallback (analytic.py) or how times combine (estimate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.parallel import Recompute
from planner.profile import BlockKind, ComputeRecord, Profile
from planner.profile_match import describes, device_name_for
from planner.specs import ClusterSpec


@dataclass(frozen=True, kw_only=True)
class MeasuredBlock:
    """Per-micro-batch times of one block on one device; `activation_bytes` None when the
    record's recompute mode differs from the one asked (the caller uses the analytic bytes)."""

    forward_s: float
    backward_s: float
    activation_bytes: float | None
    note: str | None
    tp_collectives_included: bool = False  # every record used was timed under DTensor TP


def node_device_names(profile: Profile, cluster: ClusterSpec) -> tuple[str | None, ...]:
    """The profile device name of each cluster node: from the profile's GPU list by global id
    when that device is of the node's GPU type, else the compute records' device of that type
    (planner/profile_match.py), else None (not measured): a mixed cluster never borrows one
    type's block times for another."""
    by_id = {g.gpu_id: g.device_name for g in profile.gpus}
    names = {r.device_name for r in profile.compute}
    kind = profile.meta.device_kind
    out: list[str | None] = []
    for i, node in enumerate(cluster.nodes):
        ids = cluster.gpu_ids_of_node(i)
        name = by_id.get(ids[0]) if len(ids) else None
        if name in names and describes(name, kind, node.gpu):
            out.append(name)
        else:
            out.append(device_name_for(profile, node.gpu))
    return tuple(out)


def _fit_line(xs: list[float], ys: list[float], x: float) -> float:
    """Least-squares y = a + b x evaluated at x (numpy lstsq)."""
    a = np.vstack([np.ones(len(xs)), np.asarray(xs, dtype=float)]).T
    coef, *_ = np.linalg.lstsq(a, np.asarray(ys, dtype=float), rcond=None)
    return float(max(coef[0] + coef[1] * x, 0.0))


def _at_micro_batch(
    recs: list[ComputeRecord], micro_batch: int
) -> tuple[float, float, float, str | None]:
    for r in recs:
        if r.micro_batch == micro_batch:
            return r.forward_s, r.backward_s, float(r.activation_bytes), None
    sizes = sorted({r.micro_batch for r in recs})
    listed = ",".join(str(s) for s in sizes)
    if len(sizes) == 1:
        r = recs[0]
        k = micro_batch / r.micro_batch
        note = f"micro_batch {micro_batch} scaled linearly from measured {listed}"
        return r.forward_s * k, r.backward_s * k, r.activation_bytes * k, note
    xs = [float(r.micro_batch) for r in recs]
    how = "interpolated" if sizes[0] < micro_batch < sizes[-1] else "extrapolated"
    note = f"micro_batch {micro_batch} {how} from measured {listed} (least-squares line)"
    return (
        _fit_line(xs, [r.forward_s for r in recs], micro_batch),
        _fit_line(xs, [r.backward_s for r in recs], micro_batch),
        _fit_line(xs, [float(r.activation_bytes) for r in recs], micro_batch),
        note,
    )


def lookup(
    profile: Profile,
    *,
    block: BlockKind,
    device_name: str,
    tp: int,
    micro_batch: int,
    seq_len: int,
    recompute: str,
) -> MeasuredBlock | None:
    """The measured block, or None when nothing usable was measured for this key."""
    base = [
        r
        for r in profile.compute
        if r.block is block and r.device_name == device_name and r.tp == tp and r.seq_len == seq_len
    ]
    same = [r for r in base if Recompute(r.recompute).value == recompute]
    if same:
        f, b, act, note = _at_micro_batch(same, micro_batch)
        return MeasuredBlock(
            forward_s=f,
            backward_s=b,
            activation_bytes=act,
            note=note,
            tp_collectives_included=all(r.tp_collectives_included for r in same),
        )
    plain = [r for r in base if Recompute(r.recompute) is Recompute.NONE]
    if not plain:
        return None
    f, b, _, note = _at_micro_batch(plain, micro_batch)
    if recompute == "full":
        b += f
    derived = f"{block.value} recompute={recompute} derived from the recompute=none record"
    return MeasuredBlock(
        forward_s=f,
        backward_s=b,
        activation_bytes=None,
        note=f"{note}; {derived}" if note else derived,
        tp_collectives_included=all(r.tp_collectives_included for r in plain),
    )


@dataclass(frozen=True, kw_only=True)
class OptimizerTimes:
    """Measured optimizer step per block kind on one device (seconds, parameters unsharded
    by ZeRO); `distributed` says whether the parameters were DTensors."""

    block_s: float
    embedding_s: float
    head_s: float
    distributed: bool

    def rank_step_s(
        self, *, blocks: int, embedding: bool, head: bool, bandwidth_s: float, shard: int
    ) -> float:
        """The step of one pipeline rank: its blocks' and root parts' measured steps, where
        ZeRO's sharding over `shard` ranks divides only the bytes-bound part.

        The measured step is split as (measured - bandwidth_s) fixed per-tensor dispatch, which
        does not shrink with the shard, plus `bandwidth_s` (bytes touched / memory bandwidth,
        the model's own optimizer term for the unsharded parameters), which does; a tied
        embedding counted in both the embedding and the head costs its one tensor twice."""
        measured = blocks * self.block_s + (self.embedding_s if embedding else 0.0)
        measured += self.head_s if head else 0.0
        return max(measured - bandwidth_s, 0.0) + bandwidth_s / shard


def optimizer_lookup(
    profile: Profile, *, device_name: str, tp: int, distributed: bool
) -> OptimizerTimes | None:
    """The profile's optimizer records for this device, tp and tensor kind, or None when any
    block kind is missing (the caller prices the step from bytes and bandwidth)."""
    recs = {
        r.block: r.step_s
        for r in profile.optimizer or ()
        if r.device_name == device_name and r.tp == tp and r.distributed == distributed
    }
    if set(recs) != set(BlockKind):
        return None
    return OptimizerTimes(
        block_s=recs[BlockKind.TRANSFORMER_BLOCK],
        embedding_s=recs[BlockKind.EMBEDDING],
        head_s=recs[BlockKind.HEAD_AND_LOSS],
        distributed=distributed,
    )


def rank_optimizer_times(
    profile: Profile, device_names: list[str | None], *, tp: int, distributed: bool
) -> OptimizerTimes | None:
    """The slowest of a pipeline rank's device types (its step ends last), or None when one of
    them has no optimizer records."""
    found = []
    for name in device_names:
        t = (
            None
            if name is None
            else optimizer_lookup(profile, device_name=name, tp=tp, distributed=distributed)
        )
        if t is None:
            return None
        found.append(t)
    return max(found, key=lambda t: t.block_s) if found else None


@dataclass(frozen=True, kw_only=True)
class DpUnitSync:
    """Measured gradient synchronisation of one FSDP unit per block kind (seconds; profile
    DpSyncRecord), for a DP group of the measured size."""

    block_s: float
    embedding_s: float
    head_s: float
    # the wrapper's own forward/backward cost per micro-batch of a block unit and of the root
    # parts (sync off; 0 in profiles without it)
    block_overhead: tuple[float, float] = (0.0, 0.0)
    embedding_overhead: tuple[float, float] = (0.0, 0.0)
    head_overhead: tuple[float, float] = (0.0, 0.0)

    def root_s(self, *, embedding: bool, head: bool) -> float:
        """The root unit (embedding and/or head of a chunk) as the sum of the parts it holds."""
        return (self.embedding_s if embedding else 0.0) + (self.head_s if head else 0.0)


def dp_sync_lookup(profile: Profile, *, device_name: str, group_size: int) -> DpUnitSync | None:
    """The profile's DP sync records for this device and group size, or None when a block kind
    is missing (the caller prices the sync from the collective fit)."""
    found = {
        r.block: r
        for r in profile.dp_sync or ()
        if r.device_name == device_name and r.group_size == group_size
    }
    if set(found) != set(BlockKind):
        return None

    def overhead(kind: BlockKind) -> tuple[float, float]:
        r = found[kind]
        return (r.forward_overhead_s or 0.0, r.backward_overhead_s or 0.0)

    return DpUnitSync(
        block_s=found[BlockKind.TRANSFORMER_BLOCK].sync_s,
        embedding_s=found[BlockKind.EMBEDDING].sync_s,
        head_s=found[BlockKind.HEAD_AND_LOSS].sync_s,
        block_overhead=overhead(BlockKind.TRANSFORMER_BLOCK),
        embedding_overhead=overhead(BlockKind.EMBEDDING),
        head_overhead=overhead(BlockKind.HEAD_AND_LOSS),
    )


def rank_dp_sync(
    profile: Profile, device_names: list[str | None], *, group_size: int
) -> DpUnitSync | None:
    """The slowest of a pipeline rank's device types, or None when one has no records."""
    found = []
    for name in device_names:
        t = (
            None
            if name is None
            else dp_sync_lookup(profile, device_name=name, group_size=group_size)
        )
        if t is None:
            return None
        found.append(t)
    return max(found, key=lambda t: t.block_s) if found else None
