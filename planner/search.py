"""The configuration search: enumerate, prune with bounds, split with the ILP, rank with the cost model.

Owns: the branch-and-bound over configurations, the deterministic top-k ranking, and the
`NoFeasiblePlan` diagnosis (binding constraint and what would fit).
Does not own: the search space (planner/search_space.py), costs (planner/cost/), the split solver (planner/ilp.py), rank placement
(planner/placement.py: the search uses the default rank order), or output (cli/plan_cmd.py).

Algorithm (best-first branch and bound over configurations):
1. Enumerate every valid configuration (ParallelConfig.validate) of the space below.
2. Compute floor for each: step_time >= m * max_r R[r] (every pipeline rank runs forward and
   backward of all m micro-batches one after another, whatever the schedule), with
   max_r R[r] >= max(sum_r R[r] / pp, the largest rank time at v blocks per chunk) and
   sum_r R[r] at least its value when the extra blocks all go to the fastest rank. The block
   times it needs are shared by all candidates with the same (tp, micro-batch, recompute,
   sequence parallel) on clusters of identical nodes (`_CheapBounds`), so it costs one
   SplitProblem per such key, not per candidate.
3. Pop candidates in order of their bound. First pop: build the candidate's SplitProblem and
   apply the memory floor (`ilp.is_feasible`, exact: every rank holds >= v blocks and all
   ranks together hold L), skipping the build when a candidate that needs no more memory
   already failed (`needs_more_memory`); re-queue it with its exact bound. Second pop: split
   it with the ILP and price it with the full estimate (event simulation).
4. Stop when the next bound exceeds the k-th best step time found: every later candidate has
   a larger bound, so the top k are exact (tests/test_search_plans.py checks this against
   pricing every candidate).
Ties in step time are broken by peak memory, then by a fixed order of the configuration
fields (`config_key`), so the same inputs always give the same plans. `max_time_s` caps the
whole search; when it stops the search early (after at least one plan was found),
`complete` is False and the result is the best found so far.

Search space (defaults; `--allow` widens, `--fix` pins any field):
- tp: divisors of the GPUs per node that shard the model's heads, KV heads and FFN
  (`allow tp`: any divisor of the GPU count, i.e. tensor parallelism across nodes);
- pp: divisors of GPUs/tp up to the layer count; dp = GPUs / (tp * pp) dividing the batch;
- micro_batch: divisors of the per-replica batch with >= pp micro-batches;
- schedule 1f1b, and interleaved with v in the divisors (>= 2) of layers // pp when the
  micro-batch count is a multiple of pp (`allow gpipe`: also GPipe);
- recompute none | selective | full; sequence parallel off/on when tp > 1;
- ep (Mixture-of-Experts models only): the divisors of dp that divide the expert count and
  keep the EP group (ep * tp consecutive GPUs) inside one node (`allow ep`: across nodes);
- ZeRO 0 | 1 with dp > 1, and 2 | 3 only without pipelining, as Megatron-LM and DeepSpeed do
  not pipeline ZeRO-2/3 (gradients and weights would be re-gathered per micro-batch)
  (`allow zero`: ZeRO-2/3 with pp > 1 too).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from planner.cost.analytic import DEFAULT_CONSTANTS
from planner.cost.estimate import estimate, split_problem
from planner.cost.grad_accum import part_traffic_s
from planner.cost.split_problem import SplitProblem
from planner.errors import ConfigError, NoFeasiblePlan
from planner.ilp import (
    SolveStatus,
    interchangeable_pairs,
    is_feasible,
    rank_extra_time_s,
    rank_layer_bounds,
    solve_split,
)
from planner.parallel import ParallelConfig, Recompute
from planner.profile import Profile
from planner.runtime import EXECUTOR
from planner.search_space import (
    RECOMPUTE_ORDER,
    SearchOptions,
    config_key,
    enumerate_configs,
)
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

log = logging.getLogger(__name__)

GIB = 2**30
# Doublings of the node count tried when explaining that nothing fits (unit: powers of two),
# and the largest GPU count tried (a bound on the explanation's cost, not a planning limit).
MORE_NODES_DOUBLINGS = 6
MORE_NODES_MAX_GPUS = 65536
# SplitProblems built per node count while looking for one that fits (count).
MORE_NODES_PROBES = 64

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True, kw_only=True)
class RankedPlan:
    """One searched configuration: `config` carries the ILP's split in stage_layers."""

    config: ParallelConfig
    estimate: Any
    split_status: SolveStatus
    split_objective_s: float
    step_lower_bound_s: float


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    plans: tuple[RankedPlan, ...]
    candidates_considered: int
    candidates_pruned: int
    candidates_evaluated: int
    pruned_by: Mapping[str, int]
    complete: bool
    search_time_s: float
    # what the search did beyond the asked space, e.g. widened to context parallelism
    notes: tuple[str, ...] = ()


