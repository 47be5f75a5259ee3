"""Placement of mesh ranks on GPUs: which GPU holds mesh coordinate (pp, dp, tp).

Owns: `place` (the planner's entry point), `PlacementResult`, `validate_rank_map`, the search
(exact enumeration on small clusters, greedy construction + simulated annealing on large
ones) and the sentences that say why a placement is faster. Does not own: the cost model
(planner/cost/, the objective), the link model, TP slots and the step-time surrogate that
guides the search (planner/topology.py), re-splitting layers for new stage speeds (the ILP;
`stage_speeds_flops` gives it the speeds).

Search space. A *slot* is a set of `tp` GPUs that can hold one tensor-parallel group: a
fast island inside a node (tp <= GPUs per node), or `tp / g` whole nodes of one switch (tp > g;
which nodes form a block is fixed by `tp_slots`, not searched). A placement assigns the pp*dp TP groups (p, d) to slots;
within a slot, tp rank t takes the slot's t-th GPU. Moves swap two slots, two whole nodes, or
two whole pipeline ranks (Pipette, Lee et al. 2023, anneals server permutations; we anneal at
TP-group granularity and re-score the best few with the cost model).

Exact search (<= EXACT_MAX_GPUS GPUs): with the class link model the cost depends only on which
node each TP group sits on (intra-node links are uniform; tested against the cost model), is
invariant under relabelling the data-parallel index d, and under permuting identical nodes. So
it enumerates multisets of replica paths (the node of each pipeline rank of one replica),
deduplicated under identical-node relabelling, and scores every one with the objective,
instead of permuting all GPUs. With a measured profile, nodes are not merged as identical, but
the TP islands inside a node are fixed by `tp_islands`.

Objective. Candidates are scored by `planner.cost.estimate.estimate` (step_time_s) when that
module exists, else by the surrogate; `PlacementResult.objective` says which. The default rank
order is always a candidate, so the result is never predicted slower than it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from planner.errors import ConfigError
from planner.parallel import ParallelConfig
from planner.profile import Profile
from planner.specs import ClusterSpec, Dtype, ModelSpec, TrainingSpec
from planner.topology import LinkModel, Slots, Surrogate, link_model, tp_slots

log = logging.getLogger(__name__)

# Clusters up to this many GPUs are searched exactly (the "small clusters").
EXACT_MAX_GPUS = 16
# Canonical placements the exact search scores with the cost model, and replica-path multisets
# it enumerates before deduplication, before it gives up for local search (counts).
EXACT_MAX_STATES = 3000
EXACT_MAX_PATHS = 20000
# Candidates from the local search re-scored by the cost model (count).
FINALISTS = 6
# Annealing moves on the surrogate per slot, and their cap; then moves of a low-temperature
# polish on the cost model itself (counts; deterministic for a seed, the time budget is only a
# safety stop that logs when it cuts the search).
# Each cap also shrinks with world size (GPU-moves: one move re-prices every GPU) so that 4096
# GPUs stay within a few seconds on 2 cores.
ANNEAL_MOVES_PER_SLOT = 40
ANNEAL_MAX_MOVES = 2000
ANNEAL_GPU_MOVES = 2_500_000
POLISH_MOVES_PER_SLOT = 8
POLISH_MAX_MOVES = 300
POLISH_GPU_MOVES = 150_000
# Passes of the pipeline-rank swap hill-climb on the best construction (count).
STAGE_ORDER_ROUNDS = 3
# A candidate must beat the default by this relative margin to replace it: a negligible gain
# is not worth a rank order the user did not ask for (dimensionless).
IMPROVEMENT_EPS = 1e-4


@dataclass(frozen=True, kw_only=True)
class PlacementResult:
    """The chosen rank map and its predicted gain over the default order (identity)."""

    rank_to_gpu: tuple[int, ...]
    step_time_s: float
    default_step_time_s: float
    speedup: float
    method: str
    explanation: tuple[str, ...]
    objective: str = "cost model"


def validate_rank_map(
    cluster: ClusterSpec, config: ParallelConfig, rank_to_gpu: tuple[int, ...] | list[int]
) -> None:
    """Raise ConfigError unless `rank_to_gpu` uses every GPU once, matches the mesh and keeps
    every TP group inside one node (a group may span nodes only when tp exceeds their size)."""
    n, world = cluster.num_gpus, config.world_size
    ranks = list(rank_to_gpu)
    if world != n:
        raise ConfigError(f"mesh {config.degrees_text()} = {world} != {n} GPUs")
    if len(ranks) != world:
        raise ConfigError(f"rank_to_gpu has {len(ranks)} entries; the mesh has {world} ranks")
    bad = [g for g in ranks if isinstance(g, bool) or not isinstance(g, (int, np.integer))]
    if bad:
        raise ConfigError(f"rank_to_gpu entries must be integer GPU ids, got {bad[0]!r}")
    out = sorted({g for g in ranks if not 0 <= g < n})
    if out:
        raise ConfigError(f"rank_to_gpu names GPU ids {out[:5]} outside 0..{n - 1}")
    seen: dict[int, int] = {}
    for r, g in enumerate(ranks):
        if g in seen:
            raise ConfigError(f"GPU {g} is given to mesh ranks {seen[g]} and {r}")
        seen[g] = r
    node_of = np.repeat(np.arange(len(cluster.nodes)), [n.gpus for n in cluster.nodes])
    groups = node_of[np.asarray(ranks)].reshape(config.pp * config.dp * config.cp, config.tp)
    for g in np.flatnonzero(groups.min(axis=1) != groups.max(axis=1)).tolist():
        p, rest = divmod(g, config.dp * config.cp)
        d, c = divmod(rest, config.cp)
        group = [ranks[config.mesh_rank(p, d, c, t)] for t in range(config.tp)]
        nodes = sorted({int(node_of[x]) for x in group})
        small = [i for i in nodes if config.tp <= cluster.nodes[i].gpus]
        if small:
            where = f"pp={p}, dp={d}" + (f", cp={c}" if config.cp > 1 else "")
            raise ConfigError(
                f"TP group ({where}) on GPUs {group} spans nodes {nodes}; tp="
                f"{config.tp} fits in node {small[0]} ({cluster.nodes[small[0]].gpus} GPUs), "
                "so a TP group must stay inside one node"
            )


def stage_speeds_flops(
    cluster: ClusterSpec, config: ParallelConfig, dtype: Dtype = Dtype.BF16
) -> tuple[float, ...]:
    """Per pipeline rank, the peak FLOP/s of its slowest GPU under `config.rank_to_gpu`: the
    stage speeds the split ILP should re-balance layers for after placement."""
    gpus = np.asarray(config.placement()).reshape(config.pp, -1)
    return tuple(min(cluster.gpu_of(int(g)).peak_flops(dtype) for g in row) for row in gpus)


def _greedy_candidates(slots: Slots, sur: Surrogate, links: LinkModel) -> list[np.ndarray]:
    """Constructions: fast slots first within a switch (so DP rings stay on a switch and the
    slow-NIC nodes share the fewest rings), heaviest pipeline ranks on the fastest slots, in
    stage-major (DP neighbours together) and replica-major (PP neighbours together) order."""
    cfg = sur.config
    pp, dp = cfg.pp, cfg.dp
    first = slots.gpus[:, 0]
    speed = sur.gpu_speed[slots.gpus].min(axis=1)
    net = links.node_network_bytes_per_s[links.gpu_node[slots.gpus]].min(axis=1)
    switch = links.gpu_switch[first]
    heavy = np.argsort(-sur.work_flops, kind="stable")
    out = []
    for keys in ((first, -net, -speed, switch), (first, -net, switch, -speed)):
        order = np.lexsort(keys)
        stage_major = np.empty(len(order), dtype=np.int64)
        for block, p in enumerate(heavy):
            stage_major[order[block * dp : (block + 1) * dp]] = p * dp + np.arange(dp)
        out.append(stage_major)
        replica_major = np.empty(len(order), dtype=np.int64)
        for i, s in enumerate(order):
            d, k = divmod(i, pp)
            replica_major[s] = heavy[k] * dp + d
        out.append(replica_major)
    return out


def _best_stage_order(
    sg: np.ndarray, score: Callable[[np.ndarray], float], cfg: ParallelConfig, deadline: float
) -> np.ndarray:
    """Hill-climb over swaps of whole pipeline ranks (which block of slots serves which stage),
    at most STAGE_ORDER_ROUNDS passes: puts a slow block where its traffic is cheapest, e.g. on
    a rank that finishes its backward early."""
    cur, cur_s = sg, score(sg)
    for _ in range(STAGE_ORDER_ROUNDS):
        improved = False
        for p in range(cfg.pp):
            for q in range(p + 1, cfg.pp):
                cand = _swap_stages(cur, p, q, cfg.dp)
                cand_s = score(cand)
                if cand_s < cur_s:
                    cur, cur_s, improved = cand, cand_s, True
        if not improved or time.monotonic() > deadline:
            break
    return cur


def _swap_stages(sg: np.ndarray, p: int, q: int, dp: int) -> np.ndarray:
    stage = sg // dp
    return np.where(stage == p, sg + (q - p) * dp, np.where(stage == q, sg - (q - p) * dp, sg))


def _anneal(
    slots: Slots,
    score: Callable[[np.ndarray], float],
    start: np.ndarray,
    cfg: ParallelConfig,
    rng: np.random.Generator,
    deadline: float,
    moves: int,
    hot: float = 0.02,
) -> tuple[np.ndarray, float, list[tuple[float, np.ndarray]]]:
    """Simulated annealing over slot->group maps (Kirkpatrick et al. 1983), geometric cooling
    from `hot` to 0.01 % of the start score over `moves`. Returns the best map, its score and a
    few distinct good maps seen (for re-scoring by the cost model)."""
    n = len(start)
    by_unit: dict[int, list[int]] = {}
    for s, u in enumerate(slots.unit.tolist()):
        by_unit.setdefault(u, []).append(s)
    unit_lists = [np.array(v) for v in by_unit.values()]
    same_size = [i for i, v in enumerate(unit_lists) if len(v) == len(unit_lists[0])]
    cur, cur_s = start.copy(), score(start)
    best, best_s = cur.copy(), cur_s
    seen: dict[bytes, tuple[float, np.ndarray]] = {cur.tobytes(): (cur_s, cur.copy())}
    t0, t1 = hot * cur_s, 1e-4 * cur_s
    for it in range(moves):
        if it % 64 == 0 and time.monotonic() > deadline:
            log.info("placement: time budget cut annealing at %d of %d moves", it, moves)
            break
        temp = t0 * (t1 / t0) ** (it / max(1, moves - 1))
        cand = cur.copy()
        kind = rng.random()
        if kind < 0.2 and cfg.pp > 1:
            p, q = rng.choice(cfg.pp, size=2, replace=False)
            cand = _swap_stages(cur, int(p), int(q), cfg.dp)
        elif kind < 0.45 and len(same_size) > 1 and len(unit_lists[0]) > 1:
            a, b = rng.choice(same_size, size=2, replace=False)
            sa, sb = unit_lists[a], unit_lists[b]
            cand[sa], cand[sb] = cur[sb], cur[sa]
        elif n > 1:
            i, j = rng.choice(n, size=2, replace=False)
            cand[i], cand[j] = cur[j], cur[i]
        cand_s = score(cand)
        if cand_s <= cur_s or rng.random() < math.exp(-(cand_s - cur_s) / max(temp, 1e-300)):
            cur, cur_s = cand, cand_s
            key = cur.tobytes()
            if key not in seen:
                seen[key] = (cur_s, cur.copy())
            if cur_s < best_s:
                best, best_s = cur.copy(), cur_s
    top = sorted(seen.values(), key=lambda x: (x[0], x[1].tobytes()))[:FINALISTS]
    return best, best_s, top


def _paths(cap: list[int], pp: int, dp: int, limit: int) -> Iterator[list[tuple[int, ...]]] | None:
    """Multisets of dp replica paths (unit of each pipeline rank) within unit capacities, in
    non-decreasing order (the d-relabelling symmetry). None when more than `limit` exist."""
    units = len(cap)
    found: list[list[tuple[int, ...]]] = []

    def rec(d: int, prev: tuple[int, ...], left: list[int], acc: list[tuple[int, ...]]) -> bool:
        if d == dp:
            found.append(list(acc))
            return len(found) <= limit
        path: list[int] = []

        def walk(p: int) -> bool:
            if p == pp:
                t = tuple(path)
                if t < prev:
                    return True
                acc.append(t)
                ok = rec(d + 1, t, left, acc)
                acc.pop()
                return ok
            lo = prev[p] if tuple(path) == prev[:p] else 0
            for u in range(lo, units):
                if left[u]:
                    left[u] -= 1
                    path.append(u)
                    ok = walk(p + 1)
                    path.pop()
                    left[u] += 1
                    if not ok:
                        return False
            return True

        return walk(0)

    if not rec(0, (0,) * pp, list(cap), []):
        return None
    return iter(found)


def _exact_states(slots: Slots, cfg: ParallelConfig) -> list[np.ndarray] | None:
    """Every placement up to d-relabelling and identical-unit permutation, as slot->group maps."""
    units = sorted(set(slots.unit.tolist()))
    unit_slots = {u: [s for s in range(len(slots.unit)) if slots.unit[s] == u] for u in units}
    cap = [len(unit_slots[u]) for u in units]
    paths = _paths(cap, cfg.pp, cfg.dp, EXACT_MAX_PATHS)
    if paths is None:
        return None
    members: dict[object, list[int]] = {}
    for i, u in enumerate(units):
        members.setdefault(slots.unit_class[u], []).append(i)
    keys: set[tuple[tuple[int, ...], ...]] = set()
    out = []
    for multiset in paths:
        relabel: dict[int, int] = {}
        used = {c: 0 for c in members}
        for path in multiset:
            for u in path:
                if u not in relabel:
                    c = slots.unit_class[units[u]]
                    relabel[u] = members[c][used[c]]
                    used[c] += 1
        key = tuple(sorted(tuple(relabel[u] for u in path) for path in multiset))
        if key in keys:
            continue
        keys.add(key)
        if len(keys) > EXACT_MAX_STATES:
            return None
        sg = np.empty(len(slots.unit), dtype=np.int64)
        free = {u: list(unit_slots[units[u]]) for u in range(len(units))}
        for d, path in enumerate(multiset):
            for p, u in enumerate(path):
                sg[free[u].pop(0)] = p * cfg.dp + d
        out.append(sg)
    return out


def _cost_model(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    config: ParallelConfig,
    profile: Profile | None,
) -> Callable[[tuple[int, ...]], float] | None:
    """step_time_s of the real cost model for a rank map, or None while it does not exist."""
    try:
        from planner.cost.estimate import estimate
    except ImportError:
        return None

    def step(rank_to_gpu: tuple[int, ...]) -> float:
        cfg = replace(config, rank_to_gpu=tuple(int(g) for g in rank_to_gpu))
        return float(estimate(model, training, cluster, cfg, profile=profile).step_time_s)

    return step


def place(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    config: ParallelConfig,
    profile: Profile | None = None,
    *,
    time_budget_s: float = 5.0,
    seed: int = 0,
) -> PlacementResult:
    """The rank map that minimises the predicted step time of `config` on `cluster`.

    Exact on clusters of <= EXACT_MAX_GPUS GPUs (when the canonical placements number at most
    EXACT_MAX_STATES), else greedy construction + simulated annealing on the surrogate for at
    most `time_budget_s`, then the cost model re-scores the best few. Deterministic for `seed`
    unless the time budget cuts the search (logged). Never predicted slower than the default.
    """
    config.validate(model, training, cluster)
    if config.cp > 1:
        return _context_parallel_default(model, training, cluster, config, profile)
    start = time.monotonic()
    deadline = start + 0.8 * time_budget_s
    links = link_model(cluster, profile)
    shape = (config.pp, config.dp, config.tp)
    sur = Surrogate(model, training, cluster, config, links)
    cost = _cost_model(model, training, cluster, config, profile)
    objective = "cost model" if cost is not None else "link-level surrogate (estimate)"
    scores: dict[tuple[int, ...], float] = {}

    def final(rank_to_gpu: tuple[int, ...]) -> float:
        if rank_to_gpu not in scores:
            scores[rank_to_gpu] = (
                cost(rank_to_gpu)
                if cost is not None
                else sur.step_s(np.asarray(rank_to_gpu).reshape(shape))
            )
        return scores[rank_to_gpu]

    default = tuple(range(cluster.num_gpus))
    default_s = final(default)

    slots = tp_slots(cluster, config, profile)
    candidates: list[tuple[int, ...]] = []
    method = "default"
    if slots is not None:

        def score(sg: np.ndarray) -> float:
            return sur.objective(slots.rank_map(sg, shape))

        states = None
        # The exact search relies on relabelling the data-parallel index d being free, which
        # expert parallelism breaks (EP groups are consecutive d): local search, then the cost
        # model (which prices the all-to-all on the placed links) picks among the candidates.
        if cluster.num_gpus <= EXACT_MAX_GPUS and config.ep == 1:
            states = _exact_states(slots, config)
        if states is not None:
            method = "exact"
            candidates = [_as_map(slots, sg, shape) for sg in states]
        else:
            method = "local-search"
            greedy = _greedy_candidates(slots, sur, links)
            starts = sorted(greedy, key=lambda sg: (score(sg), sg.tobytes()))
            starts[0] = _best_stage_order(starts[0], score, config, deadline)
            rng = np.random.default_rng(seed)
            n_slots, n_gpus = len(slots.unit), cluster.num_gpus
            moves = min(
                ANNEAL_MAX_MOVES, ANNEAL_MOVES_PER_SLOT * n_slots, ANNEAL_GPU_MOVES // n_gpus
            )
            _, _, top = _anneal(slots, score, starts[0], config, rng, deadline, moves)
            finalists = [sg for _, sg in top] + starts[:2]
            if cost is not None:

                def cost_of(sg: np.ndarray) -> float:
                    return final(_as_map(slots, sg, shape))

                by_cost = min(finalists, key=lambda sg: (cost_of(sg), sg.tobytes()))
                polish = min(
                    POLISH_MAX_MOVES, POLISH_MOVES_PER_SLOT * n_slots, POLISH_GPU_MOVES // n_gpus
                )
                polished, _, _ = _anneal(
                    slots, cost_of, by_cost, config, rng, deadline, polish, hot=0.001
                )
                finalists.append(polished)
            candidates = [_as_map(slots, sg, shape) for sg in finalists]
    else:
        log.info("placement: tp=%d does not tile the nodes; keeping the default order", config.tp)

    scored = {cand: final(cand) for cand in dict.fromkeys(candidates) if cand != default}
    best, best_s = min(
        ((c, s) for c, s in scored.items()),
        key=lambda x: (x[1], x[0]),
        default=(default, default_s),
    )
    if not best_s < default_s * (1 - IMPROVEMENT_EPS):
        best, best_s = default, default_s
    if best == default and method != "exact":
        method = "default"
    validate_rank_map(cluster, config, best)
    explanation = _explain(cluster, config, links, sur, default, best, default_s, best_s, objective)
    log.info(
        "placement: %s in %.2f s, %.3f -> %.3f s",
        method,
        time.monotonic() - start,
        default_s,
        best_s,
    )
    return PlacementResult(
        rank_to_gpu=best,
        step_time_s=best_s,
        default_step_time_s=default_s,
        speedup=default_s / best_s if best_s > 0 else 1.0,
        method=method,
        explanation=explanation,
        objective=objective,
    )


def _context_parallel_default(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    config: ParallelConfig,
    profile: Profile | None,
) -> PlacementResult:
    """With cp > 1 the default order is kept: it puts each CP group on the tp * cp GPUs next
    to its TP groups (inside one node when tp * cp <= GPUs per node), the fastest links after
    TP's. The slot search above moves (pp, dp) TP groups and does not know CP groups yet."""
    cost = _cost_model(model, training, cluster, config, profile)
    default = tuple(range(cluster.num_gpus))
    step = cost(default) if cost is not None else float("nan")
    gpn = min(n.gpus for n in cluster.nodes)
    inside = config.tp * config.cp <= gpn and gpn % (config.tp * config.cp) == 0
    where = (
        f"inside one node ({config.tp * config.cp} of {gpn} GPUs)"
        if inside
        else f"across {-(-config.tp * config.cp // gpn)} nodes (tp*cp > GPUs per node)"
    )
    return PlacementResult(
        rank_to_gpu=default,
        step_time_s=step,
        default_step_time_s=step,
        speedup=1.0,
        method="default",
        explanation=(
            f"context parallelism: each CP group of {config.cp} sits next to its TP groups "
            f"{where}; the placement search does not move CP groups yet (default order kept)",
        ),
        objective="cost model" if cost is not None else "none",
    )


