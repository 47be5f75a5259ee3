"""`meshplan memcheck plan.json`: measure the plan's peak memory per pipeline rank by running the
executor's own construction and step on fake tensors, before paying for the cluster.

Owns: the command's options and checks, the rich / JSON rendering of a MemcheckReport and the
exit status (3 when a rank does not fit, like `plan` and `estimate`). Does not own: measuring
(executor/memcheck.py) or the fake environment (executor/fake_dist.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.table import Table

from cli.common import JSON_OPTION, err_console, format_bytes, out_console, print_json
from cli.extras import require_torch
from planner.errors import SpecError

if TYPE_CHECKING:
    from executor.memcheck import MemcheckReport, StageMeasurement

_KIND_COLUMNS = (
    ("parameters", "parameters"),
    ("gathered_parameters", "gathered parameters"),
    ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"),
    ("activations", "activations"),
    ("pipeline_buffers", "pipeline buffers"),
    ("temporaries", "temporaries"),
)


def method_text(m: StageMeasurement) -> str:
    from executor.memcheck import method_text as text

    return text(m)


def _fmt(n: float | None) -> str:
    return "-" if n is None else format_bytes(n)


def _rows(report: MemcheckReport) -> list[tuple[str, list[str]]]:
    stages = report.stages
    rows = [("layers", [str(s.measured.layers) for s in stages])]
    for kind, name in _KIND_COLUMNS:
        rows.append((name, [_fmt(s.measured.by_kind_bytes.get(kind)) for s in stages]))
    errors = [
        "-"
        if not s.predicted_bytes
        else f"{100 * (s.required_bytes / s.predicted_bytes - 1):+.1f} %"
        for s in stages
    ]
    rows += [
        ("measured peak", [format_bytes(s.measured.peak_bytes) for s in stages]),
        ("+ reserve", [format_bytes(s.reserve_bytes) for s in stages]),
        ("= required", [format_bytes(s.required_bytes) for s in stages]),
        ("predicted", [_fmt(s.predicted_bytes) for s in stages]),
        ("error", errors),
        ("capacity", [format_bytes(s.capacity_bytes) for s in stages]),
        ("fits", ["yes" if s.fits else "[red]NO[/]" for s in stages]),
    ]
    return rows


def _render(report: MemcheckReport) -> None:
    out = out_console()
    table = Table(title="memcheck: peak memory of one GPU per pipeline rank")
    table.add_column("")
    for s in report.stages:
        table.add_column(f"pp rank {s.pp_rank}", justify="right")
    for name, cells in _rows(report):
        table.add_row(name, *cells)
    out.print(table)
    for s in report.stages:
        out.print(f"pp rank {s.pp_rank}: {method_text(s.measured)}", highlight=False)
    out.print(
        "reserve: the planner's non-tensor reserve (CUDA context, NCCL buffers) plus allocator "
        "slack on activations; error = required / predicted - 1"
    )
    if report.fits:
        out.print("fits: every pipeline rank's required memory is within its GPU capacity")
        return
    worst = max(report.stages, key=lambda s: s.required_bytes - s.capacity_bytes)
    over = worst.required_bytes - worst.capacity_bytes
    out.print(
        f"[bold red]does not fit[/]: pipeline rank {worst.pp_rank} needs "
        f"{format_bytes(worst.required_bytes)} of {format_bytes(worst.capacity_bytes)} "
        f"({format_bytes(over)} over)"
    )


def register(app: typer.Typer) -> None:
    @app.command("memcheck")
    def memcheck_cmd(
        plan_path: str = typer.Argument(
            ..., metavar="PLAN", help="plan.json from `meshplan plan`."
        ),
        steps: int = typer.Option(
            2, "--steps", help="Training steps per run; the last is measured (>= 2)."
        ),
        exact: bool = typer.Option(
            False,
            "--exact",
            help="Run every rank at its full depth and micro-batch count (no extrapolation).",
        ),
        pp_rank: list[int] = typer.Option(
            None, "--pp-rank", help="Measure only this pipeline rank (repeatable)."
        ),
        jobs: int = typer.Option(1, "--jobs", help="Pipeline ranks measured in parallel."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Measure each pipeline rank's peak memory with the executor's own code on fake
        tensors (seconds to minutes on a laptop CPU) and compare it with the plan's prediction."""
        if steps < 2:
            raise SpecError(f"--steps {steps}: must be >= 2 (one warm-up step, one measured)")
        if jobs < 1:
            raise SpecError(f"--jobs {jobs}: must be a positive integer")
        require_torch("meshplan memcheck")
        from executor.memcheck import run_memcheck
        from planner.plan import load_plan

        plan = load_plan(plan_path)
        if plan.config.cp > 1:
            # memcheck runs CPU kernels: there executor/cp.py's lower-right causal bias is
            # materialised and SDPA's math path keeps the attention weights (quadratic), unlike
            # CUDA's flash/efficient kernels, so its peak would not be the GPU's (measured: 183
            # GB vs 68 GB predicted on an 8-GPU cp=4 plan). tests/test_executor_cp.py measures CP
            # blocks instead.
            raise SpecError(
                f"{plan_path}: memcheck does not run context-parallel plans (cp="
                f"{plan.config.cp}): on CPU kernels the CP attention's causal mask is "
                "materialised, which a GPU does not do; use a cp=1 plan"
            )
        console = err_console()
        report = run_memcheck(
            plan,
            steps=steps,
            exact=exact,
            pp_ranks=tuple(pp_rank) if pp_rank else None,
            jobs=jobs,
            progress=lambda line: console.print(line, highlight=False),
        )
        if as_json:
            print_json(report.to_json())
        else:
            _render(report)
        for note in report.notes:
            console.print(f"note: {note}", highlight=False)
        if not report.fits:
            raise typer.Exit(3)
