"""What every exporter shares: the result types, repricing a difference, the launch layout.

Owns: `Difference` (one thing the target will do unlike the plan, with the predicted step
time of the plan and of the closest plan the target can express), `Export`, `price`, and the
checks all targets make (rank map, node sizes, mixed GPUs).
Does not own: the cost model (planner/cost/estimate.py): repricing calls `estimate` on the
plan's own specs with the changed ParallelConfig / TrainingSpec, so old and new are priced by
the same model (and the same profile, when one is given).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from planner.errors import ConfigError
from planner.plan import Plan
from planner.profile import Profile

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Difference:
    """`what` the target does unlike the plan; `closest` the expressible plan priced instead.

    Step times are None when the difference is not priced (`unpriced_why` says why).
    """

    what: str
    closest: str
    plan_step_s: float | None = None
    closest_step_s: float | None = None
    closest_fits: bool | None = None
    unpriced_why: str = ""
    # the ParallelConfig / TrainingSpec fields the closest plan changes (for the combined price)
    config_changes: dict[str, Any] = field(default_factory=dict)
    training_changes: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One stderr line: what differs and its predicted cost."""
        head = f"differs: {self.what}; closest expressible: {self.closest}"
        if self.plan_step_s is None or self.closest_step_s is None:
            return f"{head} (not priced: {self.unpriced_why})"
        delta = 100 * (self.closest_step_s / self.plan_step_s - 1)
        fits = "" if self.closest_fits else ", does NOT fit in memory"
        return (
            f"{head}: predicted step {self.plan_step_s:.3f} s -> {self.closest_step_s:.3f} s "
            f"({delta:+.1f} %{fits})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "closest": self.closest,
            "plan_step_s": self.plan_step_s,
            "closest_step_s": self.closest_step_s,
            "closest_fits": self.closest_fits,
            "unpriced_why": self.unpriced_why or None,
        }


@dataclass(frozen=True, kw_only=True)
class Export:
    """The exported text (`text`: what `--out` writes / stdout prints), its argument vector
    (`argv`, for command-line targets) or config (`config`, DeepSpeed), and the differences."""

    target: str
    text: str
    argv: tuple[str, ...] = ()
    config: dict[str, Any] | None = None
    launcher: str = ""
    differences: tuple[Difference, ...] = ()
    plan_step_s: float | None = None
    exported_step_s: float | None = None
    exported_fits: bool | None = None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "text": self.text,
            "argv": list(self.argv),
            "config": self.config,
            "launcher": self.launcher,
            "differences": [d.to_json() for d in self.differences],
            "plan_step_s": self.plan_step_s,
            "exported_step_s": self.exported_step_s,
            "exported_fits": self.exported_fits,
            "notes": list(self.notes),
        }


def price(
    plan: Plan,
    profile: Profile | None,
    config_changes: dict[str, Any] | None = None,
    training_changes: dict[str, Any] | None = None,
) -> tuple[float, bool]:
    """(step time, fits) of the plan with the given fields changed; ConfigError if invalid."""
    from planner.cost.estimate import estimate

    config = replace(plan.config, **(config_changes or {}))
    training = replace(plan.training, **(training_changes or {}))
    est = estimate(plan.model, training, plan.cluster, config, profile)
    return est.step_time_s, est.fits


def difference(
    plan: Plan,
    profile: Profile | None,
    what: str,
    closest: str,
    config_changes: dict[str, Any] | None = None,
    training_changes: dict[str, Any] | None = None,
) -> Difference:
    """A Difference priced by re-estimating the plan with the closest plan's changes (the
    plan's own step, the same for every difference, is filled in once by `finish`)."""
    cc, tc = dict(config_changes or {}), dict(training_changes or {})
    try:
        new, fits = price(plan, profile, cc, tc)
    except ConfigError as e:
        return Difference(
            what=what,
            closest=closest,
            unpriced_why=f"the closest plan is not valid: {e}",
            config_changes=cc,
            training_changes=tc,
        )
    return Difference(
        what=what,
        closest=closest,
        closest_step_s=new,
        closest_fits=fits,
        config_changes=cc,
        training_changes=tc,
    )


