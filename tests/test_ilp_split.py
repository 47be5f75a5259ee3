"""The split ILP against the exact DP oracle and brute force, and its status handling."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from types import SimpleNamespace

import pulp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.cost.split_problem import SplitProblem
from planner.ilp import (
    SolveStatus,
    _read_solution,
    available_solver_names,
    canonical_split,
    is_feasible,
    solve_split,
)
from planner.parallel import balanced_split
from planner.split_dp import solve_split_dp

GB = 1e9


def compositions(total: int, parts: int):
    """Every split of `total` blocks into `parts` chunks of >= 1 block."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def brute_force(problem: SplitProblem) -> float | None:
    best = None
    for split in compositions(problem.num_layers, problem.num_chunks):
        if problem.fits(split):
            obj = problem.objective_s(split)
            best = obj if best is None else min(best, obj)
    return best


@st.composite
def problems(draw, max_layers: int = 14, homogeneous: bool | None = None):
    pp = draw(st.integers(1, 4))
    v = draw(st.integers(1, 3)) if pp > 1 else 1
    layers = draw(st.integers(pp * v, max(pp * v, max_layers)))
    homo = draw(st.booleans()) if homogeneous is None else homogeneous
    base_t = draw(st.floats(1e-4, 1e-2))
    times = tuple(base_t if homo else base_t * draw(st.floats(0.5, 3.0)) for _ in range(pp))
    block_static = draw(st.floats(0.1, 4.0)) * GB
    block_act = draw(st.floats(0.0, 2.0)) * GB
    in_flight = tuple(float(pp - r) for r in range(pp))
    fixed = tuple(draw(st.floats(0.0, 2.0)) * GB for _ in range(pp))
    emb_static, emb_act = draw(st.floats(0, 3)) * GB, draw(st.floats(0, 1)) * GB
    head_static, head_act = draw(st.floats(0, 3)) * GB, draw(st.floats(0, 6)) * GB
    # Capacities a whole number of blocks (plus a fraction of one) above each rank's fixed part,
    # so memory-tight and infeasible instances come up often. The fraction stays clear of 0 and
    # 1: a split whose memory equals capacity to the last bit is decided by float rounding.
    caps = []
    for r in range(pp):
        base = fixed[r]
        if r == 0:
            base += emb_static + in_flight[0] * emb_act
        if r == pp - 1:
            base += head_static + head_act
        per_block = block_static + in_flight[r] * block_act
        blocks = draw(st.integers(max(0, v - 1), layers))
        caps.append(base + (blocks + draw(st.floats(0.01, 0.99))) * per_block)
    return SplitProblem(
        num_layers=layers,
        pp=pp,
        virtual_stages=v,
        num_micro_batches=draw(st.integers(1, 32)),
        block_time_s=times,
        embedding_time_s=draw(st.floats(0, 5)) * base_t,
        head_time_s=draw(st.floats(0, 8)) * base_t,
        boundary_p2p_s=draw(st.floats(0, 1e-3)),
        block_static_bytes=block_static,
        block_activation_bytes=block_act,
        in_flight=in_flight,
        embedding_static_bytes=emb_static,
        embedding_activation_bytes=emb_act,
        head_static_bytes=head_static,
        head_activation_bytes=head_act,
        fixed_bytes=fixed,
        capacity_bytes=tuple(caps),
    )


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_ilp_equals_dp_oracle(problem: SplitProblem) -> None:
    ilp = solve_split(problem, time_limit_s=10)
    dp = solve_split_dp(problem)
    if dp is None:
        assert ilp.status is SolveStatus.INFEASIBLE
        assert not is_feasible(problem)
        return
    assert ilp.status is SolveStatus.OPTIMAL, ilp
    assert _close(ilp.objective_s, dp[1]), (ilp, dp)
    assert problem.fits(ilp.split) and sum(ilp.split) == problem.num_layers
    assert min(ilp.split) >= 1 and len(ilp.split) == problem.num_chunks
    assert ilp.gap == 0.0


