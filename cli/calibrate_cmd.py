"""`meshplan calibrate` and `meshplan report`: the commands that work on a validation's output.

Owns: fitting corrections from validation.json and storing them in the `corrections` field of a
new profile (the input's measurements plus the factors; never the input itself), reading a
`--profile` with its corrections (`load_profile_arg`, which also reads the legacy
`<profile>.corrections.json` sidecar of older meshplan versions), the standalone plan report
(report.html with its pictures), and the up-front checks of both commands' outputs.
Does not own: measuring (cli/validate_cmd.py, whose `register` registers these commands too),
the fit (planner/validation.py), the HTML sections (cli/plan_report.py) or drawing
(cli/report_render.py).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import typer

from cli.common import err_console, print_json
from cli.plan_report import (
    ensure_output_dir,
    fmt_pct,
    plan_sections,
    scatter_points,
    validation_sections,
)
from planner.errors import SpecError
from planner.fileio import atomic_write_text, check_not_inputs, check_output_file

# Where calibrate writes its summary: beside the validation report it read.
CALIBRATION_SUMMARY = "calibration.json"


def load_profile_arg(path: str | None) -> tuple[Any, Any, str | None]:
    """(profile, its corrections or None, sha256 of the file's profile) for `--profile`.

    A profile without a `corrections` field but with a legacy `<profile>.corrections.json`
    beside it gets that sidecar's factors (said on stderr), so older calibrations still apply.
    """
    if path is None:
        return None, None, None
    from planner.profile import load_profile, profile_sha256

    profile = load_profile(path)
    sha = profile_sha256(profile)
    if profile.corrections is None:
        legacy = _legacy_corrections(path)
        if legacy is not None:
            profile = replace(profile, corrections=legacy)
    return profile, (profile.corrections.factors if profile.corrections else None), sha


def _legacy_corrections(path: str) -> Any:
    """The sidecar of meshplan < corrections-in-profile as a ProfileCorrections, or None."""
    from planner.cost.corrections import ProfileCorrections
    from planner.validation import corrections_path, load_corrections

    side = corrections_path(path)
    if not side.is_file():
        return None
    factors = load_corrections(side)
    prov = json.loads(side.read_text()).get("provenance") or {}
    mtime = _dt.datetime.fromtimestamp(side.stat().st_mtime, _dt.timezone.utc)
    err_console().print(
        f"note: --profile {path}: corrections read from the legacy file {side}; "
        "`meshplan calibrate` now stores them in the profile (run it again to migrate)",
        highlight=False,
    )
    return ProfileCorrections(
        factors=factors,
        fitted_on_host=f"an unrecorded host (legacy {side.name})",
        fitted_on_date=mtime.strftime("%Y-%m-%dT%H:%M:%SZ"),
        validation_report=str(prov.get("validation_report", "")),
        base_profile_sha256=str(prov.get("profile_sha256", "")),
        fit_labels=tuple(prov.get("fit_labels", ())),
        holdout_labels=tuple(prov.get("holdout_labels", ())),
        identified=tuple(prov.get("identified", ())),
    )


def check_calibrate_outputs(report: str, profile: str, out: str) -> tuple[Path, Path]:
    """(the new profile, the summary): each writable, neither of them an input."""
    inputs = [report, profile]
    out_path = check_output_file(out, "--out")
    check_not_inputs(out_path, inputs, "--out")
    summary = Path(report).with_name(CALIBRATION_SUMMARY)
    where = f"REPORT's {CALIBRATION_SUMMARY}"
    check_output_file(summary, where)
    check_not_inputs(summary, inputs, where)
    if summary.resolve() == out_path.resolve():
        raise SpecError(
            f"--out {out}: calibrate also writes {summary} beside REPORT; choose another --out"
        )
    return out_path, summary


def _dump(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _print_calibration(result: Any, out: Path) -> None:
    console = err_console()
    for k, v in asdict(result.corrections).items():
        console.print(f"  {k:<18} {v:.4g}")
    console.print(
        f"fit MAPE {fmt_pct(result.fit_mape_before)} -> {fmt_pct(result.fit_mape_after)} on {len(result.fit_labels)}; "
        f"held-out MAPE {fmt_pct(result.holdout_mape_before)} -> {fmt_pct(result.holdout_mape_after)} on "
        f"{len(result.holdout_labels)}; leave-one-out {fmt_pct(result.loo_mape_before)} -> {fmt_pct(result.loo_mape_after)}"
    )
    console.print(
        f"wrote {out} (the profile with these corrections; plan, estimate and validate apply them)"
    )


def calibrate_cmd(
    report: str = typer.Argument(..., help="validation.json written by `meshplan validate`."),
    profile: str = typer.Option(..., "--profile", help="The profile the validation used."),
    out: str = typer.Option(
        ...,
        "--out",
        help="Profile to write: --profile's measurements plus the fitted corrections (never "
        "--profile itself).",
    ),
    holdout: str = typer.Option(
        None, "--holdout", help="Comma-separated labels to hold out (default: every 3rd)."
    ),
    factors: str = typer.Option(
        None,
        "--factors",
        help="Comma-separated factors to fit (default: all), e.g. compute_scale,tp_comm_scale.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration result as JSON."),
) -> None:
    """Fit correction factors on some configurations and check them on held-out ones.

    Also writes calibration.json (the fit's summary) beside REPORT.
    """
    from planner.cost.corrections import ProfileCorrections
    from planner.profile import load_profile, profile_sha256, save_profile
    from planner.validation import calibrate, load_report

    out_path, summary_path = check_calibrate_outputs(report, profile, out)
    records, meta = load_report(report)
    prof = load_profile(profile)
    if meta.get("profile_sha256") and meta["profile_sha256"] != profile_sha256(prof):
        raise SpecError(f"{report} was measured with a different profile than {profile}")
    if meta.get("corrections"):
        raise SpecError(
            f"{report} was predicted with corrections already applied; validate with --no-corrections first"
        )
    held = [h for h in holdout.split(",") if h] if holdout else None
    chosen = [f for f in factors.split(",") if f] if factors else None
    result = calibrate(records, holdout=held, factors=chosen)
    raw = replace(prof, corrections=None)
    fitted = ProfileCorrections(
        factors=result.corrections,
        fitted_on_host=str(meta.get("host") or "an unrecorded host"),
        fitted_on_date=str(meta.get("date") or "an unrecorded date"),
        validation_report=str(report),
        base_profile_sha256=profile_sha256(raw),
        fit_labels=result.fit_labels,
        holdout_labels=result.holdout_labels,
        identified=result.identified,
        holdout_mape=result.holdout_mape_after,
        loo_mape=result.loo_mape_after,
    )
    save_profile(replace(raw, corrections=fitted), out_path)
    summary = asdict(result)
    atomic_write_text(summary_path, _dump(summary), f"REPORT's {CALIBRATION_SUMMARY}")
    if as_json:
        print_json(summary)
    _print_calibration(result, out_path)


def report_cmd(
    plan: str = typer.Argument(..., help="plan.json."),
    out: str = typer.Option("report", "--out", help="Directory for report.html and the pictures."),
    profile: str = typer.Option(
        None, "--profile", help="Profile the plan was made with (for the timeline)."
    ),
    validation: str = typer.Option(None, "--validation", help="validation.json to include."),
) -> None:
    """Render one self-contained HTML page (tables, timeline, memory) for a plan."""
    from cli import report_render as rr
    from planner.fileio import check_output_dir
    from planner.plan import load_plan
    from planner.validation import load_report

    rr.require_matplotlib("`meshplan report`")
    check_output_dir(out, "--out")
    p = load_plan(plan)
    if not p.prediction:
        raise SpecError(f"{plan} has no prediction; write it with `meshplan plan`")
    prof, _, _ = load_profile_arg(profile)
    # load_report first: it checks the file and its schema, so a bad --validation is one line.
    records = load_report(validation)[0] if validation else None
    d = ensure_output_dir(out, "--out")
    sections = plan_sections(p, p.prediction, d, prof, "--out")
    if validation:
        data = json.loads(Path(validation).read_text())
        rr.save_figure(
            rr.scatter_figure(scatter_points(records), title="Predicted vs measured step time"),
            d / "scatter",
        )
        sections = validation_sections(data, d) + sections
    page = rr.html_page(f"meshplan plan report: {p.model.name} on {p.cluster.name}", sections)
    atomic_write_text(d / "report.html", page, "--out")
    err_console().print(f"wrote {d}/report.html, timeline.png/.svg, memory.png/.svg")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_cmd)
    app.command("report")(report_cmd)