def finish(
    plan: Plan,
    profile: Profile | None,
    diffs: list[Difference],
    **fields: Any,
) -> Export:
    """The Export with the plan's step (estimated once, and set on every priced difference)
    and that of all priced differences applied together."""
    old, _ = price(plan, profile)
    diffs = [replace(d, plan_step_s=old) if d.closest_step_s is not None else d for d in diffs]
    cc: dict[str, Any] = {}
    tc: dict[str, Any] = {}
    for d in diffs:
        if d.closest_step_s is not None:
            cc.update(d.config_changes)
            tc.update(d.training_changes)
    new: float | None = old
    fits: bool | None = None
    try:
        new, fits = price(plan, profile, cc, tc)
    except ConfigError:
        new, fits = None, None
    return Export(
        differences=tuple(diffs),
        plan_step_s=old,
        exported_step_s=new,
        exported_fits=fits,
        **fields,
    )


def layout_differences(plan: Plan, profile: Profile | None, target: str) -> list[Difference]:
    """What no target here can express: a permuted rank map, unequal nodes, mixed GPUs.

    All three targets order ranks with tp innermost, then cp, dp, pp (as the plan's identity
    map does) and launch the same number of processes on every node.
    """
    out = []
    world = plan.config.world_size
    if plan.config.placement() != tuple(range(world)):
        out.append(
            difference(
                plan,
                profile,
                f"{target} places mesh ranks in launch order (tp innermost); the plan's "
                "rank_to_gpu permutes them",
                "the identity rank map",
                {"rank_to_gpu": None},
            )
        )
    sizes = {n.gpus for n in plan.cluster.nodes}
    if len(sizes) > 1:
        out.append(
            Difference(
                what=f"nodes with different GPU counts {sorted(sizes)}: the launcher starts "
                "the same number of processes on every node",
                closest="none (launch by hand, one torchrun per node with its own "
                "--nproc_per_node)",
                unpriced_why="the plan's degrees are unchanged; only the launch differs",
            )
        )
    gpus = {n.gpu.name for n in plan.cluster.nodes}
    if len(gpus) > 1:
        out.append(
            Difference(
                what=f"a mixed-GPU cluster ({', '.join(sorted(gpus))}): {target} assumes "
                "identical GPUs (memory limits, kernel choices)",
                closest="the same degrees and split",
                unpriced_why="the plan's prediction already prices these GPUs; the exported "
                "degrees and split are the plan's",
            )
        )
    return out


# How many of the expressible splits nearest the plan's are priced to pick the closest plan:
# each estimate takes ~40 ms on a 128-GPU plan, so 16 keep an export under a second.
NEAREST_SPLITS_PRICED = 16


def closest_split(
    plan: Plan, profile: Profile | None, candidates: Iterable[tuple[tuple[int, ...], T]]
) -> tuple[tuple[int, ...], T] | None:
    """Of the (split, flags) a target can express, the closest plan: among the
    NEAREST_SPLITS_PRICED splits that move the fewest blocks (least L1 distance to the plan's
    split), the fastest that fits in memory, else the fastest; the plan's own split when the
    target can give it. None when the target can give no split."""
    want = plan.config.layers_per_chunk(plan.model)
    unique: dict[tuple[int, ...], T] = {}
    for split, flags in candidates:
        unique.setdefault(tuple(split), flags)
    if not unique:
        return None
    if want in unique:
        return want, unique[want]

    def dist(s: tuple[int, ...]) -> int:
        return sum(abs(a - b) for a, b in zip(s, want, strict=True))

    nearest = sorted(unique, key=dist)[:NEAREST_SPLITS_PRICED]
    ranked = []
    for split in nearest:
        try:
            step, fits = price(plan, profile, {"stage_layers": split})
        except ConfigError:
            continue
        ranked.append((not fits, step, dist(split), split))
    best = min(ranked)[3] if ranked else nearest[0]
    return best, unique[best]


def split_difference(
    plan: Plan, profile: Profile | None, target: str, how: str, closest: tuple[int, ...]
) -> Difference:
    """The plan's split is one `target` cannot give: price the closest one it can."""
    split = plan.config.layers_per_chunk(plan.model)
    return difference(
        plan,
        profile,
        f"{target} cannot give the per-chunk split {list(split)} ({how})",
        f"the split {list(closest)}",
        {"stage_layers": tuple(closest)},
    )


def node_layout(plan: Plan) -> tuple[int, int]:
    """(nodes, processes per node) for the launcher: the first node's GPU count."""
    return len(plan.cluster.nodes), plan.cluster.nodes[0].gpus