@settings(max_examples=60, deadline=None)
@given(problems(max_layers=9))
def test_dp_oracle_equals_brute_force(problem: SplitProblem) -> None:
    dp = solve_split_dp(problem)
    bf = brute_force(problem)
    assert (dp is None) == (bf is None)
    if dp is not None and bf is not None:
        assert _close(dp[1], bf)
        assert problem.fits(dp[0])


@settings(max_examples=40, deadline=None)
@given(problems(homogeneous=True))
def test_solver_decides_infeasibility_without_precheck(problem: SplitProblem) -> None:
    """With the exact pre-check off, HiGHS itself must report infeasible (read via sol_status)."""
    ilp = solve_split(problem, time_limit_s=10, precheck=False)
    dp = solve_split_dp(problem)
    if dp is None:
        assert ilp.status is SolveStatus.INFEASIBLE and ilp.solver == "HiGHS"
        assert ilp.split == ()
    else:
        assert ilp.status is SolveStatus.OPTIMAL and _close(ilp.objective_s, dp[1])


@pytest.mark.skipif("PULP_CBC_CMD" not in available_solver_names(), reason="no CBC")
@settings(max_examples=4, deadline=None)
@given(problems(max_layers=10))
def test_cbc_fallback_matches_dp(problem: SplitProblem) -> None:
    ilp = solve_split(problem, time_limit_s=10, solver="PULP_CBC_CMD", precheck=False)
    dp = solve_split_dp(problem)
    if dp is None:
        assert ilp.status is SolveStatus.INFEASIBLE
    else:
        assert ilp.status is SolveStatus.OPTIMAL and _close(ilp.objective_s, dp[1])


def _problem(**over: object) -> SplitProblem:
    pp = int(over.pop("pp", 4))  # type: ignore[call-overload]
    fields: dict[str, object] = dict(
        num_layers=32,
        pp=pp,
        virtual_stages=1,
        num_micro_batches=16,
        block_time_s=(1e-3,) * pp,
        embedding_time_s=2e-3,
        head_time_s=5e-3,
        boundary_p2p_s=1e-4,
        block_static_bytes=1 * GB,
        block_activation_bytes=0.2 * GB,
        in_flight=tuple(float(pp - r) for r in range(pp)),
        embedding_static_bytes=1 * GB,
        embedding_activation_bytes=0.1 * GB,
        head_static_bytes=1 * GB,
        head_activation_bytes=2 * GB,
        fixed_bytes=(0.5 * GB,) * pp,
        capacity_bytes=(80 * GB,) * pp,
    )
    fields.update(over)
    return SplitProblem(**fields)  # type: ignore[arg-type]


def test_ends_get_fewer_blocks_to_compensate_embedding_and_head() -> None:
    p = _problem()
    sol = solve_split(p, 10)
    assert sol.status is SolveStatus.OPTIMAL
    balanced = balanced_split(32, 4)
    assert sol.objective_s < p.objective_s(balanced)
    assert sol.split[-1] < sol.split[1] and sol.split[0] < sol.split[1]


def test_memory_tight_moves_blocks_off_the_first_rank() -> None:
    # Rank 0 keeps 4 micro-batches in flight: give it room for only 6 blocks.
    per_block0 = 1 * GB + 4 * 0.2 * GB
    cap0 = 0.5 * GB + 1 * GB + 4 * 0.1 * GB + 6.5 * per_block0
    p = _problem(capacity_bytes=(cap0, 80 * GB, 80 * GB, 80 * GB))
    sol = solve_split(p, 10)
    assert sol.status is SolveStatus.OPTIMAL and sol.split[0] <= 6 and p.fits(sol.split)
    assert _close(sol.objective_s, solve_split_dp(p)[1])  # type: ignore[index]


def test_heterogeneous_ranks_give_fast_ranks_more_blocks() -> None:
    p = _problem(block_time_s=(1e-3, 2e-3, 1e-3, 1e-3))
    sol = solve_split(p, 10)
    assert sol.split[1] < sol.split[2]
    assert _close(sol.objective_s, solve_split_dp(p)[1])  # type: ignore[index]


def test_infeasible_when_no_rank_can_hold_a_block() -> None:
    p = _problem(capacity_bytes=(1 * GB,) * 4)
    assert solve_split(p, 10).status is SolveStatus.INFEASIBLE
    assert solve_split(p, 10, precheck=False).status is SolveStatus.INFEASIBLE