def step_lower_bound_s(problem: SplitProblem) -> float:
    """m * (a lower bound on the largest rank time over every split); see the module docstring."""
    pp, v, L = problem.pp, problem.virtual_stages, problem.num_layers
    least = [v * problem.block_time_s[r] + rank_extra_time_s(problem, r) for r in range(pp)]
    least_sum = sum(least) + (L - pp * v) * min(problem.block_time_s)
    return problem.num_micro_batches * max(least_sum / pp, max(least))


def min_peak_memory_bytes(problem: SplitProblem) -> float:
    """The smallest fullest-GPU memory over all splits (capacity ignored): start every rank at
    v blocks and give each further block to the rank whose memory stays lowest. Greedy is exact
    for minimising the maximum of increasing linear functions under a fixed sum."""
    pp, v = problem.pp, problem.virtual_stages
    # One block in every chunk: v blocks on every rank.
    mem = list(problem.rank_memory_bytes(tuple([1] * problem.num_chunks)))
    per = [
        problem.block_static_bytes + problem.in_flight[r] * problem.block_activation_bytes
        for r in range(pp)
    ]
    for _ in range(problem.num_layers - pp * v):
        r = min(range(pp), key=lambda i: (mem[i] + per[i], i))
        mem[r] += per[r]
    return max(mem)


@dataclass
class _Tally:
    """Counters of one search (mutable, local to one `search` call)."""

    memory: int = 0
    bound: int = 0
    budget: int = 0
    unsolved: int = 0
    evaluated: int = 0
    least_memory: tuple[float, float, ParallelConfig] | None = None

    def note_memory(self, problem: SplitProblem, config: ParallelConfig) -> None:
        need = min_peak_memory_bytes(problem)
        cap = min(problem.capacity_bytes)
        if self.least_memory is None or (need - cap, config_key(config)) < (
            self.least_memory[0] - self.least_memory[1],
            config_key(self.least_memory[2]),
        ):
            self.least_memory = (need, cap, config)


def search(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    options: SearchOptions | None = None,
    *,
    profile: Profile | None = None,
    progress: ProgressFn | None = None,
) -> SearchResult:
    """The top-k configurations by predicted step time (see the module docstring).

    Context parallelism (cp > 1) is searched when `allow` or `fix` names it, and otherwise only
    when nothing fits with cp = 1: then the search runs again over every cp (the result's
    notes say so), so plans that fit without CP keep their cp = 1 search space."""
    options = options or SearchOptions()
    try:
        return _search(model, training, cluster, options, profile=profile, progress=progress)
    except NoFeasiblePlan as first:
        if "cp" in options.allow or "cp" in options.fix:
            raise
        wider = replace(options, allow=options.allow | {"cp"})
        try:
            result = _search(model, training, cluster, wider, profile=profile, progress=progress)
        except NoFeasiblePlan:
            raise first from None
        note = "nothing fits with cp = 1; context parallelism searched (as with --allow cp)"
        return replace(result, notes=(*result.notes, note))


