"""The layer-to-stage split as an integer program: build it in PuLP, solve it, read the status.

Owns: `solve_split(problem, time_limit_s)` and its result `SplitSolution`; the one place the
planner talks to an ILP solver (HiGHS through `highspy`, CBC as the fallback).
Does not own: the costs in the problem (planner/cost/split_problem.py builds them), the exact
oracle (planner/split_dp.py), or which configurations get solved (planner/search.py).

Formulation (the problem statement is `SplitProblem`'s docstring; alpa's stage construction
solves the same kind of contiguous split, Zheng et al. 2022 Sec. 5.2). Rank times and memory
depend on the chunk counts n[k] only through each rank's total N[r] = sum of n[k] over its
chunks (k % pp == r): every term is a sum over the rank's chunks of something linear in n[k].
So the integer variables are the per-rank counts, and the chunk split is recovered exactly:
  variables   N[r] integer in [v, L - (pp - 1) * v]  (n[k] >= 1 on each of the rank's v chunks)
              z >= 0 continuous (the largest rank time)
  constraint  sum_r N[r] = L
  memory      N[r] <= Nmax[r], the largest block count whose rank memory (linear in N[r], see
              SplitProblem) stays <= capacity_bytes[r]; the integer bound keeps byte-sized
              coefficients (1e10) out of the solver
  max time    z >= R[r] = N[r] * block_time_s[r] + (embedding / head time when r holds them);
              ranks with identical block and end times form a group g with an integer peak
              K[g] >= N[r] (r in g) and z >= K[g] * block_time_s + end time instead: the same
              constraint set, but the LP bound then rises by branching on one integer rather
              than on every rank (a 64-rank split: 0.6 s -> 0.03 s with HiGHS)
  objective   min (m*v - 1) * z + sum_r R[r], i.e. SplitProblem.objective_s scaled by v
              (constant p2p dropped)
  chunks      rank r's N[r] blocks over its v chunks, differing by at most one, extras first
              (any N[r] >= v has such a split, and all splits of N[r] cost the same).
Symmetry cut (exact): interior ranks (holding neither embedding nor head) with identical
times, in-flight counts, fixed bytes and capacities are interchangeable, so N[r] >= N[r+1]
between consecutive ones. Warm start: the balanced split (planner.parallel.balanced_split)
improved by single-block moves, when it fits. Feasibility is decided exactly before the solver
runs (Nmax[r] >= v for all r and sum_r Nmax[r] >= L); with `precheck=False` the solver decides
it, which the tests use to check the status handling. Among equal-cost optima the answer is
made canonical (`canonical_split`) so the plan does not depend on the solver's pick.

Status is read from PuLP's `sol_status` (the solution status), not `status`: PuLP maps a HiGHS
time-out with an incumbent to status "Optimal" and CBC can print "Optimal" after stopping, so
only `LpSolutionOptimal` is reported as optimal; an incumbent found before the time limit is
`feasible` with its gap.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import pulp

from planner.cost.split_problem import SplitProblem
from planner.parallel import balanced_split

log = logging.getLogger(__name__)

# HiGHS stops at 1e-4 relative gap by default; the split objective differs between neighbouring
# splits by one block time out of (m - 1 + pp) block times, which can be below 1e-4, so the
# default would call a non-optimal split "optimal". Source: HiGHS option docs (mip_rel_gap).
MIP_REL_GAP = 1e-9
# Absolute gap in objective units (seconds): far below any block time (>= microseconds).
MIP_ABS_GAP_S = 1e-12
# The objective is scaled to milliseconds inside the solver so its tolerances (1e-6 feasibility,
# 1e-9 gap) act on numbers of order 1..1e5 rather than 1e-3..1e2.
OBJECTIVE_SCALE = 1e3
# SplitProblem.fits sums a rank's memory chunk by chunk; the bound here uses N[r] * per-block
# bytes. The two differ by float rounding (~1e-16 relative), so the bound keeps this relative
# margin below capacity and every split the ILP accepts passes `fits`.
MEMORY_REL_MARGIN = 1e-12
# Block-count deviations that differ by less than this are equal (they are sums of a few floats).
TIE_TOL = 1e-9


@contextlib.contextmanager
def native_stdout_silenced() -> Iterator[None]:
    """Send what native code writes to fd 1 to /dev/null while a solver runs.

    HiGHS >= 1.16 prints its banner from C++ when the first `Highs()` is built, before any
    option (output_flag) can be set, which turned `meshplan plan --json` into non-JSON. The
    solvers are configured quiet (msg=False) as well; this catches what options cannot.
    Python-level stdout is flushed first so none of it is lost behind the redirect.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class SolveStatus(str, Enum):
    """`optimal`: proven optimal. `feasible`: a split that fits, found before the time limit,
    not proven optimal (see `gap`). `infeasible`: no split fits memory.
    `not_solved`: the solver stopped without any split (time limit too short, solver error)."""

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    INFEASIBLE = "infeasible"
    NOT_SOLVED = "not_solved"


