"""Re-plan after a failure: the same model and training on the nodes and GPUs that are left.

Owns: naming what failed (`parse_nodes`, `parse_gpus`, `parse_degrades`: errors list the
allowed names), the surviving cluster and its renumbering (`survivors`), carrying a profile of
the old cluster over to the survivors (`remap_profile`), the nearest global batch the survivors
can divide when the old one no longer fits a valid layout (`batch_candidates`), and `replan`:
search + placement on the survivors, the new plan, and the old plan's prediction to compare.
Does not own: the search (planner/search.py), placement (planner/planning.py), output or the
checkpoint to resume from (cli/replan_cmd.py, executor/checkpoint_dir.py).

Names are the plan's node indices (`node3` = the node whose launch script is node3.sh, GPUs
sum(gpus of nodes < 3) onwards) and its global GPU ids. The survivors keep their order and
are renumbered densely (node 4 becomes node 3 when node 3 is lost); `Survivors.node_map`
says which old node each new index is. A node that loses some GPUs (`--exclude-gpus`) is
left out whole on a multi-node cluster unless partial nodes are kept: launch files run the
same process count on every node, and tensor parallelism stays inside a node only when every
node has the same GPU count (search_space: tp divides the gcd of the nodes' GPU counts).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from planner.cost.estimate import estimate
from planner.errors import ConfigError, NoFeasiblePlan, SpecError
from planner.parallel import ParallelConfig, Schedule
from planner.plan import Plan, build_plan
from planner.planning import DEFAULT_PLACEMENT_BUDGET_S, PlannedResult, place_winner
from planner.profile import CollectiveRecord, P2PRecord, Profile
from planner.search import search
from planner.search_space import (
    SearchOptions,
    _divisors,
    _gpus_per_node,
    _pick,
    enumerate_configs,
)
from planner.specs import MAX_GLOBAL_BATCH, ClusterSpec, NodeSpec, TrainingSpec

_NODE = re.compile(r"^(?:node)?(\d+)$")
# Global batches tried, nearest first, when the old one divides no valid layout of the
# survivors (a bound on the cost of looking; each try is one enumeration, no search).
MAX_BATCH_TRIES = 64
# When the old batch no longer divides a valid layout: how far from it (fraction) a batch may
# be and still be compared, and how many are searched. A policy, not a measurement: one per
# cent changes the tokens per step by one per cent; `--batch-tolerance` changes it. Nearby
# batches can differ a lot in speed (4,088 GPUs: 2,044 = 511 x 4 runs dp 1,022 at about the
# old throughput, 2,051 = 7 x 293 only dp 7 at half of it), hence a comparison, not the nearest.
DEFAULT_BATCH_TOLERANCE = 0.01
MAX_BATCH_SEARCHES = 4


@dataclass(frozen=True, kw_only=True)
class Survivors:
    """The cluster that is left and how its numbering maps to the old plan's."""

    cluster: ClusterSpec
    node_map: tuple[int, ...]  # new node index -> old node index
    gpu_map: tuple[int, ...]  # new global GPU id -> old global GPU id
    lost_nodes: tuple[int, ...]  # old nodes left out (excluded, or partial and dropped)
    partial_dropped: tuple[int, ...]  # old nodes left out because some of their GPUs failed
    degraded: tuple[tuple[int, float], ...]  # (old node, NIC bandwidth factor)


@dataclass(frozen=True, kw_only=True)
class ReplanResult:
    plan: Plan
    survivors: Survivors
    planned: PlannedResult
    old_estimate: Any  # the old plan on the old cluster, priced now (same profile, same model)
    old_on_degraded: Any | None  # the old plan kept on the degraded cluster (no node lost)
    new_estimate: Any
    old_global_batch: int
    warnings: tuple[str, ...]

    @property
    def slowdown(self) -> float:
        """Old throughput / new throughput (tokens per second): 1.25 = 25 % slower."""
        return float(self.old_estimate.tokens_per_s / self.new_estimate.tokens_per_s)


def _node_names(cluster: ClusterSpec) -> str:
    n = len(cluster.nodes)
    return "node0" if n == 1 else f"node0..node{n - 1}"