def _search(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    options: SearchOptions,
    *,
    profile: Profile | None = None,
    progress: ProgressFn | None = None,
) -> SearchResult:
    start = time.perf_counter()
    configs, reasons = enumerate_configs(model, training, cluster, options)
    if not configs:
        message = _no_valid_config_message(model, training, cluster, options, reasons)
        # With pins, the user's --fix breaks a structural rule (bad input, exit 2); without,
        # nothing in the search space is valid for this model and cluster (infeasible, 3).
        raise ConfigError(message) if options.fix else NoFeasiblePlan(message)
    tally = _Tally()
    bounds = _CheapBounds(model, training, cluster, profile, split_problem)
    # Heap of (lower bound, tie key, level, index): level 0 = bound from shared block times,
    # level 1 = the candidate's own SplitProblem built and feasible.
    heap = [(bounds.of(cfg), memory_probe_key(cfg), 0, i) for i, cfg in enumerate(configs)]
    builder = _ProblemBuilder(
        configs, lambda c: split_problem(model, training, cluster, c, profile), tally
    )
    heapq.heapify(heap)
    problems: dict[int, SplitProblem] = {}
    ilp_cache: dict[tuple[Any, ...], Any] = {}
    best: list[tuple[tuple[Any, ...], RankedPlan]] = []
    complete = True
    k = options.top_k
    done = 0
    while heap:
        lb, key, level, i = heap[0]
        if len(best) >= k and lb > best[k - 1][1].estimate.step_time_s:
            tally.bound += len(heap)
            break
        elapsed = time.perf_counter() - start
        if options.max_time_s is not None and best and elapsed > options.max_time_s:
            tally.budget += len(heap)
            complete = False
            break
        heapq.heappop(heap)
        cfg = configs[i]
        if level == 0:
            problem = builder.get(i)
            if problem is None or not is_feasible(problem):
                tally.memory += 1
                done += 1
            else:
                exact = step_lower_bound_s(problem)
                if exact < lb * (1 - 1e-9):
                    log.warning("shared bound %.6g s above the exact %.6g s for %s", lb, exact, cfg)
                problems[i] = problem
                heapq.heappush(heap, (max(lb, exact), key, 1, i))
            if progress:
                progress("searching", done, len(configs))
            continue
        problem = problems.pop(i)
        limit = options.ilp_time_limit_s
        if options.max_time_s is not None:
            limit = max(0.5, min(limit, options.max_time_s - elapsed))
        sol = _cached_split(ilp_cache, problem, limit)
        done += 1
        if progress:
            progress("searching", done, len(configs))
        if not sol.has_split:
            if sol.status is SolveStatus.INFEASIBLE:
                tally.memory += 1
                tally.note_memory(problem, cfg)
            else:
                tally.unsolved += 1
            continue
        planned = replace(cfg, stage_layers=sol.split)
        est = estimate(model, training, cluster, planned, profile)
        if not est.fits:
            # The split fits the SplitProblem but the full estimate disagrees: trust the
            # estimate (it is what the plan reports) and keep the disagreement visible.
            log.warning(
                "split %s fits the split problem but not the estimate of %s", sol.split, cfg
            )
            tally.memory += 1
            tally.note_memory(problem, cfg)
            continue
        tally.evaluated += 1
        if est.step_time_s < lb * (1 - 1e-9):
            log.warning(
                "lower bound %.6g s above the estimate %.6g s for %s", lb, est.step_time_s, cfg
            )
        plan = RankedPlan(
            config=planned,
            estimate=est,
            split_status=sol.status,
            split_objective_s=sol.objective_s,
            step_lower_bound_s=lb,
        )
        _insert(best, (est.step_time_s, est.peak_memory_bytes, config_key(cfg)), plan, k)
    if progress:
        progress("searching", len(configs), len(configs))
    if not best:
        raise NoFeasiblePlan(_memory_message(model, training, cluster, options, tally, profile))
    pruned_by = {
        "memory": tally.memory,
        "bound": tally.bound,
        "budget": tally.budget,
        "unsolved": tally.unsolved,
    }
    return SearchResult(
        plans=tuple(p for _, p in best),
        candidates_considered=len(configs),
        candidates_pruned=tally.memory + tally.bound + tally.budget + tally.unsolved,
        candidates_evaluated=tally.evaluated,
        pruned_by=pruned_by,
        complete=complete,
        search_time_s=time.perf_counter() - start,
    )