@dataclass(frozen=True, kw_only=True)
class SplitSolution:
    """The solver's answer. `split` is empty unless status is optimal or feasible;
    `objective_s` is recomputed from `split` with SplitProblem.objective_s (not the solver's
    scaled float); `gap` is the relative MIP gap the solver reports (0 when proven, None when
    the solver does not say)."""

    split: tuple[int, ...]
    objective_s: float
    status: SolveStatus
    solver: str
    gap: float | None

    @property
    def has_split(self) -> bool:
        return self.status in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE)


def rank_layer_bounds(problem: SplitProblem) -> tuple[int, ...]:
    """Nmax[r]: the most blocks rank r can hold within its capacity (-1 when even its fixed
    part does not fit; below virtual_stages means it cannot hold one block per chunk)."""
    L = problem.num_layers
    out = []
    for r in range(problem.pp):
        base, per_block = _rank_memory_terms(problem, r)
        cap = problem.capacity_bytes[r] * (1 - MEMORY_REL_MARGIN)
        if base > cap:
            out.append(-1)
            continue
        if per_block <= 0:
            out.append(L)
            continue
        n = min(L, math.floor((cap - base) / per_block))
        # Float rounding can put the floor one off either side of the exact comparison.
        while n >= 0 and base + n * per_block > cap:
            n -= 1
        while n < L and base + (n + 1) * per_block <= cap:
            n += 1
        out.append(n)
    return tuple(out)


def _rank_memory_terms(problem: SplitProblem, r: int) -> tuple[float, float]:
    """(bytes independent of the block count, bytes per block) of rank r, per SplitProblem."""
    last_rank = (problem.num_chunks - 1) % problem.pp
    base = problem.fixed_bytes[r]
    if r == 0:
        base += (
            problem.embedding_static_bytes
            + problem.in_flight[0] * problem.embedding_activation_bytes
        )
    if r == last_rank:
        base += problem.head_static_bytes + problem.head_activation_bytes
    per_block = problem.block_static_bytes + problem.in_flight[r] * problem.block_activation_bytes
    return base, per_block


def rank_extra_time_s(problem: SplitProblem, r: int) -> float:
    """Time on rank r that does not scale with its block count (embedding, head)."""
    last_rank = (problem.num_chunks - 1) % problem.pp
    extra = problem.embedding_time_s if r == 0 else 0.0
    return extra + (problem.head_time_s if r == last_rank else 0.0)


def is_feasible(problem: SplitProblem) -> bool:
    """Exact: every rank holds >= one block per chunk and the ranks together hold all blocks."""
    bounds = rank_layer_bounds(problem)
    v = problem.virtual_stages
    return all(b >= v for b in bounds) and sum(bounds) >= problem.num_layers


