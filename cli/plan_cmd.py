"""`meshplan plan`: search the fastest configuration that fits, show the alternatives and why.

Owns: the command's options, the progress bar, the rich table of the top-k, the winner's
stage split, the "why this plan" paragraph, the `--json` document and writing `--out`.
Does not own: the search (planner/search.py), the cost model (planner/cost/) or the plan
format (planner/plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.common import (
    CLUSTER_OPTION,
    DTYPE_OPTION,
    FLASH_OPTION,
    GLOBAL_BATCH_OPTION,
    GRAD_DTYPE_OPTION,
    JSON_OPTION,
    MEMORY_HEADROOM_OPTION,
    MODEL_OPTION,
    NODES_OPTION,
    PROFILE_OPTION,
    SEQ_LEN_OPTION,
    check_positive_float,
    err_console,
    format_bytes,
    format_seconds,
    load_cluster_arg,
    load_model_arg,
    load_profile_for,
    out_console,
    print_json,
    training_from_args,
)
from cli.stdio import data_stream
from planner.errors import SpecError
from planner.search_space import FIXABLE

CONFIG_FIELDS = FIXABLE
GIB = 2**30
# Columns the top-k table needs to print one line per configuration (characters).
TABLE_WIDTH = 112
# Above this many model chunks the split is shown per pipeline rank (rows).
MAX_CHUNK_ROWS = 16
# Shares of the step below this are not worth naming as a limit (fraction of step time).
MINOR_SHARE = 0.02
# Peak memory above this fraction of capacity is called "nearly full" (fraction).
NEARLY_FULL = 0.9


def placement_json(placement: Any, resplit: bool) -> dict[str, Any]:
    return {
        "method": placement.method,
        "objective": placement.objective,
        "step_time_s": placement.step_time_s,
        "default_order_step_time_s": placement.default_step_time_s,
        "speedup": placement.speedup,
        "explanation": list(placement.explanation),
        "resplit_layers": resplit,
    }


def plan_json(result: Any, training: Any) -> dict[str, Any]:
    """The `--json` document: estimate fields + config per plan, then the search counters."""
    plans = []
    for p in result.plans:
        data = p.estimate.to_json()
        # ep omitted at 1, as in plan.json, so dense documents keep their keys
        cfg = {
            name: getattr(p.config, name)
            for name in CONFIG_FIELDS
            if name != "ep" or p.config.ep != 1
        }
        cfg["stage_layers"] = p.config.stage_layers
        cfg["rank_to_gpu"] = p.config.rank_to_gpu
        data["config"] = cfg
        data["num_micro_batches"] = p.config.num_micro_batches(training)
        data["split_status"] = p.split_status.value
        plans.append(data)
    return {
        "plans": plans,
        "candidates_considered": result.candidates_considered,
        "candidates_pruned": result.candidates_pruned,
        "candidates_evaluated": result.candidates_evaluated,
        "pruned_by": dict(result.pruned_by),
        "search_complete": result.complete,
        "search_time_s": result.search_time_s,
        **({"search_notes": list(result.notes)} if result.notes else {}),
    }


def _schedule_text(c: Any) -> str:
    return c.schedule.value + (f" v={c.virtual_stages}" if c.virtual_stages > 1 else "")


def _degrees(c: Any, with_ep: bool) -> str:
    return f"{c.tp}·{c.pp}·{c.dp}" + (f"·{c.ep}" if with_ep else "")


def _table(result: Any) -> Table:
    table = Table(title="best configurations (fastest first)", box=box.SIMPLE_HEAD, pad_edge=False)
    # MoE plans: the expert-parallel degree and the all-to-all share of the step
    moe = any(p.config.ep > 1 or p.estimate.breakdown.ep_comm_s for p in result.plans)
    with_cp = any(p.config.cp > 1 for p in result.plans)
    degrees = "tp·pp·dp" + ("·ep" if moe else "") + ("·cp" if with_cp else "")
    for col in (
        "#",
        degrees,
        "mb",
        "schedule",
        "recompute",
        "sp",
        "ZeRO",
        "step",
        "tokens/s",
        "MFU",
        "mem/cap GiB",
        *(("a2a",) if moe else ()),
    ):
        table.add_column(col, justify="left" if col in ("schedule", "recompute") else "right")
    for i, p in enumerate(result.plans):
        c, e = p.config, p.estimate
        table.add_row(
            str(i + 1),
            _degrees(c, moe) + (f"·{c.cp}" if with_cp else ""),
            str(c.micro_batch),
            _schedule_text(c),
            c.recompute.value,
            "on" if c.sequence_parallel else "off",
            str(c.zero),
            format_seconds(e.step_time_s),
            f"{e.tokens_per_s:,.0f}",
            f"{100 * e.mfu:.1f}%",
            f"{e.peak_memory_bytes / GIB:.1f}/{e.memory_capacity_bytes / GIB:.1f}",
            *((f"{100 * e.breakdown.ep_comm_s / e.step_time_s:.1f}%",) if moe else ()),
        )
    return table


def _split_table(plan: Any, model: Any) -> Table:
    """One row per chunk; with many chunks (interleaved), one row per pipeline rank."""
    c = plan.config
    table = Table(title="winner's layer split", box=box.SIMPLE_HEAD)
    last = c.num_chunks - 1
    ranges = c.layer_ranges(model)
    if c.num_chunks <= MAX_CHUNK_ROWS:
        for col in ("chunk", "pp rank", "blocks", "layers", "also holds"):
            table.add_column(col, justify="right" if col != "also holds" else "left")
        for k, (a, b) in enumerate(ranges):
            extra = ", ".join(
                name
                for name, on in (("embedding", k == 0), ("norm + head + loss", k == last))
                if on
            )
            table.add_row(str(k), str(k % c.pp), str(b - a), f"{a}-{b - 1}", extra)
        return table
    for col in ("pp rank", "blocks", "blocks per chunk", "also holds"):
        table.add_column(col, justify="right" if col != "also holds" else "left")
    for r in range(c.pp):
        counts = [b - a for k, (a, b) in enumerate(ranges) if k % c.pp == r]
        extra = ", ".join(
            name
            for name, on in (("embedding", r == 0), ("norm + head + loss", r == last % c.pp))
            if on
        )
        table.add_row(str(r), str(sum(counts)), " ".join(map(str, counts)), extra)
    return table


def why_this_plan(result: Any) -> str:
    """One paragraph: what the winner spends its step on, what limits it, how it compares."""
    best = result.plans[0]
    c, e = best.config, best.estimate
    bd = e.breakdown
    step = e.step_time_s
    parts = {
        "pipeline bubble": bd.bubble_s,
        "tensor-parallel communication": bd.tp_comm_s,
        "expert-parallel all-to-all": bd.ep_comm_s,
        "context-parallel communication": bd.cp_comm_s,
        "pipeline p2p communication": bd.pp_comm_s,
        "exposed data-parallel communication": bd.dp_comm_s,
        "the optimizer step": bd.optimizer_s,
    }
    name, worst = max(parts.items(), key=lambda kv: (kv[1], kv[0]))
    ep = f" ep={c.ep}" if c.ep > 1 else ""
    cp = f" cp={c.cp}" if c.cp > 1 else ""
    text = [
        f"tp={c.tp} pp={c.pp} dp={c.dp}{ep}{cp} (micro-batch {c.micro_batch}, {_schedule_text(c)}, "
        f"recompute {c.recompute.value}, ZeRO-{c.zero}) is predicted fastest at "
        f"{format_seconds(step)} per step ({100 * e.mfu:.1f} % MFU); compute is "
        f"{100 * bd.compute_s / step:.0f} % of the step."
    ]
    if c.cp > 1:
        text.append(
            f"Each sequence is split over {c.cp} GPUs (context parallelism, load-balanced causal "
            f"chunks: CP rank i holds chunks i and {2 * c.cp - 1}-i of {2 * c.cp}); attention "
            + (
                "swaps sequence for heads with all-to-alls (Ulysses), "
                if c.cp_attention.value == "ulysses"
                else "all-gathers K and V over the CP group, "
            )
            + f"{100 * bd.cp_comm_s / step:.1f} % of the step."
        )
    if worst / step >= MINOR_SHARE:
        text.append(f"Its main overhead is {name} ({100 * worst / step:.1f} % of the step).")
    else:
        text.append("No overhead exceeds 2 % of the step.")
    used = e.peak_memory_bytes / e.memory_capacity_bytes
    if used >= NEARLY_FULL:
        text.append(
            f"Memory is nearly full ({100 * used:.0f} % of {format_bytes(e.memory_capacity_bytes)} on "
            "the fullest GPU), which is what rules out larger micro-batches or less recompute."
        )
    else:
        text.append(f"The fullest GPU uses {100 * used:.0f} % of its memory.")
    savers = [f"recompute {c.recompute.value}"] if c.recompute.value != "none" else []
    savers += [f"ZeRO-{c.zero}"] if c.zero > 0 else []
    savers += ["sequence parallelism"] if c.sequence_parallel else []
    if savers:
        text.append(f"Memory savers in use: {', '.join(savers)}.")
    if len(result.plans) > 1:
        runner = result.plans[1]
        gap = runner.estimate.step_time_s / step - 1
        rc = runner.config
        text.append(
            f"The runner-up (tp={rc.tp} pp={rc.pp} dp={rc.dp}"
            f"{f' ep={rc.ep}' if rc.ep > 1 else ''}{f' cp={rc.cp}' if rc.cp > 1 else ''} "
            f"mb={rc.micro_batch} "
            f"{_schedule_text(rc)} recompute {rc.recompute.value} ZeRO-{rc.zero}) is "
            f"{100 * gap:.2f} % slower."
        )
    return " ".join(text)


def _render(result: Any, model: Any, cluster: Any) -> None:
    out = out_console()
    best = result.plans[0]
    if best.estimate.source == "analytic":
        out.print(
            "[bold yellow]analytic estimate[/] (no measured profile; times from datasheet peaks "
            "and calibrated efficiency constants)"
        )
    else:
        out.print(
            "[bold green]measured[/] (block times and links from the profile given with --profile)"
        )
    if best.estimate.corrections is not None:
        out.print(f"[bold]{best.estimate.corrections['note']}[/]", highlight=False)
    out.print(
        f"{model.name} on {cluster.name} ({cluster.num_gpus} GPUs): "
        f"{result.candidates_considered} candidates considered, {result.candidates_pruned} pruned "
        f"({', '.join(f'{k} {v}' for k, v in result.pruned_by.items() if v)}), "
        f"{result.candidates_evaluated} priced in full, {result.search_time_s:.2f} s"
        + ("" if result.complete else " [yellow](stopped by --max-time-s: not exhaustive)[/]")
    )
    # Pipes get rich's default 80 columns, which would wrap every row of this table.
    wide = out if out.width >= TABLE_WIDTH else Console(file=data_stream(), width=TABLE_WIDTH)
    wide.print(_table(result))
    out.print(_split_table(best, model))
    out.print(why_this_plan(result))
    for note in (*result.notes, *best.estimate.notes):
        err_console().print(f"note: {note}")


def _render_placement(planned: Any) -> None:
    pl = planned.placement
    out = out_console()
    if pl.speedup > 1.0:
        out.print(
            f"placement ({pl.method}): {100 * (pl.speedup - 1):.1f} % faster than the default rank "
            f"order ({format_seconds(pl.default_step_time_s)} -> {format_seconds(pl.step_time_s)})"
            + ("; layers re-split for the placed stage speeds" if planned.resplit else "")
        )
    else:
        out.print(f"placement ({pl.method}): the default rank order (tp innermost) is already best")
    for line in pl.explanation:
        out.print(f"  - {line}")


@dataclass(frozen=True)
class _Outputs:
    """The output paths of one `plan` run, checked before the search starts."""

    plan_path: Path | None
    emit_dir: Path | None
    report_dir: Path | None


def _check_outputs(out: str | None, emit: str | None, report: str | None) -> _Outputs:
    """Refuse every unwritable output before any work, so nothing is half-written."""
    from planner.fileio import check_output_dir, check_output_file

    plan_path = check_output_file(out, "--out") if out else None
    emit_dir = check_output_dir(emit, "--emit") if emit else None
    if emit_dir is not None:
        from cli.launch_cmd import check_launch_dir

        check_launch_dir(emit_dir, "--emit")
    report_dir = check_output_dir(report, "--report") if report else None
    if report_dir is not None:
        from cli.report_render import require_matplotlib

        require_matplotlib("--report")
    return _Outputs(plan_path=plan_path, emit_dir=emit_dir, report_dir=report_dir)


def _search_and_place(
    model: Any, training: Any, cluster: Any, options: Any, prof: Any, budget_s: float
) -> tuple[Any, Any]:
    """The search, then rank placement of the winner, under one progress bar on stderr."""
    from planner.planning import place_winner
    from planner.search import search

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console(),
        transient=True,
    ) as bar:
        task = bar.add_task("searching", total=None)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        result = search(model, training, cluster, options, profile=prof, progress=progress)
        bar.update(task, description="placing ranks", completed=0, total=None)
        planned = place_winner(model, training, cluster, result, prof, time_budget_s=budget_s)
    return replace(result, plans=planned.plans), planned


def _write_outputs(
    outputs: _Outputs, result: Any, model: Any, training: Any, cluster: Any, prof: Any
) -> None:
    """plan.json (--out), the launch directory (--emit, with its own plan.json) and pictures."""
    from planner.plan import build_plan, save_plan
    from planner.profile import profile_sha256

    best = result.plans[0]
    plan = build_plan(
        model=model,
        training=training,
        cluster=cluster,
        config=best.config,
        prediction=best.estimate.to_json(),
        source=best.estimate.source,
        profile_sha256=profile_sha256(prof) if prof else None,
    )
    if outputs.emit_dir is not None:
        from cli.launch_cmd import write_launch_dir
        from executor.emit import EmitOptions

        write_launch_dir(plan, outputs.emit_dir, EmitOptions(), option="--emit")
    if outputs.plan_path is not None:
        save_plan(plan, outputs.plan_path)
    if outputs.report_dir is not None:
        from cli.plan_report import write_plan_report

        write_plan_report(plan, plan.prediction, outputs.report_dir, prof)


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        model: str = MODEL_OPTION,
        cluster: str = CLUSTER_OPTION,
        nodes: int = NODES_OPTION,
        global_batch: int = GLOBAL_BATCH_OPTION,
        seq_len: int = SEQ_LEN_OPTION,
        profile: str = PROFILE_OPTION,
        top: int = typer.Option(5, "--top", help="How many configurations to show."),
        out: str = typer.Option(None, "--out", help="Write the winner as plan.json here."),
        as_json: bool = JSON_OPTION,
        allow: str = typer.Option(
            None,
            "--allow",
            help="Widen the search: tp (tensor parallel across nodes), zero (ZeRO-2/3 with "
            "pipelining), gpipe (the GPipe schedule), ep (expert parallel across nodes); "
            "comma-separated.",
        ),
        fix: list[str] = typer.Option(
            None,
            "--fix",
            help="Pin config fields, e.g. --fix tp=8,pp=4 --fix schedule=interleaved. Fields: "
            "tp, pp, dp, micro_batch, schedule, virtual_stages, recompute, "
            "sequence_parallel, zero, ep (expert parallel, MoE models).",
        ),
        max_time_s: float = typer.Option(
            None, "--max-time-s", help="Stop searching after this many seconds (best so far)."
        ),
        dtype: str = DTYPE_OPTION,
        grad_dtype: str = GRAD_DTYPE_OPTION,
        flash_attention: bool = FLASH_OPTION,
        memory_headroom: float = MEMORY_HEADROOM_OPTION,
        placement_budget_s: float = typer.Option(
            3.0,
            "--placement-budget-s",
            help="Time for the rank-placement search on large clusters.",
        ),
        emit: str = typer.Option(
            None, "--emit", help="Also write launch files here (the plan is DIR/plan.json)."
        ),
        report: str = typer.Option(None, "--report", help="Also write the plan's pictures here."),
    ) -> None:
        """Search the fastest parallel configuration that fits memory; show the top-k and why."""
        from planner.search_space import SearchOptions, parse_allow, parse_fix

        check_positive_float("--placement-budget-s", placement_budget_s)
        check_positive_float("--max-time-s", max_time_s)
        if top < 1:
            raise SpecError(f"--top {top}: must be >= 1")
        outputs = _check_outputs(out, emit, report)
        options = SearchOptions(
            top_k=top,
            allow=parse_allow(allow),
            fix=parse_fix(fix or []),
            max_time_s=max_time_s,
        )
        model_spec = load_model_arg(model)
        cluster_spec = load_cluster_arg(cluster, nodes, memory_headroom)
        training = training_from_args(
            global_batch,
            seq_len,
            dtype,
            model_spec,
            grad_dtype=grad_dtype,
            flash_attention=flash_attention,
        )
        prof = load_profile_for(profile, cluster_spec, training, model_spec)
        result, planned = _search_and_place(
            model_spec, training, cluster_spec, options, prof, placement_budget_s
        )
        if out or report or emit:
            _write_outputs(outputs, result, model_spec, training, cluster_spec, prof)
        if as_json:
            doc = plan_json(result, training)
            doc["placement"] = placement_json(planned.placement, planned.resplit)
            print_json(doc)
        else:
            _render(result, model_spec, cluster_spec)
            _render_placement(planned)
            for path, what in ((out, "plan"), (emit, "launch files"), (report, "report")):
                if path:
                    err_console().print(f"wrote {what}: {path}")