def _as_map(slots: Slots, sg: np.ndarray, shape: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(g) for g in slots.rank_map(sg, shape).ravel())


def _explain(
    cluster: ClusterSpec,
    config: ParallelConfig,
    links: LinkModel,
    sur: Surrogate,
    default: tuple[int, ...],
    best: tuple[int, ...],
    default_s: float,
    best_s: float,
    objective: str,
) -> tuple[str, ...]:
    """Human sentences: the gain, and which slow links the placement avoids or uses."""
    shape = (config.pp, config.dp, config.tp)
    if best == default:
        return (
            f"The default rank order is already the fastest placement found "
            f"({default_s:.3f} s per step, {objective}).",
        )
    out = [
        f"Predicted step {best_s:.3f} s vs {default_s:.3f} s in the default rank order "
        f"({default_s / best_s:.2f}x faster, {objective})."
    ]
    a, b = np.asarray(default).reshape(shape), np.asarray(best).reshape(shape)
    nic = links.node_nic_bytes_per_s
    firsts = np.concatenate([[0], np.cumsum(links.node_gpus)[:-1]])
    node_type = [links.gpu_type[int(f)] for f in firsts]
    # a NIC is "degraded" relative to the best NIC among nodes of the same GPU type
    best_nic: dict[str, float] = {}
    for t, bw in zip(node_type, nic.tolist(), strict=True):
        best_nic[t] = max(best_nic.get(t, 0.0), bw)
    peer = np.array([best_nic[t] for t in node_type])
    for node in np.flatnonzero(nic < peer).tolist():
        pct = 100 * nic[node] / peer[node]
        before, after = _dp_crossings(links, a, node), _dp_crossings(links, b, node)
        if before and not after:
            out.append(f"DP rings avoid node {node}'s NIC at {pct:.0f} % speed.")
        elif after < before:
            out.append(
                f"Fewer DP rings cross node {node}'s NIC at {pct:.0f} % speed "
                f"({before} -> {after})."
            )
        stage_a = sorted({int(p) for p in np.argwhere(links.gpu_node[a] == node)[:, 0]})
        stage_b = sorted({int(p) for p in np.argwhere(links.gpu_node[b] == node)[:, 0]})
        if stage_a != stage_b:
            out.append(
                f"Node {node} (NIC at {pct:.0f} % speed) moves from pipeline rank(s) {stage_a} "
                f"to {stage_b}, where its traffic costs less."
            )
    if np.isfinite(links.inter_switch_bytes_per_s):
        sa, sb = _switch_crossings(links, a), _switch_crossings(links, b)
        changed = [
            f"{axis} {sa[axis][0]} -> {sb[axis][0]} of {sa[axis][1]}"
            for axis in sa
            if sa[axis] != sb[axis]
        ]
        if changed:
            out.append(
                "Groups crossing the inter-switch link (default -> placed): "
                + "; ".join(changed)
                + "."
            )
    if len(set(links.gpu_type)) > 1:
        for p in range(config.pp):
            ta = sorted({links.gpu_type[g] for g in a[p].ravel()})
            tb = sorted({links.gpu_type[g] for g in b[p].ravel()})
            if ta != tb:
                out.append(
                    f"Pipeline rank {p} ({sur.layers[p]:.0f} layers) runs on {'+'.join(tb)} "
                    f"(was {'+'.join(ta)})."
                )
    return tuple(out)


def _dp_crossings(links: LinkModel, rank_map: np.ndarray, node: int) -> int:
    groups = links.gpu_node[rank_map.transpose(0, 2, 1).reshape(-1, rank_map.shape[1])]
    spans = groups.min(axis=1) != groups.max(axis=1)
    return int((spans & (groups == node).any(axis=1)).sum())


def _switch_crossings(links: LinkModel, rank_map: np.ndarray) -> dict[str, tuple[int, int]]:
    """(groups that span switches, groups) per axis; pipeline hops count GPU pairs."""
    sw = links.gpu_switch[rank_map]
    out = {}
    for axis, groups in (
        ("TP groups", sw.reshape(-1, rank_map.shape[2])),
        ("DP rings", sw.transpose(0, 2, 1).reshape(-1, rank_map.shape[1])),
    ):
        out[axis] = (int((groups.min(axis=1) != groups.max(axis=1)).sum()), len(groups))
    out["pipeline hops"] = (int((sw[1:] != sw[:-1]).sum()), sw[1:].size)
    return out
