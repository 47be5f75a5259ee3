"""The report of one plan: the per-op pipeline timeline, the memory picture and HTML sections.

Owns: `timeline_events` (the figure's events from the schedule simulator's trace,
planner/cost/schedule.py, over the estimate's per-chunk times),
`write_plan_report` (timeline + memory PNG/SVG for `meshplan plan --report DIR`; it checks
matplotlib and the directory first), `ensure_output_dir` (check and create an output directory),
the HTML sections of a plan and of a validation report, and the scatter points of a validation.
Does not own: predictions (planner/cost/), drawing (cli/report_render.py) or measuring
(cli/validate_cmd.py). planner/ is imported inside the functions, as commands do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planner.cost.schedule import OpKind, TraceOp

# A Gantt chart of more ops than this is unreadable and slow to draw; longer plans are shown
# with fewer micro-batches (the steady state repeats). Unit: ops (one chunk's fwd or bwd).
MAX_TIMELINE_OPS = 400


def config_label(c: Any) -> str:
    """Short stable name of a configuration, e.g. `tp1pp2dp1-mb2-full`."""
    cp = f"cp{c.cp}" if c.cp > 1 else ""
    label = f"tp{c.tp}pp{c.pp}dp{c.dp}{cp}-mb{c.micro_batch}-{c.recompute.value}"
    if c.schedule.value != "1f1b":
        label += f"-{c.schedule.value}" + (f"{c.virtual_stages}" if c.virtual_stages > 1 else "")
    if c.zero:
        label += f"-z{c.zero}"
    if c.sequence_parallel:
        label += "-sp"
    if c.stage_layers and len(set(c.stage_layers)) > 1:
        label += "-split" + "_".join(str(n) for n in c.stage_layers)
    return label


# ---------------------------------------------------------------- timeline


def timeline_events(
    model: Any,
    training: Any,
    cluster: Any,
    config: Any,
    profile: Any,
    estimate_json: dict[str, Any],
) -> tuple[list[dict[str, Any]], float, str]:
    """Per-op start/end times of one step: the trace of the cost model's own schedule
    simulation (`planner.cost.schedule.simulate(..., trace=True)`) over the estimate's
    per-chunk times (`planner.cost.estimate.chunk_times`), nothing simulated here.

    Each forward/backward op is drawn as its compute followed by its TP collectives (the two
    parts the chunk time sums); a p2p wait as communication on the receiving rank. DP
    synchronisation and the optimizer step after the pipeline are the critical rank's (the
    estimate's breakdown). Returns (events, end_s, caption).
    """
    from planner.cost.analytic import DEFAULT_CONSTANTS
    from planner.cost.estimate import chunk_times
    from planner.cost.rankcosts import build_rank_costs
    from planner.cost.schedule import OpKind, simulate

    rc = build_rank_costs(model, training, cluster, config, profile, DEFAULT_CONSTANTS)
    pp, v, m_full = rc.pp, rc.virtual_stages, rc.num_micro_batches
    chunks = pp * v
    m = m_full
    while m > pp and 2 * chunks * m > MAX_TIMELINE_OPS:
        m -= pp if config.schedule.value == "interleaved" else 1
    split = config.layers_per_chunk(model)
    sim = simulate(
        config.schedule.value,
        pp=pp,
        virtual_stages=v,
        num_micro_batches=m,
        fwd_s=chunk_times(rc, split, "fwd_s"),
        bwd_s=chunk_times(rc, split, "bwd_s"),
        p2p_s=tuple(rc.p2p_s[k % pp] for k in range(chunks - 1)),
        trace=True,
    )
    events = _trace_events(
        sim.trace,
        compute_s={
            OpKind.FORWARD: chunk_times(rc, split, "fwd_compute_s"),
            OpKind.BACKWARD: chunk_times(rc, split, "bwd_compute_s"),
        },
        # the op's communication: TP collectives and the MoE all-to-all (0 when dense)
        tp_s={
            kind: tuple(
                a + b
                for a, b in zip(
                    chunk_times(rc, split, f"{pass_}_tp_s"),
                    chunk_times(rc, split, f"{pass_}_ep_s"),
                    strict=True,
                )
            )
            for kind, pass_ in ((OpKind.FORWARD, "fwd"), (OpKind.BACKWARD, "bwd"))
        },
        pp=pp,
        v=v,
    )
    bd = estimate_json.get("breakdown", {})
    tail = [
        ("communication", float(bd.get("dp_comm_s", 0.0))),
        ("optimizer", float(bd.get("optimizer_s", 0.0))),
    ]
    end = sim.makespan_s
    for kind, dur in tail:
        if dur > 0:
            events += [
                {"rank": r, "kind": kind, "start_s": end, "end_s": end + dur} for r in range(pp)
            ]
            end += dur
    caption = (
        f"The cost model's schedule simulation over its per-chunk times ({rc.source}); DP "
        "synchronisation and the optimizer step after the pipeline are the critical rank's "
        "(estimate breakdown)."
    )
    if m != m_full:
        caption += (
            f" Shown with {m} of the plan's {m_full} micro-batches (the steady state repeats)."
        )
    else:
        predicted = float(estimate_json.get("step_time_s", end))
        if predicted > 0 and abs(end - predicted) / predicted > 0.01:
            caption += (
                f" The timeline ends at {end * 1e3:.2f} ms; the estimate says "
                f"{predicted * 1e3:.2f} ms."
            )
    return events, end, caption


def _trace_events(
    trace: Sequence[TraceOp],
    *,
    compute_s: dict[OpKind, tuple[float, ...]],
    tp_s: dict[OpKind, tuple[float, ...]],
    pp: int,
    v: int,
) -> list[dict[str, Any]]:
    """The figure's events of a simulator trace: a forward/backward op becomes its compute bar
    (labelled micro-batch, or micro-batch.virtual stage) and, when the chunk has TP collectives,
    a communication bar after it; a p2p op a communication bar."""
    from planner.cost.schedule import OpKind

    events: list[dict[str, Any]] = []
    for op in trace:
        if op.kind is OpKind.P2P:
            events.append(
                {"rank": op.rank, "kind": "communication", "start_s": op.start_s, "end_s": op.end_s}
            )
            continue
        split = min(op.start_s + compute_s[op.kind][op.chunk], op.end_s)
        label = f"{op.micro_batch}" if v == 1 else f"{op.micro_batch}.{op.chunk // pp}"
        events.append(
            {
                "rank": op.rank,
                "kind": op.kind.value,
                "start_s": op.start_s,
                "end_s": split,
                "label": label,
            }
        )
        if tp_s[op.kind][op.chunk] > 0:
            events.append(
                {"rank": op.rank, "kind": "communication", "start_s": split, "end_s": op.end_s}
            )
    return events


# ---------------------------------------------------------------- plan report


def _memory_stages(estimate_json: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": f"stage {s['pp_rank']}", **s.get("memory", {})}
        for s in estimate_json.get("stages", [])
    ]


def write_plan_report(
    plan: Any,
    estimate_json: dict[str, Any],
    out_dir: str | Path,
    profile: Any = None,
    option: str = "--report",
) -> list[Path]:
    """Timeline and memory pictures (PNG + SVG) of a plan in `out_dir`; returns the paths.

    `estimate_json` is the cost model's `Estimate.to_json()` for the plan (usually
    `plan.prediction`); `profile` the Profile it was made with (None: analytic). `option` names
    the directory in errors: a missing matplotlib or an unwritable directory is one SpecError.
    """
    from cli import report_render as rr

    rr.require_matplotlib(option)
    out = ensure_output_dir(out_dir, option)
    c = plan.config
    events, end, _ = timeline_events(
        plan.model, plan.training, plan.cluster, c, profile, estimate_json
    )
    name = f"{plan.model.name}: {config_label(c)}"
    paths = rr.save_figure(
        rr.timeline_figure(events, ranks=c.pp, makespan_s=end, title=f"Pipeline timeline, {name}"),
        out / "timeline",
        option,
    )
    stages = _memory_stages(estimate_json)
    capacity = min((s["capacity_bytes"] for s in estimate_json.get("stages", [])), default=None)
    paths += rr.save_figure(
        rr.memory_figure(
            stages, capacity_bytes=capacity, title=f"Predicted memory per device, {name}"
        ),
        out / "memory",
        option,
    )
    return paths


def ensure_output_dir(path: str | Path, option: str) -> Path:
    """Check the output directory (planner/fileio.py) and create it; errors are one SpecError."""
    from planner.errors import SpecError
    from planner.fileio import check_output_dir

    out = check_output_dir(path, option)
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise SpecError(
            f"{option} {out}: cannot create the directory ({e.strerror or e})"
        ) from None
    return out


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def plan_sections(
    plan: Any, estimate_json: dict[str, Any], out: Path, profile: Any, option: str = "--out"
) -> list[tuple[str, str]]:
    """The plan's HTML sections; draws its pictures into `out` (named by `option` in errors)."""
    from cli import report_render as rr
    from cli.common import format_bytes
    from planner.search_space import FIXABLE

    c = plan.config
    shown = [
        f
        for f in FIXABLE
        if (f != "ep" or c.ep > 1) and (c.cp > 1 or f not in ("cp", "cp_attention"))
    ]
    cfg_rows = [[f, getattr(getattr(c, f), "value", getattr(c, f))] for f in shown]
    cfg_rows += [
        ["micro-batches", plan.num_micro_batches],
        ["source", estimate_json.get("source", "?")],
    ]
    bd = estimate_json.get("breakdown", {})
    time_rows = [["step time", fmt_ms(estimate_json.get("step_time_s"))]]
    time_rows += [[k.removesuffix("_s"), fmt_ms(v)] for k, v in bd.items()]
    stage_rows = [
        [
            s["pp_rank"],
            s["layers"],
            fmt_ms(s["time_s"]),
            format_bytes(s["memory_bytes"]),
            format_bytes(s["capacity_bytes"]),
        ]
        for s in estimate_json.get("stages", [])
    ]
    _, _, caption = timeline_events(
        plan.model, plan.training, plan.cluster, c, profile, estimate_json
    )
    write_plan_report(plan, estimate_json, out, profile, option)
    notes = "".join(f"<li>{n}</li>" for n in estimate_json.get("notes", []))
    return [
        ("Configuration", rr.html_table(["field", "value"], cfg_rows)),
        (
            "Predicted step time (ms)",
            rr.html_table(["term", "ms"], time_rows) + f"<ul class='note'>{notes}</ul>",
        ),
        (
            "Stages",
            rr.html_table(
                ["pipeline rank", "layers", "time per micro-batch (ms)", "memory", "capacity"],
                stage_rows,
            ),
        ),
        (
            "Pipeline timeline",
            f"<figure>{rr.inline_svg(out / 'timeline.svg')}<figcaption class='note'>{caption}</figcaption></figure>",
        ),
        ("Memory per device", f"<figure>{rr.inline_svg(out / 'memory.svg')}</figure>"),
    ]