def _insert(
    best: list[tuple[tuple[Any, ...], RankedPlan]],
    rank: tuple[Any, ...],
    plan: RankedPlan,
    k: int,
) -> None:
    """Keep the k best by `rank`. A plan whose estimate equals a kept one's exactly (a knob with
    no effect under the cost model, e.g. selective recompute with flash attention) is kept
    only once, as the configuration first in `config_key` order: it is no real alternative."""
    for i, (other_rank, other) in enumerate(best):
        if other.estimate == plan.estimate:
            if rank < other_rank:
                best[i] = (rank, plan)
                best.sort(key=lambda t: t[0])
            return
    best.append((rank, plan))
    best.sort(key=lambda t: t[0])
    del best[k:]


def _memory_family(c: ParallelConfig) -> tuple[Any, ...]:
    return (c.tp, c.pp, c.dp, c.schedule, c.virtual_stages, c.ep, c.cp, c.cp_attention)


def needs_more_memory(heavy: ParallelConfig, light: ParallelConfig) -> bool:
    """Whether `heavy` needs at least `light`'s memory on every rank for every split.

    Only orderings that hold term by term in the memory model (planner/cost/memory.py,
    rankcosts.py) are used, with (tp, pp, dp, schedule, v, ep) equal:
    - a larger micro-batch: activations, logits, p2p buffers and the recompute working set
      scale with it, and in-flight count x micro-batch (min(pp - r, m) * mb with
      m = per-replica batch / mb, or its interleaved analogue) does not shrink;
    - sequence parallel off instead of on (it shards the replicated activations and buffers);
    - recompute none instead of selective (selective only drops the attention scores);
    - a lower ZeRO stage among 0-2 (static bytes only). ZeRO-3 and full recompute add fixed
      buffers (gathered weights, one block's working set) and are compared only with
      themselves.
    tests/test_search_space.py checks this against the real cost model.
    """
    if _memory_family(heavy) != _memory_family(light) or heavy.micro_batch < light.micro_batch:
        return False
    if heavy.sequence_parallel and not light.sequence_parallel:
        return False
    if heavy.recompute is not light.recompute and not (
        light.recompute is Recompute.SELECTIVE and heavy.recompute is Recompute.NONE
    ):
        return False
    return heavy.zero == light.zero or (light.zero <= 2 and heavy.zero <= light.zero)


def memory_probe_key(c: ParallelConfig) -> tuple[Any, ...]:
    """Among candidates with equal bounds, the lighter ones first, so a failure prunes the
    heavier ones (needs_more_memory) before their problems are built."""
    return (-c.zero if c.zero <= 2 else -3, not c.sequence_parallel, c.micro_batch, config_key(c))


class _ProblemBuilder:
    """Builds candidates' SplitProblems on demand, skipping those that cannot fit because a
    configuration needing no more memory (needs_more_memory) already did not fit."""

    def __init__(
        self,
        configs: list[ParallelConfig],
        build: Callable[[ParallelConfig], SplitProblem],
        tally: _Tally,
    ) -> None:
        self._configs, self._build, self._tally = configs, build, tally
        self._failed: dict[tuple[Any, ...], list[ParallelConfig]] = {}

    def get(self, i: int) -> SplitProblem | None:
        """Candidate i's problem, or None when it is known not to fit (no problem built)."""
        cfg = self._configs[i]
        failed = self._failed.setdefault(_memory_family(cfg), [])
        if any(needs_more_memory(cfg, light) for light in failed):
            return None
        problem = self._build(cfg)
        if not is_feasible(problem):
            self._tally.note_memory(problem, cfg)
            failed.append(cfg)
        return problem


