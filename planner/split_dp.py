"""Exact dynamic programs for the layer split: the oracle the ILP is tested against.

Owns: `solve_split_dp(problem)`, an exact solver of `SplitProblem` that shares no code with
the ILP: rank times and memory come from SplitProblem's own `rank_times_s` and
`rank_memory_bytes`.
Does not own: the ILP (planner/ilp.py), which the search uses; these DPs are O(pp * L^2) per
threshold and meant for tests and small problems.

Both DPs work on per-rank block counts N[r] (rank r's v chunks get N[r] blocks, each >= 1, so
N[r] >= v), because rank times and memory depend on the split only through N[r]
(SplitProblem's formulas sum a term linear in n[k] over the rank's chunks).

Homogeneous case (block_time_s equal on every rank): sum_r R[r] = L * b + embedding + head is
the same for every split, so minimising (m*v - 1) * max R + sum R is minimising max R:
    g[r][s] = min over N in [v, Nmax[r]] of max(R_r(N), g[r-1][s-N]),  answer g[pp-1][L]
(the linear-partition DP; Skiena, The Algorithm Design Manual, Sec. 10.7).

General case (per-rank times differ): the optimal max rank time Z is one of the finitely many
values R_r(N); for each candidate Z the least sum of rank times with every R[r] <= Z is
    f[r][s] = min over N with R_r(N) <= Z of R_r(N) + f[r-1][s-N]
and the answer is the least (m*v - 1) * Z + f[pp-1][L] over candidates.
"""

from __future__ import annotations

import math

from planner.cost.split_problem import SplitProblem
from planner.parallel import balanced_split

INF = math.inf


def solve_split_dp(problem: SplitProblem) -> tuple[tuple[int, ...], float] | None:
    """(split, objective_s) of an optimal split, or None when no split fits memory."""
    pp, v, L = problem.pp, problem.virtual_stages, problem.num_layers
    hi = [_max_blocks(problem, r) for r in range(pp)]
    if any(h < v for h in hi) or sum(hi) < L:
        return None
    if len(set(problem.block_time_s)) == 1:
        ranks = _min_max_dp(problem, hi)
    else:
        ranks = _threshold_dp(problem, hi)
    if ranks is None:
        return None
    split = [0] * problem.num_chunks
    for r in range(pp):
        for j, n in enumerate(balanced_split(ranks[r], v)):
            split[r + j * pp] = n
    return tuple(split), problem.objective_s(tuple(split))


def _only_rank(problem: SplitProblem, r: int, n: int) -> tuple[int, ...]:
    """A (partial) split putting n blocks in rank r's first chunk and none elsewhere; the
    problem's formulas then give rank r's time and memory for N[r] = n."""
    split = [0] * problem.num_chunks
    split[r] = n
    return tuple(split)


def _rank_time(problem: SplitProblem, r: int, n: int) -> float:
    return problem.rank_times_s(_only_rank(problem, r, n))[r]


def _max_blocks(problem: SplitProblem, r: int) -> int:
    """Largest N[r] <= L whose rank memory fits (by linear scan), or -1 if none does."""
    best = -1
    for n in range(problem.num_layers + 1):
        if problem.rank_memory_bytes(_only_rank(problem, r, n))[r] > problem.capacity_bytes[r]:
            break
        best = n
    return best


def _min_max_dp(problem: SplitProblem, hi: list[int]) -> tuple[int, ...] | None:
    pp, v, L = problem.pp, problem.virtual_stages, problem.num_layers
    g = [[INF] * (L + 1) for _ in range(pp)]
    choice = [[0] * (L + 1) for _ in range(pp)]
    for s in range(v, min(hi[0], L) + 1):
        g[0][s] = _rank_time(problem, 0, s)
        choice[0][s] = s
    for r in range(1, pp):
        for s in range(L + 1):
            for n in range(v, min(hi[r], s) + 1):
                prev = g[r - 1][s - n]
                if prev == INF:
                    continue
                val = max(prev, _rank_time(problem, r, n))
                if val < g[r][s]:
                    g[r][s], choice[r][s] = val, n
    return _walk_back(choice, g, pp, L)


def _threshold_dp(problem: SplitProblem, hi: list[int]) -> tuple[int, ...] | None:
    pp, v, L = problem.pp, problem.virtual_stages, problem.num_layers
    candidates = sorted({_rank_time(problem, r, n) for r in range(pp) for n in range(v, hi[r] + 1)})
    best: tuple[float, tuple[int, ...]] | None = None
    for z in candidates:
        f = [[INF] * (L + 1) for _ in range(pp)]
        choice = [[0] * (L + 1) for _ in range(pp)]
        for s in range(v, min(hi[0], L) + 1):
            t = _rank_time(problem, 0, s)
            if t <= z:
                f[0][s], choice[0][s] = t, s
        for r in range(1, pp):
            for s in range(L + 1):
                for n in range(v, min(hi[r], s) + 1):
                    t = _rank_time(problem, r, n)
                    if t > z or f[r - 1][s - n] == INF:
                        continue
                    val = t + f[r - 1][s - n]
                    if val < f[r][s]:
                        f[r][s], choice[r][s] = val, n
        ranks = _walk_back(choice, f, pp, L)
        if ranks is None:
            continue
        total = problem.max_time_weight * z + f[pp - 1][L]
        if best is None or total < best[0]:
            best = (total, ranks)
    return best[1] if best else None


def _walk_back(
    choice: list[list[int]], table: list[list[float]], pp: int, L: int
) -> tuple[int, ...] | None:
    if table[pp - 1][L] == INF:
        return None
    ranks = [0] * pp
    s = L
    for r in range(pp - 1, -1, -1):
        ranks[r] = choice[r][s]
        s -= ranks[r]
    return tuple(ranks)
