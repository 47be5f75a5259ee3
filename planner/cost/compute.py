"""Block times and activation bytes from a measured Profile.

Owns: looking up ComputeRecords by (block, device_name, tp, micro_batch, seq_len, recompute);
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


def node_device_names(profile: Profile, cluster: ClusterSpec) -> tuple[str | None, ...]:
    """The profile device name of each cluster node: from the profile's GPU list by global id
    when that device is of the node's GPU type, else the compute records' device of that type
    (planner/profile_match.py), else None (not measured): a mixed cluster never borrows one
    type's block times for another."""
    by_id = {g.gpu_id: g.device_name for g in profile.gpus}
    names = {r.device_name for r in profile.compute}
    kind = profile.meta.device_kind
    out = []
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
        return MeasuredBlock(forward_s=f, backward_s=b, activation_bytes=act, note=note)
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
    )
