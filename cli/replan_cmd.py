"""`meshplan replan`: the plan of a running job again, for the nodes and GPUs left after a failure.

Owns: the command's options, finding the checkpoint the new plan resumes from (the old plan's
launch.json, or `--checkpoint-dir`), the report (slowdown against the old plan, the node
renumbering, what to run next), the `--json` document, and writing `--out` / `--emit`.
Does not own: the re-planning itself (planner/replan.py), the checkpoint layout
(executor/checkpoint_dir.py) or the launch files (executor/emit.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cli.common import (
    JSON_OPTION,
    PROFILE_OPTION,
    check_positive_float,
    err_console,
    format_seconds,
    out_console,
    print_json,
)
from planner.errors import SpecError

if TYPE_CHECKING:
    from planner.plan import Plan
    from planner.profile import Profile
    from planner.replan import ReplanResult, Survivors


@dataclass(frozen=True, kw_only=True)
class _Resume:
    """Which checkpoint the new plan continues from, and how its launchers find it."""

    checkpoint_dir: str | None
    found_in: str | None  # "--checkpoint-dir" | "launch.json" | None
    step: int | None
    path: str | None
    model_matches: bool | None
    pod_checkpoint_dir: str | None
    emit_options: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "emit_options"}


def _launch_record(plan_path: Path) -> dict[str, Any] | None:
    """launch.json beside plan.json when `meshplan emit` wrote both (same plan id)."""
    from executor.emit import LAUNCH_RECORD, plan_id

    path = plan_path.parent / LAUNCH_RECORD
    try:
        doc = json.loads(path.read_text())
        same = doc.get("plan") == plan_id(plan_path.read_text())
    except (OSError, ValueError, AttributeError):
        return None
    return doc if isinstance(doc, dict) and same else None


def _resume_info(plan_path: Path, given: str | None, plan: Plan) -> _Resume:
    from executor import checkpoint_dir as layout

    record = _launch_record(plan_path)
    found_in, root = None, None
    if given is not None:
        found_in, root = "--checkpoint-dir", Path(given).resolve()
    elif record is not None and isinstance(record.get("host_checkpoint_dir"), str):
        found_in = "launch.json"
        root = (plan_path.parent / record["host_checkpoint_dir"]).resolve()
    step = layout.latest_step(root) if root is not None else None
    matches = None
    if root is not None and step is not None:
        rec = layout.read_record(layout.step_dir(root, step))
        matches = rec is not None and rec.model_fingerprint == layout.model_fingerprint(plan.model)
    return _Resume(
        checkpoint_dir=str(root) if root is not None else None,
        found_in=found_in,
        step=step,
        path=str(layout.step_dir(root, step)) if root is not None and step is not None else None,
        model_matches=matches,
        pod_checkpoint_dir=record.get("pod_checkpoint_dir") if record else None,
        emit_options=record.get("options")
        if record and isinstance(record.get("options"), dict)
        else None,
    )


def _resume_lines(r: _Resume, out: str | None) -> list[str]:
    target = out or "NEW_PLAN.json"
    if r.checkpoint_dir is None:
        return [
            "resume: no checkpoint directory is recorded for this plan (no launch.json of it "
            "beside plan.json); pass --checkpoint-dir DIR here to check it, then start the new "
            f"plan with `--checkpoint-dir DIR --resume` (or `meshplan emit {target} "
            "--checkpoint-dir DIR`)"
        ]
    if r.step is None:
        return [
            f"resume: no complete checkpoint in {r.checkpoint_dir} yet; the new plan starts at step 0"
        ]
    lines = [f"resume: from {r.path} (step {r.step}, the newest complete checkpoint; {r.found_in})"]
    if r.model_matches is False:
        lines.append("warning: that checkpoint holds another model; the executor will refuse it")
    if r.pod_checkpoint_dir:
        name = r.pod_checkpoint_dir.rsplit("/", 1)[-1]
        lines.append(
            f"kubernetes: pods resume from {r.pod_checkpoint_dir} when emitted with "
            f"--checkpoint-name {name} (replan --emit does so)"
        )
    return lines


def _runs(pairs: list[tuple[int, int]]) -> str:
    """[(4, 3), (5, 4), (9, 7)] -> 'node4..node5 -> node3..node4, node9 -> node7'."""
    runs: list[list[tuple[int, int]]] = []
    for old, new in pairs:
        if runs and old == runs[-1][-1][0] + 1 and new == runs[-1][-1][1] + 1:
            runs[-1].append((old, new))
        else:
            runs.append([(old, new)])
    parts = []
    for r in runs:
        (a, x), (b, y) = r[0], r[-1]
        parts.append(f"node{a} -> node{x}" if a == b else f"node{a}..node{b} -> node{x}..node{y}")
    return ", ".join(parts)


def _renumbering(s: Survivors) -> str | None:
    moved = [(old, new) for new, old in enumerate(s.node_map) if old != new]
    return _runs(moved) if moved else None


def _layout(plan: Plan) -> str:
    c = plan.config
    sched = c.schedule.value + (f" v={c.virtual_stages}" if c.virtual_stages > 1 else "")
    return (
        f"tp={c.tp} pp={c.pp} dp={c.dp}, micro-batch {c.micro_batch}, {sched}, "
        f"recompute {c.recompute.value}, ZeRO-{c.zero}"
    )


def _doc(
    res: ReplanResult, old: Plan, resume: _Resume, out: str | None, took_s: float
) -> dict[str, Any]:
    s, new = res.survivors, res.plan
    kept = res.old_on_degraded
    return {
        "plan": out,
        "model": new.model.name,
        "old": {
            "layout": _layout(old),
            "gpus": old.cluster.num_gpus,
            "nodes": len(old.cluster.nodes),
            "global_batch": res.old_global_batch,
            "step_time_s": res.old_estimate.step_time_s,
            "tokens_per_s": res.old_estimate.tokens_per_s,
        },
        "new": {
            "layout": _layout(new),
            "gpus": new.cluster.num_gpus,
            "nodes": len(new.cluster.nodes),
            "global_batch": new.training.global_batch,
            "step_time_s": res.new_estimate.step_time_s,
            "tokens_per_s": res.new_estimate.tokens_per_s,
            "source": res.new_estimate.source,
        },
        "slowdown": res.slowdown,
        "old_plan_on_degraded_cluster": (
            {"step_time_s": kept.step_time_s, "tokens_per_s": kept.tokens_per_s, "fits": kept.fits}
            if kept is not None
            else None
        ),
        "lost_nodes": [f"node{i}" for i in s.lost_nodes],
        "partial_nodes_dropped": [f"node{i}" for i in s.partial_dropped],
        "degraded": {f"node{i}": f for i, f in s.degraded},
        "node_map": list(s.node_map),
        "warnings": list(res.warnings),
        "resume": resume.to_json(),
        "replan_time_s": took_s,
    }


def _render(res: ReplanResult, old: Plan, resume: _Resume, out: str | None, took: float) -> None:
    s, new, console = res.survivors, res.plan, out_console()
    lost = ", ".join(f"node{i}" for i in s.lost_nodes) or "none"
    console.print(
        f"re-planned {new.model.name} for {len(new.cluster.nodes)} of {len(old.cluster.nodes)} "
        f"nodes ({new.cluster.num_gpus} of {old.cluster.num_gpus} GPUs; lost: {lost}"
        + (
            "; degraded: " + ", ".join(f"node{i} NIC x{f:g}" for i, f in s.degraded)
            if s.degraded
            else ""
        )
        + f") in {took:.2f} s",
        highlight=False,
    )
    console.print(
        f"  before: {_layout(old)}, global batch {res.old_global_batch}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"  now:    {_layout(new)}, global batch {new.training.global_batch}",
        highlight=False,
        soft_wrap=True,
    )
    o, n = res.old_estimate, res.new_estimate
    kind = "analytic estimate" if n.source == "analytic" else "measured profile"
    console.print(
        f"predicted step {format_seconds(n.step_time_s)} (was {format_seconds(o.step_time_s)}); "
        f"throughput {n.tokens_per_s:,.0f} tokens/s (was {o.tokens_per_s:,.0f}): "
        f"{100 * (res.slowdown - 1):+.1f} % time per token ({kind})",
        highlight=False,
    )
    if res.old_on_degraded is not None:
        k = res.old_on_degraded
        console.print(
            f"keeping the old plan on the degraded cluster: {format_seconds(k.step_time_s)} "
            f"per step ({k.tokens_per_s:,.0f} tokens/s)",
            highlight=False,
            soft_wrap=True,
        )
    moved = _renumbering(s)
    if moved:
        console.print(
            f"node renumbering (old -> new launch scripts): {moved}",
            highlight=False,
            soft_wrap=True,
        )
    for line in _resume_lines(resume, out):
        console.print(line, highlight=False, soft_wrap=True)
    for w in res.warnings:
        err_console().print(f"warning: {w}", highlight=False, soft_wrap=True)


def _profiles(
    path: str | None, old: Plan, surv: Survivors
) -> tuple[Profile | None, Profile | None, list[str]]:
    """(profile for the survivors, profile for the old cluster, notes). The profile must
    describe the old cluster (it is the one the job ran on) and, renumbered, the survivors."""
    from planner.profile_match import check_profile_matches

    notes = []
    if path is None:
        if old.provenance.profile_sha256:
            notes.append(
                "the old plan was made with a measured profile (sha256 "
                f"{old.provenance.profile_sha256[:12]}); pass it with --profile to re-plan with "
                "the same measurements; planning with the analytic model"
            )
        return None, None, notes
    from planner.profile import load_profile, profile_sha256
    from planner.replan import remap_profile

    profile = load_profile(path)
    check_profile_matches(profile, old.cluster, old.training, model=old.model)
    sha = profile_sha256(profile)
    if old.provenance.profile_sha256 and old.provenance.profile_sha256 != sha:
        notes.append(
            f"--profile {path} is not the profile the old plan was made with (sha256 "
            f"{sha[:12]}, the plan's {old.provenance.profile_sha256[:12]})"
        )
    remapped = remap_profile(profile, old.cluster, surv)
    for note in check_profile_matches(remapped, surv.cluster, old.training, model=old.model):
        notes.append(f"--profile {path} on the survivors: {note}")
    return remapped, profile, notes


def _emit(res: ReplanResult, emit_dir: Path, resume: _Resume) -> None:
    """The new plan's launch files, checkpointing where the old plan's did."""
    from dataclasses import fields

    from cli.launch_cmd import write_launch_dir
    from executor.emit import EmitOptions

    known = {f.name for f in fields(EmitOptions)}
    opts = {k: v for k, v in (resume.emit_options or {}).items() if k in known}
    if opts.get("rdzv_endpoint") and 0 in res.survivors.lost_nodes:
        err_console().print(
            f"warning: the rendezvous endpoint {opts['rdzv_endpoint']} was on node0, which is "
            "lost; set MESHPLAN_RDZV_ENDPOINT=HOST:PORT of the new node0 when starting, or "
            "re-emit with --rdzv-endpoint",
            highlight=False,
            soft_wrap=True,
        )
    if resume.checkpoint_dir is not None:
        opts["checkpoint_dir"] = resume.checkpoint_dir
    write_launch_dir(res.plan, emit_dir, EmitOptions(**opts), option="--emit")


@dataclass(frozen=True, kw_only=True)
class _Request:
    """The command's options, as given."""

    plan: str
    exclude: str | None
    exclude_gpus: str | None
    degrade_link: tuple[str, ...]
    keep_partial_nodes: bool
    profile: str | None
    out: str | None
    emit: str | None
    checkpoint_dir: str | None
    allow: str | None
    batch_tolerance: float
    change_batch: bool
    placement_budget_s: float
    as_json: bool