def test_interleaved_chunks_are_balanced_within_a_rank() -> None:
    p = _problem(pp=4, virtual_stages=3, num_layers=40)
    sol = solve_split(p, 10)
    for r in range(4):
        counts = sol.split[r::4]
        assert max(counts) - min(counts) <= 1 and list(counts) == sorted(counts, reverse=True)


def test_canonical_split_never_worsens_and_is_unique_among_ties() -> None:
    p = _problem(pp=8, num_layers=20, head_time_s=6e-3)
    a = (1, 1, 1, 1, 7, 7, 1, 1)
    b = (1, 7, 7, 1, 1, 1, 1, 1)
    assert p.objective_s(a) == p.objective_s(b)
    ca, cb = canonical_split(p, a), canonical_split(p, b)
    assert ca == cb and p.objective_s(ca) <= p.objective_s(a) and p.fits(ca)
    assert max(ca) - min(ca[1:-1]) <= 2


def test_same_problem_same_split() -> None:
    p = _problem(pp=8, num_layers=80, virtual_stages=2, num_micro_batches=64)
    assert solve_split(p, 10) == solve_split(p, 10)


@pytest.mark.parametrize(
    ("sol_status", "expected"),
    [
        (pulp.LpSolutionOptimal, SolveStatus.OPTIMAL),
        # PuLP reports a HiGHS time-out with an incumbent as status "Optimal": sol_status says
        # it is only integer-feasible, and that is what must come back.
        (pulp.LpSolutionIntegerFeasible, SolveStatus.FEASIBLE),
        (pulp.LpSolutionNoSolutionFound, SolveStatus.NOT_SOLVED),
        (pulp.LpSolutionInfeasible, SolveStatus.INFEASIBLE),
    ],
)
def test_status_is_read_from_sol_status(sol_status: int, expected: SolveStatus) -> None:
    p = _problem()
    variables = [SimpleNamespace(varValue=float(n)) for n in (8, 8, 8, 8)]  # blocks per rank
    fake = SimpleNamespace(sol_status=sol_status, status=pulp.LpStatusOptimal, solverModel=None)
    sol = _read_solution(p, fake, variables, "PULP_CBC_CMD")  # type: ignore[arg-type]
    assert sol.status is expected
    assert sol.has_split == (expected in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE))
    if sol.has_split:
        assert p.fits(sol.split) and _close(sol.objective_s, p.objective_s(sol.split))


def test_solver_answer_that_breaks_memory_is_not_a_plan() -> None:
    p = _problem(capacity_bytes=(12 * GB,) * 4)
    variables = [SimpleNamespace(varValue=float(n)) for n in (29, 1, 1, 1)]
    fake = SimpleNamespace(sol_status=pulp.LpSolutionOptimal, status=1, solverModel=None)
    sol = _read_solution(p, fake, variables, "HiGHS")  # type: ignore[arg-type]
    assert sol.status is SolveStatus.NOT_SOLVED and sol.split == ()


def test_time_limited_solve_is_reported_feasible_not_optimal() -> None:
    """A real HiGHS time-out with an incumbent (the warm start): PuLP's status says Optimal,
    the answer must say feasible; with time it proves optimality and is no worse."""
    rng = random.Random(0)
    pp = 48
    times = tuple(rng.uniform(1e-3, 3e-3) for _ in range(pp))
    p = _problem(
        pp=pp,
        num_layers=400,
        num_micro_batches=97,
        block_time_s=times,
        block_activation_bytes=0.1 * GB,
    )
    # Without a feasible warm start (the balanced split overflows rank 0) nothing is found.
    tight = replace(p, block_activation_bytes=0.2 * GB)
    assert not tight.fits(balanced_split(400, pp))
    assert solve_split(tight, time_limit_s=1e-6).status is SolveStatus.NOT_SOLVED
    quick = solve_split(p, time_limit_s=1e-6)
    assert quick.status is SolveStatus.FEASIBLE and p.fits(quick.split)
    full = solve_split(p, time_limit_s=30)
    assert full.status is SolveStatus.OPTIMAL and full.gap == 0.0
    assert full.objective_s <= quick.objective_s
