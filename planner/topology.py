"""The physical topology of a cluster: GPUs, their links, and which links a group runs on.

Owns: `LinkModel` (per-GPU arrays of every link, from a profile's measured p2p matrix or from
the cluster spec's link classes), `gpu_graph` (the same links as a networkx graph, for
inspection, TP islands and explanations), and which link a group's collective or a
point-to-point hop runs on: the bottleneck of the best ring with NIC sharing, hop links.
`Slots` / `tp_slots`: the islands a TP group can occupy (the placement search's unit).
`Surrogate`: a link-level step time of a rank map, cheap enough to guide the placement search
on thousands of GPUs.
Does not own: the time formulas (planner/cost/collectives.py, the same ones the cost model
calls), the cost model (planner/cost/, which scores the final placements), choosing placements
(planner/placement.py).

Link model (the same one `ClusterSpec.link_between` states):
- two GPUs of one node talk over the node's intra link; GPUs of different nodes over the slower
  of their NICs, capped by `inter_switch_link` when the nodes sit on different switches;
- a measured p2p record (profile) replaces the class value for its pair; a pair measured in one
  direction only is used for both;
- NIC sharing (the same rule as the cost model's planner/cost/comm.py): a node's NICs are one
  shared resource (Pipette, Lee et al. 2023, models inter-server bandwidth per server the same
  way). A point-to-point hop gets min(one NIC, all the node's NICs / c) when c hops leave the
  node at once; a ring spanning nodes is multi-channel (NCCL spreads one communicator over all
  of a node's NICs) and gets all the node's NICs / c when c spanning rings leave it at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import networkx as nx
import numpy as np

from planner.cost.collectives import CollectiveOp, collective_s, message_s
from planner.parallel import ParallelConfig, Recompute
from planner.profile import Profile
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

# Fraction of datasheet peak FLOP/s the surrogate assumes (dimensionless). Narayanan et al.
# 2021 Table 1 reports 44-52 % for GPT models on A100; only ratios matter to the search.
SURROGATE_MFU = 0.5
# Weight of the mean rank end time next to the max in the surrogate objective, so moves that
# shorten non-critical ranks are not plateaus for the search (dimensionless).
TIE_WEIGHT = 1e-3
AR, AG, RS = CollectiveOp.ALL_REDUCE, CollectiveOp.ALL_GATHER, CollectiveOp.REDUCE_SCATTER


@dataclass(frozen=True, kw_only=True, eq=False)
class LinkModel:
    """Every link of a cluster as arrays indexed by global GPU id or node index.

    `p2p_bw_bytes_per_s` / `p2p_latency_s` are dense N x N matrices, present only when a
    profile gave measured pairs (the class model needs no matrix, which keeps 4096 GPUs cheap).
    """

    num_gpus: int
    gpu_node: np.ndarray
    gpu_local: np.ndarray
    gpu_switch: np.ndarray
    gpu_type: tuple[str, ...]
    node_network_bytes_per_s: np.ndarray = field(init=False)
    node_nic_bytes_per_s: np.ndarray
    node_nic_latency_s: np.ndarray
    node_nics: np.ndarray
    node_intra_bytes_per_s: np.ndarray
    node_intra_latency_s: np.ndarray
    node_gpus: np.ndarray
    inter_switch_bytes_per_s: float
    inter_switch_latency_s: float
    p2p_bw_bytes_per_s: np.ndarray | None = None
    p2p_latency_s: np.ndarray | None = None

    def __post_init__(self) -> None:
        # all NICs of a node together: what a node gives the groups that leave it at once
        network = self.node_nic_bytes_per_s * self.node_nics
        object.__setattr__(self, "node_network_bytes_per_s", network)

    @property
    def num_nodes(self) -> int:
        return len(self.node_nics)

    def link(self, gpu_a: int, gpu_b: int) -> tuple[float, float]:
        """(bandwidth_bytes_per_s, latency_s) of one pair, without sharing."""
        bw, lat = self.pair_links(np.array([gpu_a]), np.array([gpu_b]))
        return float(bw[0]), float(lat[0])

    def pair_links(
        self, a: np.ndarray, b: np.ndarray, shared: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bandwidth and latency of the hops a[i] -> b[i] (arrays of GPU ids).

        `shared`: all hops run at once, so a node with c crossing senders (receivers) gives
        each min(one NIC, all its NICs / c); a measured pair is capped the same way (it was
        measured alone).
        """
        na, nb = self.gpu_node[a], self.gpu_node[b]
        same = na == nb
        cap = np.full(len(na), np.inf)
        if shared:
            net = self.node_network_bytes_per_s
            out_count = np.bincount(na[~same], minlength=self.num_nodes)
            in_count = np.bincount(nb[~same], minlength=self.num_nodes)
            cap = np.minimum(
                net[na] / np.maximum(out_count[na], 1), net[nb] / np.maximum(in_count[nb], 1)
            )
        # the slower NIC's class, or the spine's when it is slower still (link_between's rule)
        nic_a, nic_b = self.node_nic_bytes_per_s[na], self.node_nic_bytes_per_s[nb]
        a_slower = nic_a <= nic_b
        cross_bw = np.where(a_slower, nic_a, nic_b)
        lat_cross = np.where(a_slower, self.node_nic_latency_s[na], self.node_nic_latency_s[nb])
        if np.isfinite(self.inter_switch_bytes_per_s):
            spine = (self.gpu_switch[a] != self.gpu_switch[b]) & (
                self.inter_switch_bytes_per_s < cross_bw
            )
            cross_bw = np.where(spine, self.inter_switch_bytes_per_s, cross_bw)
            lat_cross = np.where(spine, self.inter_switch_latency_s, lat_cross)
        cross_bw = np.minimum(cross_bw, cap)
        bw = np.where(same, self.node_intra_bytes_per_s[na], cross_bw)
        lat = np.where(same, self.node_intra_latency_s[na], lat_cross)
        if self.p2p_bw_bytes_per_s is not None and self.p2p_latency_s is not None:
            measured = self.p2p_bw_bytes_per_s[a, b]
            known = ~np.isnan(measured)
            bw = np.where(
                known, np.minimum(np.where(known, measured, 0.0), np.where(same, np.inf, cap)), bw
            )
            lat = np.where(known, self.p2p_latency_s[a, b], lat)
        return bw, lat

    def ring_links(self, groups: np.ndarray, shared: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Bottleneck (bandwidth, latency) of the best ring over each row of `groups` (G x n).

        The ring visits each row's GPUs in id order, i.e. node by node (ids are node-major), so
        it leaves each node it spans once: the fewest crossings any ring can make. A ring is
        multi-channel (NCCL spreads one communicator over all NICs of a node), so a node gives
        a spanning ring all its NICs, divided by c when `shared` and c spanning rows (one mesh
        axis's collectives, which run at once) leave it. With the class model the slowest hop
        is then the slowest such node share (capped by the intra links, and by the spine when
        the row spans switches), which no ring order can beat. With a measured matrix the
        id-order ring's slowest measured hop is used: a good ring, not proven best.
        """
        rows = groups.shape[0]
        if groups.shape[1] == 1:
            return np.full(rows, np.inf), np.zeros(rows)
        if self.p2p_bw_bytes_per_s is None:
            # fast path (TP groups of the search): every row inside one node
            row_nodes = self.gpu_node[groups]
            first_node = row_nodes[:, 0]
            if (row_nodes.min(axis=1) == row_nodes.max(axis=1)).all():
                return self.node_intra_bytes_per_s[first_node], self.node_intra_latency_s[
                    first_node
                ]
        g = np.sort(groups, axis=1)
        nodes = self.gpu_node[g]
        first = np.ones_like(g, dtype=bool)
        first[:, 1:] = nodes[:, 1:] != nodes[:, :-1]
        spans = first.sum(axis=1) > 1
        net = self.node_network_bytes_per_s
        count = np.bincount(nodes[first & spans[:, None]], minlength=self.num_nodes)
        per_group = net / np.maximum(count, 1) if shared else net
        intra = self.node_intra_bytes_per_s[nodes].min(axis=1)
        agg = np.where(first, per_group[nodes], np.inf).min(axis=1)
        bw = np.where(spans, np.minimum(agg, intra), intra)
        lat = np.where(
            spans,
            np.where(first, self.node_nic_latency_s[nodes], 0.0).max(axis=1),
            self.node_intra_latency_s[nodes].max(axis=1),
        )
        if np.isfinite(self.inter_switch_bytes_per_s):
            sw = self.gpu_switch[g]
            multi_switch = sw.min(axis=1) != sw.max(axis=1)
            bw = np.where(multi_switch, np.minimum(bw, self.inter_switch_bytes_per_s), bw)
            lat = np.where(multi_switch, lat + self.inter_switch_latency_s, lat)
        if self.p2p_bw_bytes_per_s is not None:
            nxt = np.roll(g, -1, axis=1)
            hop_bw, hop_lat = self.pair_links(g.ravel(), nxt.ravel())
            crossing = (self.gpu_node[nxt] != nodes).ravel()
            hop_bw = np.where(crossing, np.minimum(hop_bw, per_group[nodes].ravel()), hop_bw)
            bw = hop_bw.reshape(g.shape).min(axis=1)
            lat = hop_lat.reshape(g.shape).max(axis=1)
        return bw, lat


def link_model(cluster: ClusterSpec, profile: Profile | None = None) -> LinkModel:
    """The LinkModel of `cluster`, with `profile`'s measured p2p pairs when given."""
    nodes, locals_, switches, types = [], [], [], []
    for i, node in enumerate(cluster.nodes):
        nodes += [i] * node.gpus
        locals_ += list(range(node.gpus))
        switches += [node.switch] * node.gpus
        types += [node.gpu.name] * node.gpus
    isw = cluster.inter_switch_link
    p2p_bw = p2p_lat = None
    if profile is not None and profile.p2p:
        n = cluster.num_gpus
        p2p_bw = np.full((n, n), np.nan)
        p2p_lat = np.full((n, n), np.nan)
        for (src, dst), rec in sorted(profile.p2p_matrix().items()):
            if 0 <= src < n and 0 <= dst < n:
                for a, b in ((src, dst), (dst, src)):
                    if np.isnan(p2p_bw[a, b]) or (a, b) == (src, dst):
                        p2p_bw[a, b] = rec.bandwidth_bytes_per_s
                        p2p_lat[a, b] = rec.latency_s
    return LinkModel(
        num_gpus=cluster.num_gpus,
        gpu_node=np.array(nodes, dtype=np.int64),
        gpu_local=np.array(locals_, dtype=np.int64),
        gpu_switch=np.array(switches, dtype=np.int64),
        gpu_type=tuple(types),
        node_nic_bytes_per_s=np.array([n.nic.bandwidth_bytes_per_s for n in cluster.nodes]),
        node_nic_latency_s=np.array([n.nic.latency_s for n in cluster.nodes]),
        node_nics=np.array([n.nics for n in cluster.nodes], dtype=np.float64),
        node_intra_bytes_per_s=np.array(
            [n.intra_link.bandwidth_bytes_per_s for n in cluster.nodes]
        ),
        node_intra_latency_s=np.array([n.intra_link.latency_s for n in cluster.nodes]),
        node_gpus=np.array([n.gpus for n in cluster.nodes], dtype=np.int64),
        inter_switch_bytes_per_s=isw.bandwidth_bytes_per_s if isw else float("inf"),
        inter_switch_latency_s=isw.latency_s if isw else 0.0,
        p2p_bw_bytes_per_s=p2p_bw,
        p2p_latency_s=p2p_lat,
    )


def gpu_graph(
    cluster: ClusterSpec, profile: Profile | None = None, gpus: list[int] | None = None
) -> nx.Graph:
    """GPUs as nodes (attributes `node`, `local`, `gpu_type`, `switch`), every pair an edge
    with `bandwidth_bytes_per_s` and `latency_s` (unshared).

    A complete graph has N(N-1)/2 edges, so pass `gpus` to build a subgraph on large clusters.
    """
    links = link_model(cluster, profile)
    ids = list(range(cluster.num_gpus)) if gpus is None else sorted(gpus)
    graph = nx.Graph(cluster=cluster.name)
    for g in ids:
        graph.add_node(
            g,
            node=int(links.gpu_node[g]),
            local=int(links.gpu_local[g]),
            gpu_type=links.gpu_type[g],
            switch=int(links.gpu_switch[g]),
        )
    if len(ids) > 1:
        pairs = np.array(list(combinations(ids, 2)), dtype=np.int64)
        bw, lat = links.pair_links(pairs[:, 0], pairs[:, 1])
        graph.add_edges_from(
            (int(a), int(b), {"bandwidth_bytes_per_s": float(w), "latency_s": float(t)})
            for (a, b), w, t in zip(pairs, bw, lat, strict=True)
        )
    return graph


def tp_islands(graph: nx.Graph, gpus: list[int], tp: int) -> list[tuple[int, ...]]:
    """Partition one node's `gpus` into groups of `tp` with fast internal links.

    Greedy: seed each group with the lowest free id, then add the free GPU whose slowest link
    to the group is fastest (ties to the lowest id). With uniform intra links (the class model)
    this gives contiguous local ranges, the default order's TP groups.
    """
    free = sorted(gpus)
    out: list[tuple[int, ...]] = []
    while free:
        group = [free.pop(0)]
        while len(group) < tp:
            best = max(
                free,
                key=lambda g: (
                    min(graph.edges[g, h]["bandwidth_bytes_per_s"] for h in group),
                    -g,
                ),
            )
            free.remove(best)
            group.append(best)
        out.append(tuple(sorted(group)))
    return out


@dataclass(frozen=True, kw_only=True)
class Slots:
    """Slot s holds GPUs `gpus[s]`; `unit[s]` is the node (or node block) it lies in, and units
    with equal `unit_class` are interchangeable."""

    gpus: np.ndarray
    unit: np.ndarray
    unit_class: tuple[object, ...]

    def rank_map(self, slot_group: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        out = np.empty_like(self.gpus)
        out[slot_group] = self.gpus
        return out.reshape(shape)


def tp_slots(cluster: ClusterSpec, config: ParallelConfig, profile: Profile | None) -> Slots | None:
    """The islands that can hold one TP group each: `tp_islands` of every node when tp divides
    every node's GPU count, blocks of tp/g whole nodes (same switch first) when tp is a multiple
    of a uniform node size g, else None (no TP-respecting tiling; keep the default order)."""
    tp, counts = config.tp, [n.gpus for n in cluster.nodes]
    gpus: list[list[int]] = []
    unit: list[int] = []
    classes: list[object] = []
    if all(c % tp == 0 for c in counts):
        measured = profile is not None and bool(profile.p2p)
        for i, node in enumerate(cluster.nodes):
            ids = list(cluster.gpu_ids_of_node(i))
            if measured and tp > 1:
                groups = tp_islands(gpu_graph(cluster, profile, ids), ids, tp)
            else:
                groups = [tuple(ids[k : k + tp]) for k in range(0, len(ids), tp)]
            gpus += [list(g) for g in groups]
            unit += [i] * len(groups)
            classes.append(i if measured else node)
    elif len(set(counts)) == 1 and tp % counts[0] == 0:
        # blocks of nodes on one switch, slow NICs together, so no TP ring crosses the spine
        # or a slow NIC it need not (host order often interleaves racks)
        per = tp // counts[0]
        order = sorted(
            range(len(counts)),
            key=lambda i: (cluster.nodes[i].switch, -cluster.nodes[i].network_bytes_per_s, i),
        )
        for s in range(len(counts) // per):
            block = order[s * per : (s + 1) * per]
            gpus.append([g for i in block for g in cluster.gpu_ids_of_node(i)])
            unit.append(s)
            classes.append(tuple(cluster.nodes[i] for i in block))
        if profile is not None and profile.p2p:
            classes = list(range(len(gpus)))
    else:
        return None
    return Slots(
        gpus=np.array(gpus, dtype=np.int64), unit=np.array(unit), unit_class=tuple(classes)
    )


class Surrogate:
    """Link-level step time of a (pp, dp, tp) array of GPU ids: a guide, not the cost model.

    Per micro-batch, stage (p, d) costs its compute (model FLOPs at SURROGATE_MFU of its
    slowest GPU's peak; per block 2 FLOPs per parameter per token plus 4*B*s^2*q_dim attention,
    Narayanan et al. 2021 Eq. 3; backward twice the forward, full recompute one more forward),
    its TP all-reduces (2 forward + 2 backward per block, Shoeybi et al. 2019 Sec. 3) on its
    ring, and its p2p sends to both neighbours. A replica's 1F1B makespan is
    (m - 1) * max + sum of its stage times (Narayanan et al. 2021 Sec. 2.2); pipeline rank p
    finishes the backward chain sum_{q<p} bwd_q before rank 0 does. Each rank then pays its
    exposed gradient sync on its worst DP ring: all-reduce (ZeRO-1+: reduce-scatter) minus one
    micro-batch's backward it overlaps (Li et al. 2020, PyTorch DDP Sec. 3.2), plus the
    parameter all-gather for ZeRO-1/2, or for ZeRO-3 the per-micro-batch gathers beyond the
    compute that hides them (Rajbhandari et al. 2020 Sec. 5). Each axis's groups share NICs.
    Collectives and hops are timed by planner/cost/collectives.py, as in the cost model (an
    all-reduce takes NCCL's tree when that is faster than the ring).
    """

    def __init__(
        self,
        model: ModelSpec,
        training: TrainingSpec,
        cluster: ClusterSpec,
        config: ParallelConfig,
        links: LinkModel,
    ):
        pp, tp = config.pp, config.tp
        self.config, self.links, self.v = config, links, config.virtual_stages
        self.m = max(1, config.num_micro_batches(training))
        layers = np.zeros(pp)
        for k, n in enumerate(config.layers_per_chunk(model)):
            layers[k % pp] += n
        self.layers = layers
        pc = model.param_count()
        mb, s = config.micro_batch, training.seq_len
        tokens = mb * s
        attn = 4.0 * mb * s * s * model.q_dim
        block_fwd = 2.0 * pc.per_block * tokens + attn
        extra = {Recompute.FULL: block_fwd, Recompute.SELECTIVE: attn}.get(config.recompute, 0.0)
        head_fwd = 2.0 * model.vocab * model.hidden * tokens
        last = (config.num_chunks - 1) % pp
        fwd, bwd = layers * block_fwd, layers * (2 * block_fwd + extra)
        fwd[last] += head_fwd
        bwd[last] += 2 * head_fwd
        self.fwd_flops, self.bwd_flops = fwd / tp, bwd / tp
        self.work_flops = self.fwd_flops + self.bwd_flops
        peak = np.array([n.gpu.peak_flops(training.dtype) for n in cluster.nodes])
        self.gpu_speed = peak[links.gpu_node] * SURROGATE_MFU
        self.act_bytes = float(tokens * model.hidden * training.dtype.nbytes)
        full = config.recompute is Recompute.FULL
        self.tp_fwd, self.tp_bwd = 2 * layers, (4 if full else 2) * layers
        params = layers * pc.per_block
        params[0] += pc.embedding + pc.position
        params[last] += pc.head + pc.final_norm
        self.grad_bytes = params / tp * training.grad_dtype.nbytes
        self.param_bytes = params / tp * training.dtype.nbytes
        self.block_param_bytes = layers * pc.per_block / tp * training.dtype.nbytes

    def rank_ends(self, rank_map: np.ndarray) -> np.ndarray:
        """Seconds at which each pipeline rank finishes the step (before the optimizer)."""
        pp, dp, tp = rank_map.shape
        links, cfg = self.links, self.config
        speed = self.gpu_speed[rank_map].min(axis=2)
        tp_bw, tp_lat = links.ring_links(rank_map.reshape(pp * dp, tp))
        tp_s = np.asarray(collective_s(AR, tp, self.act_bytes, tp_bw, tp_lat)).reshape(pp, dp)
        bwd = self.bwd_flops[:, None] / speed + tp_s * self.tp_bwd[:, None]
        compute = self.work_flops[:, None] / speed
        stage = compute + tp_s * (self.tp_fwd + self.tp_bwd)[:, None]
        if pp > 1:
            src, dst = rank_map[:-1], rank_map[1:]
            if self.v > 1:
                src, dst = rank_map, np.roll(rank_map, -1, axis=0)
            bw, lat = links.pair_links(src.ravel(), dst.ravel(), shared=True)
            hop = np.asarray(message_s(self.act_bytes, bw, lat))
            hop = hop.reshape(src.shape).max(axis=2) * self.v
            sends = np.zeros((pp, dp))
            sends[: hop.shape[0]] += hop
            sends[1 : hop.shape[0] + 1] += hop[: pp - 1]
            if self.v > 1:
                sends[0] += hop[-1]
            stage = stage + sends
        makespan = (self.m - 1) * stage.max(axis=0) + stage.sum(axis=0) / self.v
        chain = np.vstack([np.zeros((1, dp)), np.cumsum(bwd, axis=0)[:-1]])
        ends = (makespan[None, :] - chain).max(axis=1)
        if dp > 1:
            bw, lat = links.ring_links(rank_map.transpose(0, 2, 1).reshape(pp * tp, dp))
            bw, lat = bw.reshape(pp, tp).min(axis=1), lat.reshape(pp, tp).max(axis=1)
            sync = collective_s(AR if cfg.zero == 0 else RS, dp, self.grad_bytes, bw, lat)
            exposed = np.maximum(0.0, sync - bwd.max(axis=1))
            if cfg.zero in (1, 2):
                exposed = exposed + collective_s(AG, dp, self.param_bytes, bw, lat)
            elif cfg.zero == 3:
                gather = collective_s(AG, dp, self.block_param_bytes, bw, lat)
                hidden = compute.min(axis=1)
                exposed = exposed + self.m * np.maximum(0.0, 2 * gather - hidden)
            ends = ends + exposed
        return ends

    def step_s(self, rank_map: np.ndarray) -> float:
        return float(self.rank_ends(rank_map).max())

    def objective(self, rank_map: np.ndarray) -> float:
        ends = self.rank_ends(rank_map)
        return float(ends.max() + TIE_WEIGHT * ends.mean())