def validation_sections(report: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    from cli import report_render as rr

    s = report["summary"]
    t = s.get("top_choice") or {}
    rows = []
    for r in report["records"]:
        rows.append(
            [
                r["label"],
                r["planner_rank"],
                fmt_ms(r["predicted_step_time_s"]),
                fmt_ms(r.get("measured_step_time_s")),
                fmt_pct(r.get("error_fraction")),
                r.get("error") or "",
            ]
        )
    head = (
        f"<p>MAPE {fmt_pct(s.get('mape'))} over {s['measured']} of {s['configurations']} configurations; "
        f"Spearman rank correlation {s.get('spearman') if s.get('spearman') is None else round(s['spearman'], 3)}; "
        f"planner's top choice {t.get('top_label', '-')} vs measured best {t.get('best_label', '-')} "
        f"(loss {fmt_pct(t.get('loss_fraction'))}).</p>"
    )
    table = rr.html_table(
        ["configuration", "planner rank", "predicted (ms)", "measured (ms)", "error", "run error"],
        rows,
    )
    fig = (
        f"<figure>{rr.inline_svg(out / 'scatter.svg')}</figure>"
        if (out / "scatter.svg").is_file()
        else ""
    )
    return [("Predicted vs measured", head + table + fig)]


def scatter_points(records: list[Any]) -> list[dict[str, Any]]:
    done = [r for r in records if r.measured_step_time_s is not None]
    top = min(done, key=lambda r: (r.predicted_step_time_s, r.planner_rank)) if done else None
    return [
        {
            "label": r.label,
            "predicted_s": r.predicted_step_time_s,
            "measured_s": r.measured_step_time_s,
            "top": r is top,
        }
        for r in done
    ]