def parse_nodes(text: str, cluster: ClusterSpec, option: str = "--exclude") -> list[int]:
    """`node3,node7` (or `3,7`) -> [3, 7]; unknown names list the allowed ones."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        m = _NODE.match(item)
        if m is None or int(m.group(1)) >= len(cluster.nodes):
            raise SpecError(
                f"{option} {item!r}: no such node; the plan's nodes are {_node_names(cluster)}"
            )
        out.append(int(m.group(1)))
    if not out:
        raise SpecError(f"{option}: give node names, e.g. node3,node7 ({_node_names(cluster)})")
    return sorted(set(out))


def parse_gpus(text: str, cluster: ClusterSpec) -> list[int]:
    """`17,42` -> [17, 42]: the plan's global GPU ids."""
    out = []
    last = cluster.num_gpus - 1
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) > last:
            raise SpecError(
                f"--exclude-gpus {item!r}: no such GPU; the plan's GPU ids are 0..{last}"
            )
        out.append(int(item))
    if not out:
        raise SpecError(f"--exclude-gpus: give GPU ids, e.g. 17,42 (0..{last})")
    return sorted(set(out))


def parse_degrades(items: Sequence[str], cluster: ClusterSpec) -> list[tuple[int, float]]:
    """`["node2:0.25"]` -> [(2, 0.25)]: node 2's NICs at a quarter of their bandwidth."""
    out: dict[int, float] = {}
    for item in (t.strip() for text in items for t in text.split(",")):
        if not item:
            continue
        name, sep, factor = item.rpartition(":")
        node = parse_nodes(name, cluster, "--degrade-link")[0] if sep else None
        try:
            value = float(factor)
        except ValueError:
            value = math.nan
        if node is None or not (0 < value <= 1):
            raise SpecError(
                f"--degrade-link {item!r}: use NODE:FACTOR with FACTOR in (0, 1], e.g. "
                f"node2:0.25 (a quarter of its NIC bandwidth); nodes are {_node_names(cluster)}"
            )
        out[node] = value
    return sorted(out.items())


def survivors(
    cluster: ClusterSpec,
    *,
    exclude_nodes: Sequence[int] = (),
    exclude_gpus: Sequence[int] = (),
    degrade: Sequence[tuple[int, float]] = (),
    keep_partial_nodes: bool = False,
) -> Survivors:
    """What is left of `cluster`; NoFeasiblePlan (exit 3) when nothing is."""
    lost_gpus: dict[int, set[int]] = {}
    for g in exclude_gpus:
        where, local = cluster.gpu_location(g)
        lost_gpus.setdefault(where, set()).add(local)
    factors = dict(degrade)
    kept: list[tuple[int, NodeSpec, list[int]]] = []
    partial = []
    for i, node in enumerate(cluster.nodes):
        gone = lost_gpus.get(i, set())
        if i in exclude_nodes or len(gone) == node.gpus:
            continue
        if gone and not keep_partial_nodes and len(cluster.nodes) > 1:
            partial.append(i)
            continue
        locals_ = [j for j in range(node.gpus) if j not in gone]
        spec = replace(node, gpus=len(locals_)) if gone else node
        if i in factors:
            spec = replace(spec, nic=spec.nic.scaled(factors[i]))
        kept.append((i, spec, locals_))
    if not kept:
        raise NoFeasiblePlan(
            f"nothing is left to plan on: every node of cluster '{cluster.name}' "
            f"({_node_names(cluster)}) is excluded or has lost GPUs"
        )
    starts = cluster.node_starts
    gpu_map = tuple(starts[i] + j for i, _, locals_ in kept for j in locals_)
    changed = bool(exclude_nodes or exclude_gpus)
    suffix = "-survivors" if changed else "-degraded"
    new = ClusterSpec(
        name=f"{cluster.name}{suffix}",
        nodes=tuple(spec for _, spec, _ in kept),
        inter_switch_link=cluster.inter_switch_link,
    )
    node_map = tuple(i for i, _, _ in kept)
    return Survivors(
        cluster=new,
        node_map=node_map,
        gpu_map=gpu_map,
        lost_nodes=tuple(i for i in range(len(cluster.nodes)) if i not in node_map),
        partial_dropped=tuple(partial),
        degraded=tuple(sorted(factors.items())),
    )


