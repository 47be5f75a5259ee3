"""`meshplan validate`: run planned configurations here and compare them with the predictions.

Owns: the command, its configs file, its up-front checks (numbers, torch, matplotlib, --out),
what it prints and its exit status (1 when every configuration failed to run). `register` also
registers `calibrate` and `report` (cli/calibrate_cmd.py), which work on a validation's output.
Does not own: the measuring and the files it writes (cli/validate_run.py, whose
`run_validation` is re-exported here), predictions (planner/cost/), the metrics and the fit
(planner/validation.py), reading a profile's corrections (cli/calibrate_cmd.py), the plan's pictures
(cli/plan_report.py, whose `write_plan_report` is re-exported here for
`meshplan plan --report DIR`), or drawing (cli/report_render.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import typer

from cli.calibrate_cmd import register as register_calibrate_and_report
from cli.common import err_console, load_cluster_arg, load_model_arg, print_json
from cli.extras import require_torch
from cli.plan_report import fmt_ms, fmt_pct, write_plan_report
from cli.validate_run import run_validation
from planner.errors import ConfigError, FormatError, MeshplanError, SpecError
from planner.fileio import check_output_dir

__all__ = ["register", "run_validation", "write_plan_report"]

# Steps dropped before the median: step 1 builds the schedule, warms allocator and caches.
DEFAULT_WARMUP_STEPS = 2
# Per configuration: torchrun start-up (10-40 s on 2 busy cores) plus the steps. Unit: s.
DEFAULT_TIMEOUT_S = 300


def load_configs_file(path: str) -> list[Any]:
    """A YAML or JSON list of ParallelConfig field mappings."""
    import yaml

    from planner.parallel import ParallelConfig

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"configs file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise FormatError(f"{p}: not valid YAML/JSON ({e})") from None
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise FormatError(
            f"{p}: expected a non-empty list of configurations (tp, pp, dp, micro_batch, ...)"
        )
    out = []
    for i, d in enumerate(data):
        try:
            out.append(ParallelConfig(**d))
        except TypeError as e:
            raise ConfigError(f"{p}: configuration {i}: {e}") from None
    return out


def _summary_line(report: dict[str, Any]) -> str:
    s = report["summary"]
    t = s.get("top_choice") or {}
    sp = s.get("spearman")
    return (
        f"MAPE {fmt_pct(s.get('mape'))} over {s['measured']}/{s['configurations']} configurations, "
        f"Spearman {'-' if sp is None else f'{sp:.2f}'}, top choice {t.get('top_label', '-')} "
        f"{'is' if t.get('top_is_best') else 'is not'} the measured best {t.get('best_label', '-')} "
        f"(loss {fmt_pct(t.get('loss_fraction'))})"
    )


class AllRunsFailed(MeshplanError):
    """`validate` ran and no configuration was measured: exit 1 (bad input is 2)."""

    exit_code = 1


def check_validate_options(
    *, steps: int, warmup: int, top: int, repeats: int, timeout_s: float, out: str
) -> Path:
    """Refuse numbers that cannot give a measurement and an --out that cannot be written,
    before anything is planned or run; returns the output directory."""
    for option, value in (("--steps", steps), ("--top", top), ("--repeats", repeats)):
        if value < 1:
            raise SpecError(f"{option} {value}: must be a positive integer")
    if warmup < 0:
        raise SpecError(f"--warmup {warmup}: must be >= 0")
    if warmup >= steps:
        raise SpecError(
            f"--warmup {warmup}: must be less than --steps {steps}, so that at least one step "
            "is measured after the warm-up"
        )
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise SpecError(f"--timeout-s {timeout_s}: must be a positive, finite number of seconds")
    return check_output_dir(out, "--out")


def _print_results(report: dict[str, Any], out: Path) -> None:
    console = err_console()
    note = (report.get("meta") or {}).get("corrections_note")
    if note:
        console.print(f"predictions {note}", highlight=False)
    for r in report["records"]:
        meas = r.get("measured_step_time_s")
        console.print(
            f"  {r['label']:<32} predicted {fmt_ms(r['predicted_step_time_s']):>8} ms  measured {fmt_ms(meas):>8} ms  "
            f"error {fmt_pct(r.get('error_fraction')):>8}  {r.get('error') or ''}"
        )
    console.print(_summary_line(report))
    console.print(f"wrote {out}/validation.json, {out}/report.html and pictures")


def check_failures(report: dict[str, Any], out: Path) -> None:
    """Raise AllRunsFailed when no configuration was measured; warn on stderr when some failed."""
    records = report["records"]
    failed = [r for r in records if r.get("measured_step_time_s") is None]
    if not failed:
        return
    logs = f"{out}/round*/logs/"
    first = " ".join(str(failed[0].get("error") or "no error recorded").split())
    if len(failed) == len(records):
        raise AllRunsFailed(
            f"all {len(records)} configuration(s) failed to run, so nothing was measured; "
            f"logs are in {logs} (first: {failed[0]['label']}: {first})"
        )
    labels = ", ".join(r["label"] for r in failed)
    # Not an `error:` line: the run succeeded for the others and exits 0.
    print(
        f"warning: {len(failed)} of {len(records)} configurations failed to run ({labels}); "
        f"logs are in {logs}",
        file=sys.stderr,
    )


def register(app: typer.Typer) -> None:
    @app.command("validate")
    def validate(
        model: str = typer.Option(
            "tiny-gpt", "--model", help="Model preset, YAML or HF config.json."
        ),
        cluster: str = typer.Option(
            "cpu-2", "--cluster", help="Cluster preset or YAML (single node: runs here)."
        ),
        nodes: int = typer.Option(None, "--nodes", help="Number of nodes of the cluster preset."),
        global_batch: int = typer.Option(8, "--global-batch", help="Sequences per optimizer step."),
        seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence."),
        dtype: str = typer.Option(
            None, "--dtype", help="bf16|fp16|fp32 (default: fp32 on CPU clusters, else bf16)."
        ),
        profile: str = typer.Option(
            None,
            "--profile",
            help="Measured profile.json (its corrections are applied; also a legacy "
            ".corrections.json beside it).",
        ),
        no_corrections: bool = typer.Option(
            False, "--no-corrections", help="Ignore the profile's corrections."
        ),
        top: int = typer.Option(8, "--top", help="Validate the planner's top K configurations."),
        configs: str = typer.Option(
            None, "--configs", help="YAML/JSON list of configurations instead of --top."
        ),
        steps: int = typer.Option(8, "--steps", help="Training steps per configuration."),
        repeats: int = typer.Option(
            1, "--repeats", help="Runs per configuration, in interleaved rounds."
        ),
        warmup: int = typer.Option(
            DEFAULT_WARMUP_STEPS, "--warmup", help="Steps dropped before the median (< --steps)."
        ),
        device: str = typer.Option(
            None, "--device", help="cpu|cuda; must match the cluster's device kind."
        ),
        timeout_s: float = typer.Option(
            DEFAULT_TIMEOUT_S, "--timeout-s", help="Limit per configuration run (s, > 0)."
        ),
        out: str = typer.Option(
            "report", "--out", help="Directory for validation.json, plans, metrics, pictures."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print validation.json to stdout."),
    ) -> None:
        """Run planned configurations on this host and compare measured with predicted step time.

        Exit status: 0 when at least one configuration was measured (failed ones are listed on stderr), 1 when every configuration failed to run (logs in OUT/round*/logs/), 2 for bad input.
        """
        from cli.common import training_from_args
        from cli.report_render import require_matplotlib
        from planner.specs import DeviceKind

        require_torch("`meshplan validate` (it runs the executor)")
        require_matplotlib("`meshplan validate` (it draws the report)")
        out_dir = check_validate_options(
            steps=steps, warmup=warmup, top=top, repeats=repeats, timeout_s=timeout_s, out=out
        )
        m = load_model_arg(model)
        cl = load_cluster_arg(cluster, nodes)
        if len(cl.nodes) != 1:
            raise SpecError(
                f"validate runs on this host only; cluster '{cl.name}' has {len(cl.nodes)} nodes"
            )
        kind = "cpu" if cl.nodes[0].gpu.kind is DeviceKind.CPU else "cuda"
        if device is not None and device != kind:
            raise SpecError(
                f"--device {device} does not match cluster '{cl.name}' ({kind} devices)"
            )
        training = training_from_args(
            global_batch, seq_len, dtype or ("fp32" if kind == "cpu" else "bf16"), m
        )
        report = run_validation(
            model=m,
            training=training,
            cluster=cl,
            configs=load_configs_file(configs) if configs else None,
            top=top,
            profile_path=profile,
            use_corrections=not no_corrections,
            steps=steps,
            warmup=warmup,
            out=out_dir,
            timeout_s=timeout_s,
            repeats=repeats,
        )
        if as_json:
            print_json(report)
        _print_results(report, out_dir)
        check_failures(report, out_dir)

    register_calibrate_and_report(app)
