"""Which link each group of a configuration's mesh runs on, and its collective times.

Owns: `ClusterArrays` (the (pp, dp, cp, tp) mesh as node ids, the slowest link of every TP / CP /
DP / PP group with NIC sharing when several groups of the same axis leave a node at once, and the
pipeline-boundary p2p time), `GroupLink` (that link as one record), `ring_time_s` (a collective
on one GroupLink) and the lookup of measured collective fits / p2p matrix from a Profile.
Does not own: the time formulas (planner/cost/collectives.py: ring and tree all-reduce,
all-gather, reduce-scatter, one message; this module only chooses the link they are given),
which collectives a block issues (rankcosts.py, estimate.py) or their overlap (dp_sync.py).

All per-group work is vectorised over the (pp, dp, tp) mesh array of node ids, so the cost is
O(world size) numpy work per call, never O(world size^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost.collectives import CollectiveOp, collective_s, message_s
from planner.parallel import MeshAxis, ParallelConfig
from planner.profile import Profile
from planner.specs import ClusterSpec


@dataclass(frozen=True, kw_only=True)
class GroupLink:
    """The slowest link a collective of one group sees: attained bandwidth and per-step latency."""

    size: int
    bandwidth_bytes_per_s: float
    latency_s: float


def ring_time_s(op: CollectiveOp, nbytes: float, link: GroupLink) -> float:
    """`op` of `nbytes` on `link`'s group: `collectives.collective_s` (ring, and for all-reduce
    the faster of ring and NCCL's tree) on the group's slowest link.

    The latency term is paid at any size, also for a 0-byte message: a collective issued per
    FSDP unit pays it once per unit (dp_sync.py), whatever the unit holds.
    """
    return float(collective_s(op, link.size, nbytes, link.bandwidth_bytes_per_s, link.latency_s))


class ClusterArrays:
    """Per-node link numbers and the (pp, dp, tp) array of node ids for one config (built once
    per estimate call)."""

    def __init__(
        self,
        cluster: ClusterSpec,
        config: ParallelConfig,
        intra_efficiency: float,
        network_efficiency: float | None = None,
    ):
        """`intra_efficiency` scales the intra-node links, `network_efficiency` (default the
        same) the NICs and inter-switch links: the fraction of nominal bandwidth NCCL attains
        per link class (analytic.py INTRA_LINK_EFFICIENCY / NETWORK_EFFICIENCY)."""
        nodes = cluster.nodes
        self.cluster = cluster
        self.eff = intra_efficiency
        self.net_eff = intra_efficiency if network_efficiency is None else network_efficiency
        # one row of link numbers per distinct node object (presets repeat the same NodeSpec),
        # so large clusters cost one Python step per distinct node, the rest is numpy
        distinct: dict[int, int] = {}
        rows: list[tuple[float, ...]] = []
        kind = np.empty(len(nodes), dtype=np.int64)
        for i, n in enumerate(nodes):
            k = distinct.get(id(n))
            if k is None:
                k = distinct[id(n)] = len(rows)
                rows.append(
                    (
                        n.gpus,
                        n.switch,
                        n.network_bytes_per_s,
                        n.nic.bandwidth_bytes_per_s,
                        n.nic.latency_s,
                        n.intra_link.bandwidth_bytes_per_s,
                        n.intra_link.latency_s,
                    )
                )
            kind[i] = k
        table = np.asarray(rows, dtype=float)[kind]
        counts = table[:, 0].astype(np.int64)
        node_of_gpu = np.repeat(np.arange(len(nodes)), counts)
        placement = np.asarray(config.placement())
        # (pp, dp*cp, tp): the middle axis is the gradient-sync group (dp and cp together,
        # planner/parallel.py `dp_cp`); `cp` splits it again for the CP groups
        self.cp = config.cp
        self.gpu = placement.reshape(config.pp, config.dp * config.cp, config.tp)
        self.node = node_of_gpu[self.gpu]
        self.switch = table[:, 1].astype(np.int64)
        self.net_bw = table[:, 2] * self.net_eff
        self.nic_bw = table[:, 3] * self.net_eff
        self.nic_lat = table[:, 4]
        self.intra_bw = table[:, 5] * self.eff
        self.intra_lat = table[:, 6]
        isl = cluster.inter_switch_link
        self.isl_bw = isl.bandwidth_bytes_per_s * self.net_eff if isl else np.inf
        self.isl_lat = isl.latency_s if isl else 0.0

    def cp_groups(self, pp_rank: int) -> np.ndarray:
        """Rows of GPU ids, one per CP group of pipeline rank `pp_rank`."""
        _, _, tp = self.gpu.shape
        g = self.gpu[pp_rank].reshape(-1, self.cp, tp)
        return g.transpose(0, 2, 1).reshape(-1, self.cp)

    def axis_links(self, axis: MeshAxis) -> tuple[GroupLink, ...]:
        """Worst group link of `axis`, per pipeline rank (all groups of an axis run at once).

        A group inside one node runs at that node's intra link. A group spanning nodes runs
        at min(intra links of its nodes, each node's NIC bandwidth / number of this axis's
        spanning groups leaving that node), and at most the inter-switch link if it spans
        switches; its latency is the NIC's.
        """
        arr = self.node  # (pp, dp*cp, tp)
        if axis is MeshAxis.TP:
            groups = arr
        elif axis is MeshAxis.DP:  # the gradient-sync group: all dp*cp ranks of a (pp, tp)
            groups = arr.transpose(0, 2, 1)
        elif axis is MeshAxis.CP:
            pp, _, tp = arr.shape
            groups = arr.reshape(pp, -1, self.cp, tp).transpose(0, 1, 3, 2).reshape(pp, -1, self.cp)
        else:
            groups = arr.transpose(1, 2, 0)
        shape = groups.shape
        g = np.sort(groups.reshape(-1, shape[-1]), axis=1)
        size = shape[-1]
        first = np.ones_like(g, dtype=bool)
        first[:, 1:] = g[:, 1:] != g[:, :-1]
        spans = first.sum(axis=1) > 1
        if not spans.any():
            # every group inside one node: its intra link (NVSwitch-class, not shared)
            bw = self.intra_bw[g[:, 0]]
            lat = self.intra_lat[g[:, 0]]
            return self._per_rank(axis, size, bw, lat, shape[0])
        crossing = np.bincount(g[first & spans[:, None]], minlength=len(self.net_bw)).astype(float)
        share = self.net_bw / np.maximum(crossing, 1.0)
        big = np.inf
        inter_bw = np.where(first, share[g], big).min(axis=1)
        intra_bw = np.where(first, self.intra_bw[g], big).min(axis=1)
        sw = self.switch[g]
        multi_switch = (sw.max(axis=1) != sw.min(axis=1)) if len(self.switch) else spans
        bw = np.where(spans, np.minimum(inter_bw, intra_bw), intra_bw)
        bw = np.where(multi_switch, np.minimum(bw, self.isl_bw), bw)
        lat = np.where(
            spans,
            np.where(first, self.nic_lat[g], 0.0).max(axis=1)
            + np.where(multi_switch, self.isl_lat, 0.0),
            np.where(first, self.intra_lat[g], 0.0).max(axis=1),
        )
        return self._per_rank(axis, size, bw, lat, shape[0])

    def _per_rank(
        self, axis: MeshAxis, size: int, bw: np.ndarray, lat: np.ndarray, lead: int
    ) -> tuple[GroupLink, ...]:
        """Reduce per-group links to the worst group of each pipeline rank."""
        if axis is MeshAxis.PP:
            # one group per (dp, tp); every pipeline rank takes part in all of them
            worst = GroupLink(
                size=size, bandwidth_bytes_per_s=float(bw.min()), latency_s=float(lat.max())
            )
            return (worst,) * self.node.shape[0]
        per_rank_bw = bw.reshape(lead, -1).min(axis=1)
        per_rank_lat = lat.reshape(lead, -1).max(axis=1)
        return tuple(
            GroupLink(size=size, bandwidth_bytes_per_s=float(b), latency_s=float(a))
            for b, a in zip(per_rank_bw, per_rank_lat, strict=True)
        )

    def boundary_p2p_s(
        self, src_rank: int, dst_rank: int, nbytes: float, profile: Profile | None
    ) -> float:
        """Time of the slowest of the dp*tp simultaneous sends from pipeline rank src to dst.

        Pairs inside a node use the intra link; pairs crossing nodes get min(one NIC, the
        node's NIC bandwidth / number of crossing pairs on that node) at both ends. A measured
        p2p matrix entry, when the profile has one for the pair, replaces the class figure.
        """
        src_gpu = self.gpu[src_rank].ravel()
        dst_gpu = self.gpu[dst_rank].ravel()
        a, b = self.node[src_rank].ravel(), self.node[dst_rank].ravel()
        cross = a != b
        n_nodes = len(self.net_bw)
        out_count = np.bincount(a[cross], minlength=n_nodes).astype(float)
        in_count = np.bincount(b[cross], minlength=n_nodes).astype(float)
        cross_bw = np.minimum.reduce(
            [
                self.nic_bw[a],
                self.nic_bw[b],
                self.net_bw[a] / np.maximum(out_count[a], 1.0),
                self.net_bw[b] / np.maximum(in_count[b], 1.0),
            ]
        )
        cross_bw = np.where(
            self.switch[a] != self.switch[b], np.minimum(cross_bw, self.isl_bw), cross_bw
        )
        bw = np.where(cross, cross_bw, np.minimum(self.intra_bw[a], self.intra_bw[b]))
        lat = np.where(cross, np.maximum(self.nic_lat[a], self.nic_lat[b]), self.intra_lat[a])
        times = np.asarray(message_s(nbytes, bw, lat))
        if profile is not None and profile.p2p:
            matrix = profile.p2p_matrix()
            for i, (s, d) in enumerate(zip(src_gpu.tolist(), dst_gpu.tolist(), strict=True)):
                rec = matrix.get((s, d))
                if rec is not None:
                    times[i] = message_s(nbytes, rec.bandwidth_bytes_per_s, rec.latency_s)
        return float(times.max())


def measured_collective_s(
    profile: Profile | None, op: CollectiveOp, groups: np.ndarray, nbytes: float
) -> float | None:
    """Worst measured time over `groups` (rows of GPU ids) from the profile's alpha-beta fits.

    An exact group match is used first; otherwise a record of the same op and group size whose
    group spans nodes the same way (same number of distinct hosts is not known here, so the
    slowest record of that size is taken — conservative). None when nothing of that op and size
    was measured.
    """
    if profile is None or not profile.collectives:
        return None
    recs = [r for r in profile.collectives if r.op is op and r.group_size == groups.shape[1]]
    if not recs:
        return None
    exact = {tuple(sorted(r.gpu_ids)): r for r in recs}
    worst = 0.0
    fallback = max(r.time_s(nbytes) for r in recs)
    for row in np.sort(groups, axis=1).tolist():
        rec = exact.get(tuple(row))
        worst = max(worst, rec.time_s(nbytes) if rec is not None else fallback)
    return worst
