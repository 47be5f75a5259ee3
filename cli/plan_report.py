"""The report of one plan: the per-op pipeline timeline, the memory picture and HTML sections.

Owns: `timeline_events` (a replay of the cost model's schedule with per-op start/end times),
`write_plan_report` (timeline + memory PNG/SVG for `meshplan plan --report DIR`; it checks
matplotlib and the directory first), `ensure_output_dir` (check and create an output directory),
the HTML sections of a plan and of a validation report, and the scatter points of a validation.
Does not own: predictions (planner/cost/), drawing (cli/report_render.py) or measuring
(cli/validate_cmd.py). planner/ is imported inside the functions, as commands do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A Gantt chart of more ops than this is unreadable and slow to draw; longer plans are shown
# with fewer micro-batches (the steady state repeats). Unit: ops (one chunk's fwd or bwd).
MAX_TIMELINE_OPS = 400


def config_label(c: Any) -> str:
    """Short stable name of a configuration, e.g. `tp1pp2dp1-mb2-full`."""
    label = f"tp{c.tp}pp{c.pp}dp{c.dp}-mb{c.micro_batch}-{c.recompute.value}"
    if c.schedule.value != "1f1b":
        label += f"-{c.schedule.value}" + (f"{c.virtual_stages}" if c.virtual_stages > 1 else "")
    if c.zero:
        label += f"-z{c.zero}"
    if c.sequence_parallel:
        label += "-sp"
    if c.stage_layers and len(set(c.stage_layers)) > 1:
        label += "-split" + "_".join(str(n) for n in c.stage_layers)
    return label


# ---------------------------------------------------------------- timeline replay


def timeline_events(
    model: Any,
    training: Any,
    cluster: Any,
    config: Any,
    profile: Any,
    estimate_json: dict[str, Any],
) -> tuple[list[dict[str, Any]], float, str]:
    """Per-op start/end times of one step, replayed over the cost model's own per-chunk times.

    The cost model's simulation (planner/cost/schedule.py) returns only the makespan and rank
    finish times, so this replays the same op order (`rank_orders`) with the same dependency
    rules (an op waits for its rank's previous op and its producer chunk plus the p2p time) and
    records when each op ran; forward/backward are split into compute and TP communication.
    Returns (events, makespan_s, caption).
    """
    from planner.cost.analytic import DEFAULT_CONSTANTS
    from planner.cost.rankcosts import build_rank_costs
    from planner.cost.schedule import rank_orders

    rc = build_rank_costs(model, training, cluster, config, profile, DEFAULT_CONSTANTS)
    pp, v, m_full = rc.pp, rc.virtual_stages, rc.num_micro_batches
    chunks = pp * v
    m = m_full
    while m > pp and 2 * chunks * m > MAX_TIMELINE_OPS:
        m -= pp if config.schedule.value == "interleaved" else 1
    split = config.layers_per_chunk(model)

    def part(k: int, attr: str) -> float:
        t = split[k] * getattr(rc.block[k % pp], attr)
        t += getattr(rc.embedding, attr) if k == 0 else 0.0
        t += getattr(rc.head, attr) if k == chunks - 1 else 0.0
        return t

    cost = {
        k: (
            part(k, "fwd_compute_s"),
            part(k, "fwd_tp_s"),
            part(k, "bwd_compute_s"),
            part(k, "bwd_tp_s"),
        )
        for k in range(chunks)
    }
    p2p = [rc.p2p_s[k % pp] for k in range(chunks - 1)]
    orders = rank_orders(config.schedule.value, pp, v, m)
    f_end = [[-1.0] * m for _ in range(chunks)]
    b_end = [[-1.0] * m for _ in range(chunks)]
    ptr, free = [0] * pp, [0.0] * pp
    events: list[dict[str, Any]] = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        before = remaining
        for r in range(pp):
            while ptr[r] < len(orders[r]):
                is_f, c, j = orders[r][ptr[r]]
                src = c - 1 if is_f else c + 1
                if is_f and c == 0:
                    ready = 0.0
                elif not is_f and c == chunks - 1:
                    ready = f_end[c][j]
                else:
                    dep = (f_end if is_f else b_end)[src][j]
                    if dep < 0:
                        break
                    hop = p2p[min(c, src)]
                    if hop > 0:
                        events.append(
                            {"rank": r, "kind": "communication", "start_s": dep, "end_s": dep + hop}
                        )
                    ready = dep + hop
                if ready < 0:
                    break
                comp, tp_s = (cost[c][0], cost[c][1]) if is_f else (cost[c][2], cost[c][3])
                start = max(free[r], ready)
                label = f"{j}" if v == 1 else f"{j}.{c // pp}"
                kind = "forward" if is_f else "backward"
                events.append(
                    {
                        "rank": r,
                        "kind": kind,
                        "start_s": start,
                        "end_s": start + comp,
                        "label": label,
                    }
                )
                if tp_s > 0:
                    events.append(
                        {
                            "rank": r,
                            "kind": "communication",
                            "start_s": start + comp,
                            "end_s": start + comp + tp_s,
                        }
                    )
                free[r] = start + comp + tp_s
                (f_end if is_f else b_end)[c][j] = free[r]
                ptr[r] += 1
                remaining -= 1
        if remaining == before:
            raise AssertionError("timeline replay deadlocked")
    pipeline_s = max(free)
    bd = estimate_json.get("breakdown", {})
    tail = [
        ("communication", float(bd.get("dp_comm_s", 0.0))),
        ("optimizer", float(bd.get("optimizer_s", 0.0))),
    ]
    end = pipeline_s
    for kind, dur in tail:
        if dur > 0:
            events += [
                {"rank": r, "kind": kind, "start_s": end, "end_s": end + dur} for r in range(pp)
            ]
            end += dur
    caption = (
        f"Replayed from the cost model's per-chunk times ({rc.source}); DP synchronisation and the "
        "optimizer step after the pipeline are the critical rank's (estimate breakdown)."
    )
    if m != m_full:
        caption += (
            f" Shown with {m} of the plan's {m_full} micro-batches (the steady state repeats)."
        )
    else:
        predicted = float(estimate_json.get("step_time_s", end))
        if predicted > 0 and abs(end - predicted) / predicted > 0.01:
            caption += (
                f" Replay ends at {end * 1e3:.2f} ms; the estimate says {predicted * 1e3:.2f} ms."
            )
    return events, end, caption


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
    cfg_rows = [[f, getattr(getattr(c, f), "value", getattr(c, f))] for f in FIXABLE]
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