def _survivors_of(r: _Request, old: Plan) -> Survivors:
    from planner import replan as rp

    if not (r.exclude or r.exclude_gpus or r.degrade_link):
        raise SpecError(
            "nothing to re-plan for: give --exclude NODES, --exclude-gpus IDS or "
            "--degrade-link NODE:FACTOR"
        )
    return rp.survivors(
        old.cluster,
        exclude_nodes=rp.parse_nodes(r.exclude, old.cluster) if r.exclude else (),
        exclude_gpus=rp.parse_gpus(r.exclude_gpus, old.cluster) if r.exclude_gpus else (),
        degrade=rp.parse_degrades(r.degrade_link, old.cluster),
        keep_partial_nodes=r.keep_partial_nodes,
    )


def _run(r: _Request) -> None:
    """Check every option and output first, re-plan, write, then report."""
    from planner import replan as rp
    from planner.fileio import check_output_file
    from planner.plan import load_plan, save_plan
    from planner.search_space import SearchOptions, parse_allow

    start = time.perf_counter()
    check_positive_float("--placement-budget-s", r.placement_budget_s)
    check_positive_float("--batch-tolerance", r.batch_tolerance)
    allow = parse_allow(r.allow)
    out_path = check_output_file(r.out, "--out") if r.out else None
    emit_dir = None
    if r.emit:
        from cli.launch_cmd import check_launch_dir

        emit_dir = check_launch_dir(r.emit, "--emit")
    old = load_plan(r.plan)
    surv = _survivors_of(r, old)
    new_prof, old_prof, notes = _profiles(r.profile, old, surv)
    for note in notes:
        err_console().print(f"note: {note}", highlight=False, soft_wrap=True)
    res = rp.replan(
        old,
        surv,
        profile=new_prof,
        old_profile=old_prof,
        options=SearchOptions(top_k=1, allow=allow),
        placement_budget_s=r.placement_budget_s,
        batch_tolerance=r.batch_tolerance,
        change_batch=r.change_batch,
    )
    resume = _resume_info(Path(r.plan), r.checkpoint_dir, old)
    if out_path is not None:
        save_plan(res.plan, out_path)
    if emit_dir is not None:
        _emit(res, emit_dir, resume)
    took = time.perf_counter() - start
    if r.as_json:
        print_json(_doc(res, old, resume, r.out, took))
        return
    _render(res, old, resume, r.out, took)
    for path, what in ((r.out, "plan"), (r.emit, "launch files")):
        if path:
            err_console().print(f"wrote {what}: {path}")