def split_from_rank_layers(problem: SplitProblem, rank_layers: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk counts from per-rank counts: rank r's N[r] blocks spread over its v chunks,
    extras on its earlier chunks (the same canonical form the ILP's symmetry cuts select)."""
    pp, v = problem.pp, problem.virtual_stages
    split = [0] * problem.num_chunks
    for r in range(pp):
        for j, n in enumerate(balanced_split(rank_layers[r], v)):
            split[r + j * pp] = n
    return tuple(split)


@functools.cache
def available_solver_names() -> tuple[str, ...]:
    """Solvers this host can use, in preference order (asked once: PuLP probes binaries)."""
    found = set(pulp.listSolvers(onlyAvailable=True))
    return tuple(name for name in ("HiGHS", "PULP_CBC_CMD") if name in found)


class _WarmHiGHS(pulp.HiGHS):
    """PuLP's in-process HiGHS interface ignores warm starts; this hands HiGHS the variables'
    initial values (set with LpVariable.setInitialValue) as a starting MIP solution."""

    def callSolver(self, lp: pulp.LpProblem) -> None:  # noqa: N802 (PuLP's method name)
        import highspy

        values = [v.varValue for v in lp.variables()]
        if all(x is not None for x in values):
            sol = highspy.HighsSolution()
            sol.col_value = [float(x) for x in values]
            sol.value_valid = True
            lp.solverModel.setSolution(sol)
        lp.solverModel.run()


def _make_solver(name: str, time_limit_s: float, warm: bool) -> pulp.LpSolver:
    if name == "HiGHS":
        return _WarmHiGHS(
            msg=False,
            timeLimit=time_limit_s,
            gapRel=MIP_REL_GAP,
            gapAbs=MIP_ABS_GAP_S * OBJECTIVE_SCALE,
            threads=1,
            # The feasibility-jump heuristic costs ~20 ms per call here and never helps:
            # the warm start or the root LP rounding already gives an incumbent.
            mip_heuristic_run_feasibility_jump=False,
        )
    with warnings.catch_warnings():
        # PuLP 3 deprecates the bundled CBC binary in favour of a separately installed one;
        # the bundled one is exactly the fallback wanted here.
        warnings.simplefilter("ignore")
        return pulp.PULP_CBC_CMD(
            msg=False,
            timeLimit=max(1.0, time_limit_s),
            gapRel=MIP_REL_GAP,
            gapAbs=MIP_ABS_GAP_S * OBJECTIVE_SCALE,
            warmStart=warm,
            threads=1,
        )


def solve_split(
    problem: SplitProblem,
    time_limit_s: float = 10.0,
    *,
    solver: str | None = None,
    precheck: bool = True,
) -> SplitSolution:
    """Solve the split ILP (see the module docstring) within `time_limit_s` seconds.

    `solver` picks "HiGHS" or "PULP_CBC_CMD" (default: the first available of those).
    """
    names = available_solver_names()
    if not names:
        raise RuntimeError("no ILP solver available: install highspy (or PuLP's bundled CBC)")
    name = solver or names[0]
    if name not in names:
        raise ValueError(f"solver {name!r} is not available here; available: {', '.join(names)}")
    if precheck and not is_feasible(problem):
        return SplitSolution(
            split=(),
            objective_s=math.inf,
            status=SolveStatus.INFEASIBLE,
            solver="precheck",
            gap=None,
        )

    L, pp, v = problem.num_layers, problem.pp, problem.virtual_stages
    bounds = rank_layer_bounds(problem)
    prob = pulp.LpProblem("layer_split", pulp.LpMinimize)
    # N[r] >= v (one block per chunk) and <= L - (pp - 1) * v (the other ranks need theirs).
    n = [
        prob.add_variable(f"N{r:04d}", lowBound=v, upBound=L - (pp - 1) * v, cat="Integer")
        for r in range(pp)
    ]
    z = prob.add_variable("max_rank_time", lowBound=0)
    rank_t = [
        (n[r] * problem.block_time_s[r] + rank_extra_time_s(problem, r)) * OBJECTIVE_SCALE
        for r in range(pp)
    ]
    prob += problem.max_time_weight * z + pulp.lpSum(rank_t)
    prob += pulp.lpSum(n) == L, "all_blocks"
    for r in range(pp):
        # A rank over capacity even when empty has bound -1: the solver finds it infeasible.
        prob += n[r] <= bounds[r], f"memory_{r}"
    groups = time_groups(problem)
    peaks: list[pulp.LpVariable | None] = []
    for g, members in enumerate(groups):
        r0 = members[0]
        if len(members) == 1:
            prob += z >= rank_t[r0], f"max_time_{r0}"
            peaks.append(None)
            continue
        # The most blocks on any rank of the group, as an integer: z >= its time. Branching
        # on this one integer closes the gap the fractional z leaves in the LP relaxation.
        peak = prob.add_variable(f"K{g:04d}", lowBound=v, upBound=L - (pp - 1) * v, cat="Integer")
        peaks.append(peak)
        for r in members:
            prob += peak >= n[r], f"group_peak_{g}_{r}"
        prob += (
            z
            >= (peak * problem.block_time_s[r0] + rank_extra_time_s(problem, r0)) * OBJECTIVE_SCALE,
            f"max_time_group_{g}",
        )
    for r in interchangeable_pairs(problem):
        prob += n[r] >= n[r + 1], f"symmetry_{r}"

    start = warm_start(problem)
    if start is not None:
        for g, peak in enumerate(peaks):
            if peak is not None:
                peak.setInitialValue(max(start[r] for r in groups[g]))
        for r in range(pp):
            n[r].setInitialValue(start[r])
        times = [
            start[r] * problem.block_time_s[r] + rank_extra_time_s(problem, r) for r in range(pp)
        ]
        z.setInitialValue(max(times) * OBJECTIVE_SCALE)

    with native_stdout_silenced():
        prob.solve(_make_solver(name, time_limit_s, start is not None))
    return _read_solution(problem, prob, n, name)


def warm_start(problem: SplitProblem) -> tuple[int, ...] | None:
    """Per-rank counts of the balanced split (planner.parallel.balanced_split), improved by
    moving single blocks off the slowest rank while that lowers the objective; None when the
    balanced split does not fit (the solver then starts from nothing)."""
    pp, v = problem.pp, problem.virtual_stages
    balanced = balanced_split(problem.num_layers, problem.num_chunks)
    if not problem.fits(balanced):
        return None
    hi = rank_layer_bounds(problem)
    ranks = [sum(balanced[r::pp]) for r in range(pp)]
    if any(ranks[r] > hi[r] for r in range(pp)):
        return None
    extra = [rank_extra_time_s(problem, r) for r in range(pp)]
    b, m1 = problem.block_time_s, problem.max_time_weight

    def objective(counts: list[int]) -> float:
        t = [counts[r] * b[r] + extra[r] for r in range(pp)]
        return m1 * max(t) + sum(t)

    best = objective(ranks)
    for _ in range(problem.num_layers * pp):
        t = [ranks[r] * b[r] + extra[r] for r in range(pp)]
        a = max(range(pp), key=lambda r: (t[r], -r))
        moves = sorted((t[r] + b[r], r) for r in range(pp) if r != a and ranks[r] < hi[r])
        if ranks[a] <= v or not moves:
            break
        target = moves[0][1]
        ranks[a] -= 1
        ranks[target] += 1
        value = objective(ranks)
        if value >= best:
            ranks[a] += 1
            ranks[target] -= 1
            break
        best = value
    cuts = interchangeable_pairs(problem)
    if any(ranks[r] < ranks[r + 1] for r in cuts):
        return None
    return tuple(ranks)


def time_groups(problem: SplitProblem) -> list[list[int]]:
    """Ranks grouped by identical (block time, embedding/head time), in rank order."""
    groups: dict[tuple[float, float], list[int]] = {}
    for r in range(problem.pp):
        groups.setdefault((problem.block_time_s[r], rank_extra_time_s(problem, r)), []).append(r)
    return list(groups.values())


def interchangeable_pairs(problem: SplitProblem) -> list[int]:
    """r such that ranks r and r+1 are interior and identical in every per-rank input."""
    # Rank 0 holds the embedding and rank pp-1 the head ((pp*v - 1) % pp == pp - 1).
    out = []
    for r in range(1, problem.pp - 2):
        same = all(
            getattr(problem, f)[r] == getattr(problem, f)[r + 1]
            for f in ("block_time_s", "in_flight", "fixed_bytes", "capacity_bytes")
        )
        if same:
            out.append(r)
    return out


def _read_solution(
    problem: SplitProblem, prob: pulp.LpProblem, n: list[pulp.LpVariable], name: str
) -> SplitSolution:
    sol = prob.sol_status
    if sol == pulp.LpSolutionInfeasible:
        return SplitSolution(
            split=(), objective_s=math.inf, status=SolveStatus.INFEASIBLE, solver=name, gap=None
        )
    if sol not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        log.info("split ILP (%s) stopped without a solution: %s", name, pulp.LpStatus[prob.status])
        return SplitSolution(
            split=(), objective_s=math.inf, status=SolveStatus.NOT_SOLVED, solver=name, gap=None
        )
    values = [x.varValue for x in n]
    if any(x is None for x in values):
        return SplitSolution(
            split=(), objective_s=math.inf, status=SolveStatus.NOT_SOLVED, solver=name, gap=None
        )
    split = tuple(int(round(x)) for x in values if x is not None)
    if sum(split) != problem.num_layers or min(split) < 1 or not problem.fits(split):
        # A solver answer that breaks the model is a solver failure, never a plan.
        log.warning("split ILP (%s) returned an invalid split %s", name, split)
        return SplitSolution(
            split=(), objective_s=math.inf, status=SolveStatus.NOT_SOLVED, solver=name, gap=None
        )
    status = SolveStatus.OPTIMAL if sol == pulp.LpSolutionOptimal else SolveStatus.FEASIBLE
    split = canonical_split(problem, split)
    return SplitSolution(
        split=split,
        objective_s=problem.objective_s(split),
        status=status,
        solver=name,
        gap=_gap(prob, name, status),
    )


def canonical_split(problem: SplitProblem, split: tuple[int, ...]) -> tuple[int, ...]:
    """Among splits no worse than `split`, move towards the most even one.

    The objective often has many optima (with equal block times only the largest rank time
    counts), and the solver returns any of them, e.g. seven blocks on one middle rank and one
    on its neighbours. The event simulation that re-prices finalists prefers even splits, and
    the plan should not depend on the solver's choice among ties. Blocks move one at a time from
    the rank furthest above its continuous water-filling share to the one furthest below, only
    while the objective does not grow and memory fits; each move lowers sum (N[r] - share[r])^2,
    so this ends, and with equal block times (where the ties form a box) it ends at the unique
    minimiser. Moves that leave that sum unchanged go to later ranks only (later ranks hold
    fewer micro-batches in flight under 1F1B), which makes the end point unique among ties.
    """
    pp, v = problem.pp, problem.virtual_stages
    if any(b <= 0 for b in problem.block_time_s):
        return split
    hi = [min(b, problem.num_layers) for b in rank_layer_bounds(problem)]
    ranks = [sum(split[r::pp]) for r in range(pp)]
    extra = [rank_extra_time_s(problem, r) for r in range(pp)]
    share = _water_fill(problem, extra, hi)
    times = [ranks[r] * problem.block_time_s[r] + extra[r] for r in range(pp)]
    m1 = problem.max_time_weight
    limit = m1 * max(times) + sum(times)
    limit += abs(limit) * 1e-12
    # Each move lowers the potential (or keeps it and moves a block later): a bound, not a need.
    for _ in range(pp * problem.num_layers + 1):
        dev = [ranks[r] - share[r] for r in range(pp)]
        sources = sorted((r for r in range(pp) if ranks[r] > v), key=lambda r: (-dev[r], r))
        sinks = sorted((r for r in range(pp) if ranks[r] < hi[r]), key=lambda r: (dev[r], r))
        move = None
        for a in sources:
            for b in sinks:
                gain = dev[a] - dev[b] - 1
                if gain < -TIE_TOL:
                    break  # sinks are sorted by deviation: later ones gain even less
                if gain <= TIE_TOL and b < a:
                    continue
                new = list(times)
                new[a] -= problem.block_time_s[a]
                new[b] += problem.block_time_s[b]
                if m1 * max(new) + sum(new) <= limit:
                    move = (a, b, new)
                    break
            if move:
                break
        if move is None:
            break
        a, b, times = move
        ranks[a] -= 1
        ranks[b] += 1
    return split_from_rank_layers(problem, tuple(ranks))


def _water_fill(problem: SplitProblem, extra: list[float], hi: list[int]) -> list[float]:
    """Continuous per-rank block shares with equal rank times where the bounds allow:
    share[r] = clamp((T - extra[r]) / block_time_s[r], v, hi[r]) with sum = L (bisection on T)."""
    v, L, b = problem.virtual_stages, problem.num_layers, problem.block_time_s

    def shares(t: float) -> list[float]:
        return [min(max((t - extra[r]) / b[r], v), hi[r]) for r in range(problem.pp)]

    lo_t, hi_t = 0.0, max(extra) + L * max(b)
    for _ in range(100):
        mid = (lo_t + hi_t) / 2
        if sum(shares(mid)) < L:
            lo_t = mid
        else:
            hi_t = mid
    return shares(hi_t)


def _gap(prob: pulp.LpProblem, name: str, status: SolveStatus) -> float | None:
    if status is SolveStatus.OPTIMAL:
        return 0.0
    model = getattr(prob, "solverModel", None)
    if name == "HiGHS" and model is not None:
        gap = float(model.getInfo().mip_gap)
        return gap if math.isfinite(gap) else None
    return None