def _cached_split(cache: dict[tuple[Any, ...], Any], problem: SplitProblem, limit_s: float) -> Any:
    """solve_split, reusing the answer of an earlier candidate whose ILP is the same: the ILP
    reads only the times, the counts and the per-rank block bounds (clamped to the most a
    rank can ever hold), so e.g. ZeRO 0 and 1 with memory to spare share one solve."""
    pp, v, L = problem.pp, problem.virtual_stages, problem.num_layers
    most = L - (pp - 1) * v
    key = (
        L,
        pp,
        v,
        problem.num_micro_batches,
        problem.block_time_s,
        problem.embedding_time_s,
        problem.head_time_s,
        tuple(min(b, most) for b in rank_layer_bounds(problem)),
        tuple(interchangeable_pairs(problem)),
    )
    if key not in cache:
        cache[key] = solve_split(problem, limit_s)
    sol = cache[key]
    if sol.has_split:
        # Same split, this problem's own p2p term in the objective.
        return replace(sol, objective_s=problem.objective_s(sol.split))
    return sol


class _CheapBounds:
    """Step-time lower bounds without building each candidate's SplitProblem.

    The bound (`step_lower_bound_s`) reads only the per-rank block, embedding and head times.
    In `build_rank_costs` those depend on (tp, micro_batch, recompute, sequence_parallel, ep), the
    GPU type and the TP group's links; on a cluster of identical nodes, without a profile, with
    the TP group inside one node (tp divides the GPUs per node), they are the same for every
    pp, dp, schedule and ZeRO stage but for the gradient-accumulation traffic
    (cost/grad_accum.py), which is priced per candidate. There one SplitProblem per such key
    gives every candidate's bound; elsewhere the bound is 0 (each candidate's own problem is
    built first).
    The search checks the shared bound against the exact one of every problem it builds.
    """

    def __init__(
        self,
        model: ModelSpec,
        training: TrainingSpec,
        cluster: ClusterSpec,
        profile: Profile | None,
        split_problem: Callable[..., SplitProblem],
    ) -> None:
        self._args = (model, training, cluster)
        self._split_problem = split_problem
        first = cluster.nodes[0]
        self._shared = profile is None and all(n == first for n in cluster.nodes)
        self._gpn = first.gpus
        self._times: dict[tuple[Any, ...], tuple[float, ...]] = {}

    def of(self, cfg: ParallelConfig) -> float:
        if not self._shared or self._gpn % (cfg.tp * cfg.cp):
            return 0.0
        # an EP group of ep consecutive DP ranks spans ep * tp consecutive GPUs: inside one node
        # or over whole nodes alike for every pp and dp, so its all-to-all link is shared too
        span = cfg.ep * cfg.tp
        if cfg.ep > 1 and self._gpn % span and span % self._gpn:
            return 0.0
        key = (
            cfg.tp,
            cfg.micro_batch,
            cfg.recompute,
            cfg.sequence_parallel,
            cfg.ep,
            cfg.cp,
            cfg.cp_attention,
        )
        # gradient accumulation and the DP wrapper's copies depend on pp, dp, ZeRO and the
        # micro-batch count too: kept apart from the shared times and added per candidate
        traffic = self._traffic_s(cfg)
        if key not in self._times:
            p = self._split_problem(*self._args, cfg, None)
            shared = (p.block_time_s[0], p.embedding_time_s, p.head_time_s)
            self._times[key] = tuple(t - x for t, x in zip(shared, traffic, strict=True))
        block, emb, head = (t + x for t, x in zip(self._times[key], traffic, strict=True))
        model, training, _ = self._args
        pp, v, L = cfg.pp, cfg.virtual_stages, model.layers
        extra = [0.0] * pp
        extra[0] += emb
        extra[-1] += head
        least = [v * block + extra[r] for r in range(pp)]
        least_sum = sum(least) + (L - pp * v) * block
        return cfg.num_micro_batches(training) * max(least_sum / pp, max(least))

    def _traffic_s(self, cfg: ParallelConfig) -> tuple[float, float, float]:
        model, training, cluster = self._args
        return part_traffic_s(
            model, training, cfg, cluster.nodes[0].gpu, DEFAULT_CONSTANTS, EXECUTOR
        )


