"""Plan = search, then place: the step that turns the search's winner into the plan we write.

Owns: running topology-aware placement (planner/placement.py) on the search's winner, and,
when the placement moves GPUs of different speeds between pipeline ranks, re-solving the
layer split (planner/ilp.py) for the new stage speeds and keeping whichever is faster.
Does not own: the search (planner/search.py), placement itself, or output (cli/plan_cmd.py).

Only the winner is placed: placement never makes a plan slower than its default rank order
(`place` guarantees it), so the winner can only improve; placing every finalist would cost the
placement budget k times on large clusters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.cost.estimate import estimate, split_problem
from planner.ilp import solve_split
from planner.placement import PlacementResult, place
from planner.profile import Profile
from planner.search import RankedPlan, SearchResult
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

# Wall-clock budget of the placement search on large clusters (s); small ones are exact.
DEFAULT_PLACEMENT_BUDGET_S = 3.0
# Time limit of the re-split ILP after placement (s); these ILPs solve in milliseconds.
RESPLIT_TIME_LIMIT_S = 10.0


@dataclass(frozen=True, kw_only=True)
class PlannedResult:
    """The search result with its winner placed; `placement` explains the rank map."""

    search: SearchResult
    plans: tuple[RankedPlan, ...]
    placement: PlacementResult
    resplit: bool


def place_winner(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    result: SearchResult,
    profile: Profile | None = None,
    *,
    time_budget_s: float = DEFAULT_PLACEMENT_BUDGET_S,
    seed: int = 0,
) -> PlannedResult:
    """Place `result.plans[0]` on the cluster; re-split layers if GPU speeds per stage changed."""
    best = result.plans[0]
    placement = place(
        model, training, cluster, best.config, profile, time_budget_s=time_budget_s, seed=seed
    )
    placed_cfg = replace(best.config, rank_to_gpu=placement.rank_to_gpu)
    placed = replace(
        best, config=placed_cfg, estimate=estimate(model, training, cluster, placed_cfg, profile)
    )
    resplit = False
    if len({n.gpu.name for n in cluster.nodes}) > 1:
        sol = solve_split(
            split_problem(model, training, cluster, placed_cfg, profile), RESPLIT_TIME_LIMIT_S
        )
        if sol.has_split and sol.split != placed_cfg.stage_layers:
            cfg = replace(placed_cfg, stage_layers=sol.split)
            est = estimate(model, training, cluster, cfg, profile)
            if est.fits and est.step_time_s < placed.estimate.step_time_s:
                placed = replace(
                    placed,
                    config=cfg,
                    estimate=est,
                    split_status=sol.status,
                    split_objective_s=sol.objective_s,
                )
                resplit = True
    return PlannedResult(
        search=result, plans=(placed, *result.plans[1:]), placement=placement, resplit=resplit
    )