def remap_profile(profile: Profile, old: ClusterSpec, surv: Survivors) -> Profile:
    """The profile's records of surviving GPUs under their new ids. Links that cross the
    network from a degraded node keep their latency and get the node's bandwidth factor
    (alpha-beta: time = alpha + bytes / (beta * factor)); their raw samples are dropped, as
    they no longer describe what was measured."""
    new_id = {g: i for i, g in enumerate(surv.gpu_map)}
    node_of = [old.gpu_location(g)[0] for g in range(old.num_gpus)]
    factor = dict(surv.degraded)
    starts = surv.cluster.node_starts

    def slowdown(ids: Sequence[int]) -> float:
        nodes = {node_of[g] for g in ids}
        return min((factor.get(n, 1.0) for n in nodes), default=1.0) if len(nodes) > 1 else 1.0

    gpus = []
    for g in profile.gpus:
        if g.gpu_id in new_id:
            i = new_id[g.gpu_id]
            node = surv.node_map.index(node_of[g.gpu_id])
            gpus.append(replace(g, gpu_id=i, local_index=i - starts[node]))
    p2p: list[P2PRecord] = []
    for r in profile.p2p:
        if r.src in new_id and r.dst in new_id:
            f = slowdown((r.src, r.dst))
            rec = replace(r, src=new_id[r.src], dst=new_id[r.dst])
            if f < 1.0:
                rec = replace(rec, bandwidth_bytes_per_s=r.bandwidth_bytes_per_s * f, samples=())
            p2p.append(rec)
    coll: list[CollectiveRecord] = []
    for c in profile.collectives:
        if all(g in new_id for g in c.gpu_ids):
            f = slowdown(c.gpu_ids)
            crec = replace(c, gpu_ids=tuple(new_id[g] for g in c.gpu_ids))
            if f < 1.0:
                crec = replace(
                    crec,
                    beta_bytes_per_s=c.beta_bytes_per_s * f,
                    busbw_bytes_per_s=c.busbw_bytes_per_s * f,
                    samples=(),
                )
            coll.append(crec)
    hosts = tuple(dict.fromkeys(g.host for g in gpus)) or profile.meta.hosts
    meta = replace(profile.meta, hosts=hosts)
    return replace(profile, meta=meta, gpus=tuple(gpus), p2p=tuple(p2p), collectives=tuple(coll))