def describe_config(c: ParallelConfig) -> str:
    sched = c.schedule.value + (f"(v={c.virtual_stages})" if c.virtual_stages > 1 else "")
    sp = " sp" if c.sequence_parallel else ""
    ep = f" ep={c.ep}" if c.ep > 1 else ""
    return (
        f"tp={c.tp} pp={c.pp} dp={c.dp}{ep}"
        f"{f' cp={c.cp} ({c.cp_attention.value})' if c.cp > 1 else ''} "
        f"micro_batch={c.micro_batch} {sched} "
        f"recompute={c.recompute.value} zero={c.zero}{sp}"
    )


def _no_valid_config_message(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    options: SearchOptions,
    reasons: list[str],
) -> str:
    fixed = ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in sorted(options.fix.items()))
    where = f" with {fixed}" if fixed else ""
    first = reasons[0] if reasons else "no candidate in the search space"
    return (
        f"no valid parallel configuration of {cluster.num_gpus} GPUs for {model.name} "
        f"(global batch {training.global_batch}){where}: binding constraint: {first}"
    )


def _memory_message(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    options: SearchOptions,
    tally: _Tally,
    profile: Profile | None,
) -> str:
    if tally.least_memory is None:
        return f"no configuration could be split: the split ILP stopped without a solution {tally.unsolved} times"
    need, cap, cfg = tally.least_memory
    gpu = cluster.nodes[0].gpu.name
    msg = (
        f"no configuration fits in GPU memory (binding constraint: memory): the least "
        f"memory-hungry, {describe_config(cfg)}, needs {need / GIB:.1f} GiB on its fullest GPU "
        f"and {gpu} has {cap / GIB:.1f} GiB; it would fit with >= {need / GIB:.1f} GiB per GPU"
    )
    nodes = _nodes_that_fit(model, training, cluster, options, profile)
    if nodes is not None:
        gpus = nodes * cluster.nodes[0].gpus
        msg += f" or on {nodes} nodes ({gpus} GPUs)"
    return msg


def _frugal_key(c: ParallelConfig) -> tuple[Any, ...]:
    """Most memory-saving first: full recompute, highest ZeRO, sequence parallel, small mb."""
    return (
        -RECOMPUTE_ORDER[c.recompute],
        -c.zero,
        not c.sequence_parallel,
        c.micro_batch,
        config_key(c),
    )


def _nodes_that_fit(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    options: SearchOptions,
    profile: Profile | None,
) -> int | None:
    """The smallest doubling of the node count at which some configuration fits memory
    (clusters of identical nodes only; the global batch stays as given)."""
    first = cluster.nodes[0]
    if any(n != first for n in cluster.nodes) or profile is not None:
        return None
    fix = {k: v for k, v in options.fix.items() if k not in ("tp", "pp", "dp", "cp")}
    frugal = replace(options, fix=fix)
    nodes = len(cluster.nodes)
    for _ in range(MORE_NODES_DOUBLINGS):
        nodes *= 2
        if nodes * first.gpus > MORE_NODES_MAX_GPUS:
            break
        bigger = ClusterSpec(
            name=f"{cluster.name}x{nodes}",
            nodes=(first,) * nodes,
            inter_switch_link=cluster.inter_switch_link,
        )
        configs, _ = enumerate_configs(model, training, bigger, frugal)
        # Only the lightest of each (tp, pp, dp, schedule, v), most frugal first: a bounded
        # number of problems per size, so explaining a failure stays cheap on big clusters.
        lightest: dict[tuple[Any, ...], ParallelConfig] = {}
        for c in configs:
            fam = _memory_family(c)
            if fam not in lightest or _frugal_key(c) < _frugal_key(lightest[fam]):
                lightest[fam] = c
        order = sorted(lightest.values(), key=lambda c: (-c.pp, -c.tp, -c.cp, config_key(c)))
        for cfg in order[:MORE_NODES_PROBES]:
            if is_feasible(split_problem(model, training, bigger, cfg, None)):
                return nodes
    return None
