"""`meshplan export`: hand a plan to torchtitan, Megatron-LM or DeepSpeed.

Owns: the command's options, writing `--out` (atomically) or stdout, and reporting on stderr
what the target will do unlike the plan, one line each with its predicted cost.
Does not own: the mappings (planner/export/).
"""

from __future__ import annotations

import sys

import typer

from cli.common import JSON_OPTION, PROFILE_OPTION, load_profile_for, print_json
from cli.stdio import data_stream


def _run(
    plan_path: str,
    to: str,
    out: str | None,
    profile_path: str | None,
    config_file: str | None,
    as_json: bool,
) -> None:
    from planner.errors import SpecError
    from planner.export import TARGETS, export_plan
    from planner.fileio import atomic_write_text, check_not_inputs, check_output_file
    from planner.plan import load_plan

    if to not in TARGETS:
        raise SpecError(f"--to {to!r} is not a target; use one of {'|'.join(TARGETS)}")
    if config_file is not None and to != "torchtitan":
        raise SpecError(f"--config-file is torchtitan's base TOML; --to {to} takes none")
    if out is not None:
        check_output_file(out, "--out")
        check_not_inputs(out, [plan_path] + ([profile_path] if profile_path else []), "--out")
    plan = load_plan(plan_path)
    profile = load_profile_for(profile_path, plan.cluster, plan.training, plan.model)
    result = export_plan(plan, to, profile=profile, config_file=config_file)
    if out is not None:
        atomic_write_text(out, result.text, "--out")
    if as_json:
        print_json(result.to_json() | {"plan": plan_path, "out": out})
        return
    if out is None:
        stream = data_stream()
        stream.write(result.text)
        stream.flush()
    else:
        print(f"wrote {to} export: {out}", file=sys.stderr)
    if to == "deepspeed":
        print(f"run: {result.launcher}", file=sys.stderr)
    if plan.provenance.profile_sha256 and profile is None:
        print(
            "note: the plan was priced with a measured profile; without --profile the "
            "differences below are priced analytically",
            file=sys.stderr,
        )
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for d in result.differences:
        print(d.line(), file=sys.stderr)
    if result.differences and result.exported_step_s is not None:
        fits = "" if result.exported_fits else ", does NOT fit in memory"
        print(
            f"exported: predicted step {result.plan_step_s:.3f} s (plan) -> "
            f"{result.exported_step_s:.3f} s with every difference above{fits} (estimate)",
            file=sys.stderr,
        )


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        plan: str = typer.Argument(..., help="plan.json to export."),
        to: str = typer.Option(..., "--to", help="torchtitan | megatron | deepspeed"),
        out: str = typer.Option(
            None, "--out", help="Write the command line (ds_config.json for deepspeed) here."
        ),
        profile: str = PROFILE_OPTION,
        config_file: str = typer.Option(
            None,
            "--config-file",
            help="torchtitan: the base TOML for --job.config_file (default: a placeholder).",
        ),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Write the torchtitan / Megatron-LM command line or DeepSpeed config for a plan."""
        _run(plan, to, out, profile, config_file, as_json)