def _dp_degrees(model: Any, cluster: ClusterSpec, options: SearchOptions) -> set[int]:
    """Data-parallel degrees the search could use on `cluster` for some global batch (the
    (tp, pp) rules of search_space.enumerate_configs, without the batch's)."""
    world = cluster.num_gpus
    top = world if "tp" in options.allow else _gpus_per_node(cluster)
    fix = options.fix
    tps = _pick(fix, "tp", _divisors(top))
    out = set()
    for tp in tps:
        if world % tp or model.tp_divisible(tp):
            continue
        rest = world // tp
        pps = [fix["pp"]] if "pp" in fix else range(1, min(rest, model.layers) + 1)
        out |= {rest // pp for pp in pps if rest % pp == 0}
    return {d for d in out if fix.get("dp", d) == d}


def batch_candidates(
    model: Any, training: TrainingSpec, cluster: ClusterSpec, options: SearchOptions
) -> list[int]:
    """Global batches a valid layout of `cluster` divides, nearest to training's first (ties:
    the smaller); the old batch itself first when it still works."""
    b = training.global_batch
    near = set()
    for dp in _dp_degrees(model, cluster, options):
        low = (b // dp) * dp
        near |= {x for x in (low, low + dp) if dp <= x <= MAX_GLOBAL_BATCH}
    return sorted(near, key=lambda x: (abs(x - b), x))[:MAX_BATCH_TRIES]


def _implied_allow(config: ParallelConfig, cluster: ClusterSpec) -> frozenset[str]:
    """The `--allow` the old plan needed, so the survivors are searched as widely."""
    allow = set()
    if config.tp > min(n.gpus for n in cluster.nodes):
        allow.add("tp")
    if config.pp > 1 and config.zero >= 2:
        allow.add("zero")
    if config.schedule is Schedule.GPIPE:
        allow.add("gpipe")
    return frozenset(allow)


def training_candidates(
    model: Any,
    training: TrainingSpec,
    cluster: ClusterSpec,
    options: SearchOptions,
    tolerance: float = DEFAULT_BATCH_TOLERANCE,
) -> tuple[list[TrainingSpec], bool]:
    """(other global batches to consider, whether the old batch divides a valid layout).

    The others are the batches within `tolerance` of the old one that divide a valid layout
    of `cluster` (at most MAX_BATCH_SEARCHES, nearest first); when the old batch divides none
    and none is that close, the nearest batch that divides one."""
    b = training.global_batch
    old_ok = bool(enumerate_configs(model, training, cluster, options)[0])
    found: list[TrainingSpec] = []
    for x in batch_candidates(model, training, cluster, options):
        far = abs(x - b) > tolerance * b
        if len(found) >= MAX_BATCH_SEARCHES or (far and (found or old_ok)):
            break
        t = replace(training, global_batch=x)
        if x != b and enumerate_configs(model, t, cluster, options)[0]:
            found.append(t)
    if not old_ok and not found:
        raise NoFeasiblePlan(
            f"no valid layout of the {cluster.num_gpus} surviving GPUs for {model.name} with "
            f"global batch {b} or the {MAX_BATCH_TRIES} nearest batches"
        )
    return found, old_ok


def _search_best(
    model: Any,
    trainings: list[TrainingSpec],
    cluster: ClusterSpec,
    options: SearchOptions,
    profile: Profile | None,
) -> tuple[TrainingSpec, Any]:
    """The search result with the highest predicted throughput over `trainings` (ties: the
    first, i.e. the nearest batch); NoFeasiblePlan from the last when none fits."""
    best: tuple[TrainingSpec, Any] | None = None
    error: NoFeasiblePlan | None = None
    for t in trainings:
        try:
            result = search(model, t, cluster, options, profile=profile)
        except NoFeasiblePlan as e:
            error = e
            continue
        rate = result.plans[0].estimate.tokens_per_s
        if best is None or rate > best[1].plans[0].estimate.tokens_per_s:
            best = (t, result)
    if best is None:
        assert error is not None
        raise error
    return best


def _faster_batch(
    model: Any,
    trainings: list[TrainingSpec],
    cluster: ClusterSpec,
    options: SearchOptions,
    profile: Profile | None,
    kept: Any,
) -> tuple[int, float] | None:
    """(batch, fractional gain in tokens/s) of the fastest of `trainings` when it beats `kept`."""
    if not trainings:
        return None
    try:
        t, result = _search_best(model, trainings, cluster, options, profile)
    except NoFeasiblePlan:
        return None
    rate, old = result.plans[0].estimate.tokens_per_s, kept.plans[0].estimate.tokens_per_s
    return (t.global_batch, rate / old - 1) if rate > old else None


@dataclass(frozen=True, kw_only=True)
class _BatchChoice:
    """How replan picks the global batch (see `replan`)."""

    tolerance: float
    change: bool


def _choose_training(
    plan: Plan,
    cluster: ClusterSpec,
    options: SearchOptions,
    profile: Profile | None,
    old_rate: float,
    choice: _BatchChoice,
) -> tuple[TrainingSpec, Any, list[str]]:
    """(training spec, search result, warnings): the old batch when a valid layout divides it
    (or the fastest nearby one with `choice.change`), else the fastest nearby one."""
    model, old_b = plan.model, plan.training.global_batch
    others, old_ok = training_candidates(model, plan.training, cluster, options, choice.tolerance)
    if old_ok:
        primary = [plan.training, *others] if choice.change else [plan.training]
        rest = [] if choice.change else others
    else:
        primary, rest = others, []
    training, result = _search_best(model, primary, cluster, options, profile)
    warnings = []
    new_b = training.global_batch
    if new_b != old_b:
        why = "is not the fastest on" if old_ok else "divides no valid layout of"
        tried = ", ".join(str(t.global_batch) for t in primary)
        warnings.append(
            f"global batch {old_b} {why} the {cluster.num_gpus} surviving GPUs; planned "
            f"with {new_b} ({new_b - old_b:+d} sequences per step; the fastest of {tried}): "
            "the learning-rate schedule may need the same change"
        )
    # Other batches are searched only when keeping this one scales worse than the lost GPUs
    # explain (ideal: the old throughput x surviving / old GPUs), within the same tolerance.
    ideal = old_rate * cluster.num_gpus / plan.cluster.num_gpus
    scales = result.plans[0].estimate.tokens_per_s >= ideal * (1 - choice.tolerance)
    if not old_ok or choice.change or scales or cluster.num_gpus == plan.cluster.num_gpus:
        return training, result, warnings
    if not rest:
        # None within the tolerance: look at the two nearest that divide a layout at all.
        rest = training_candidates(model, plan.training, cluster, options, math.inf)[0][:2]
    faster = _faster_batch(model, rest, cluster, options, profile, result)
    if faster is not None:
        b, gain = faster
        need = abs(b - old_b) / old_b
        how = "--change-batch" + (
            f" --batch-tolerance {math.ceil(need * 1000) / 1000:g}"
            if need > choice.tolerance
            else ""
        )
        warnings.append(
            f"global batch {b} ({b - old_b:+d} sequences) would be predicted {100 * gain:.1f} % "
            f"faster per token on the survivors than keeping {old_b}; {how} plans it"
        )
    return training, result, warnings


def replan(
    plan: Plan,
    surv: Survivors,
    *,
    profile: Profile | None = None,
    old_profile: Profile | None = None,
    options: SearchOptions | None = None,
    placement_budget_s: float = DEFAULT_PLACEMENT_BUDGET_S,
    batch_tolerance: float = DEFAULT_BATCH_TOLERANCE,
    change_batch: bool = False,
) -> ReplanResult:
    """Search, place and build the plan of `plan`'s model on `surv.cluster`. `profile` is
    the profile remapped to the survivors (remap_profile), `old_profile` the same profile
    for the old cluster (to price the old plan with the same numbers). The global batch is
    kept when it divides a valid layout (a faster batch within `batch_tolerance` is named in
    a warning; `change_batch` plans the fastest of them instead)."""
    base = options or SearchOptions(top_k=1)
    options = replace(base, allow=base.allow | _implied_allow(plan.config, plan.cluster))
    model, cluster = plan.model, surv.cluster
    old_est = estimate(model, plan.training, plan.cluster, plan.config, old_profile)
    training, result, warnings = _choose_training(
        plan,
        cluster,
        options,
        profile,
        old_est.tokens_per_s,
        _BatchChoice(tolerance=batch_tolerance, change=change_batch),
    )
    planned = place_winner(
        model, training, cluster, result, profile, time_budget_s=placement_budget_s
    )
    best = planned.plans[0]
    new_plan = build_plan(
        model=model,
        training=training,
        cluster=cluster,
        config=best.config,
        prediction=best.estimate.to_json(),
        source=best.estimate.source,
        profile_sha256=plan.provenance.profile_sha256 if profile is not None else None,
    )
    kept = None
    if not surv.lost_nodes and surv.degraded:
        try:
            kept = estimate(model, plan.training, cluster, plan.config, profile)
        except ConfigError:
            kept = None
    if surv.partial_dropped:
        warnings.append(
            "left out whole because some of their GPUs failed: "
            + ", ".join(f"node{i}" for i in surv.partial_dropped)
            + " (launch files run the same process count on every node; "
            "--keep-partial-nodes plans with them, for a plan `meshplan emit` cannot write)"
        )
    return ReplanResult(
        plan=new_plan,
        survivors=surv,
        planned=planned,
        old_estimate=old_est,
        old_on_degraded=kept,
        new_estimate=best.estimate,
        old_global_batch=plan.training.global_batch,
        warnings=tuple(warnings),
    )