def register(app: typer.Typer) -> None:
    @app.command("replan")
    def replan_cmd(
        plan: str = typer.Argument(
            ..., help="plan.json of the job (a launch directory's, ideally)."
        ),
        exclude: str = typer.Option(None, "--exclude", help="Lost nodes, e.g. node3,node7."),
        exclude_gpus: str = typer.Option(
            None, "--exclude-gpus", help="Lost GPUs by the plan's global id, e.g. 17,42."
        ),
        degrade_link: list[str] = typer.Option(
            None, "--degrade-link", help="NODE:FACTOR, a node's NICs at FACTOR of their bandwidth."
        ),
        keep_partial_nodes: bool = typer.Option(
            False,
            "--keep-partial-nodes",
            help="Plan with the healthy GPUs of a node that lost some (launch files need equal "
            "GPUs per node, so such a plan cannot be emitted).",
        ),
        profile: str = PROFILE_OPTION,
        out: str = typer.Option(None, "--out", help="Write the new plan.json here."),
        emit: str = typer.Option(
            None, "--emit", help="Also write the new plan's launch files here (same checkpoints)."
        ),
        checkpoint_dir: str = typer.Option(
            None,
            "--checkpoint-dir",
            help="The job's checkpoint directory (default: launch.json's).",
        ),
        allow: str = typer.Option(None, "--allow", help="Widen the search, as for `plan`."),
        batch_tolerance: float = typer.Option(
            0.01,
            "--batch-tolerance",
            help="When the global batch no longer divides a layout: compare batches this close.",
        ),
        change_batch: bool = typer.Option(
            False,
            "--change-batch",
            help="Plan the fastest global batch within --batch-tolerance, even when the old one "
            "still divides a layout.",
        ),
        placement_budget_s: float = typer.Option(
            3.0, "--placement-budget-s", help="Time for rank placement on large clusters."
        ),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Plan the same model and training on what is left after nodes or GPUs fail."""
        _run(
            _Request(
                plan=plan,
                exclude=exclude,
                exclude_gpus=exclude_gpus,
                degrade_link=tuple(degrade_link or ()),
                keep_partial_nodes=keep_partial_nodes,
                profile=profile,
                out=out,
                emit=emit,
                checkpoint_dir=checkpoint_dir,
                allow=allow,
                batch_tolerance=batch_tolerance,
                change_batch=change_batch,
                placement_budget_s=placement_budget_s,
                as_json=as_json,
            )
        )
