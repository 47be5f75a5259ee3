"""`meshplan validate`, `meshplan calibrate` and `meshplan report`.

Owns: measuring planned configurations on this host (a plan per configuration, the executor
under torchrun, its JSONL metrics), writing `validation.json`, the scatter picture and
report.html, fitting and storing corrections next to a profile, and the three commands.
Does not own: predictions (planner/cost/), the search (planner/search.py), the metrics and the
fit (planner/validation.py), the plan's pictures and HTML sections (cli/plan_report.py, whose
`write_plan_report` is re-exported here for `meshplan plan --report DIR`), or drawing
(cli/report_render.py).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

from cli.common import err_console, load_cluster_arg, load_model_arg, print_json
from cli.plan_report import (
    config_label,
    fmt_ms,
    fmt_pct,
    plan_sections,
    scatter_points,
    validation_sections,
    write_plan_report,
)
from planner.errors import ConfigError, FormatError, SpecError

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


# ---------------------------------------------------------------- measuring


def measure(
    plan_path: Path, *, steps: int, warmup: int, work: Path, timeout_s: float
) -> dict[str, Any]:
    """Run the executor on a plan with torchrun on this host; parse its JSONL metrics."""
    from cli.launch_cmd import launch_command
    from planner.validation import median_after_warmup

    metrics = work / "metrics" / (plan_path.stem + ".jsonl")
    log = work / "logs" / (plan_path.stem + ".log")
    metrics.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    metrics.unlink(missing_ok=True)
    cmd = launch_command(str(plan_path), steps, str(metrics), None)
    nproc = int(next(a.split("=")[1] for a in cmd if a.startswith("--nproc-per-node=")))
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc)), "MESHPLAN_NODE_INDEX": "0"}
    start = time.perf_counter()
    try:
        with log.open("w") as fh:
            rc = subprocess.run(
                cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s (log: {log})"}
    wall = time.perf_counter() - start
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    rows = [json.loads(x) for x in lines if x.strip()]
    # A run that logged every step and then failed while shutting down (a rank aborting in
    # process-group teardown) still measured every step: keep it and say so.
    if rows and len(rows) >= steps and rc != 0:
        note = f"{plan_path.stem}: executor exit {rc} after all {steps} steps: {_failure_line(log)} (log: {log})"
    elif rc != 0 or not rows:
        return {"error": f"executor exit {rc}: {_failure_line(log)} (log: {log})"}
    else:
        note = None
    times = [float(r["step_time_s"]) for r in rows]
    median, dropped = median_after_warmup(times, warmup)
    return {
        "step_times_s": tuple(times),
        "median_s": median,
        "dropped": dropped,
        "peak_memory_bytes": max(float(r.get("peak_memory_bytes", 0)) for r in rows),
        "wall_s": wall,
        "note": note,
    }


def _failure_line(log: Path) -> str:
    """The first exception line of a failed run's log (`NameError: ...`), else its last line."""
    lines = (
        [x.strip() for x in log.read_text().splitlines() if x.strip().strip("=-")]
        if log.is_file()
        else []
    )
    errors = [x for x in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", x)]
    if errors:
        return errors[0]  # the root cause; torchrun's ChildFailedError comes after it
    return (lines or ["no output"])[-1]


def _config_json(c: Any) -> dict[str, Any]:
    from planner.serialize import to_jsonable

    return {k: to_jsonable(getattr(c, k)) for k in c.__dataclass_fields__ if k != "rank_to_gpu"}


def _predict(
    model: Any, training: Any, cluster: Any, config: Any, profile: Any, corrections: Any
) -> dict[str, Any]:
    from planner.cost.estimate import estimate
    from planner.validation import apply_corrections

    est = estimate(model, training, cluster, config, profile).to_json()
    if corrections is None:
        return est
    return apply_corrections(est, corrections, slots=_slots(config, training), dp=config.dp)


def _slots(config: Any, training: Any) -> int:
    from planner.validation import micro_batch_slots

    m = config.num_micro_batches(training)
    return micro_batch_slots(m, config.pp, config.virtual_stages)


def _load_profile(path: str | None) -> tuple[Any, Any, str | None]:
    """(profile, corrections or None, sha256) for `--profile`; corrections from the sidecar."""
    if path is None:
        return None, None, None
    from planner.profile import load_profile, profile_sha256
    from planner.validation import corrections_path, load_corrections

    profile = load_profile(path)
    side = corrections_path(path)
    corr = load_corrections(side) if side.is_file() else None
    return profile, corr, profile_sha256(profile)


def run_validation(
    *,
    model: Any,
    training: Any,
    cluster: Any,
    configs: list[Any] | None,
    top: int,
    profile_path: str | None,
    use_corrections: bool,
    steps: int,
    warmup: int,
    out: Path,
    timeout_s: float,
    repeats: int = 1,
) -> dict[str, Any]:
    """Plan, run and compare every configuration; write validation.json, pictures, report.html."""
    from rich.progress import Progress

    from cli import report_render as rr
    from planner.plan import build_plan, save_plan
    from planner.validation import ValidationRecord, report_to_json

    profile, corrections, sha = _load_profile(profile_path)
    corrections = corrections if use_corrections else None
    source = "measured" if profile is not None else "analytic"
    if configs is None:
        from planner.search import SearchOptions, search

        result = search(model, training, cluster, SearchOptions(top_k=top), profile=profile)
        configs = [p.config for p in result.plans]
    labels = [config_label(c) for c in configs]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise SpecError(f"configuration(s) listed more than once: {', '.join(repeated)}")
    predicted = [(c, _predict(model, training, cluster, c, profile, corrections)) for c in configs]
    order = sorted(range(len(predicted)), key=lambda i: predicted[i][1]["step_time_s"])
    rank_of = {i: k for k, i in enumerate(order)}
    (out / "plans").mkdir(parents=True, exist_ok=True)
    plans, paths = {}, {}
    for c, est in predicted:
        label = config_label(c)
        plans[label] = build_plan(
            model=model,
            training=training,
            cluster=cluster,
            config=c,
            prediction=est,
            source=source,
            profile_sha256=sha,
        )
        paths[label] = out / "plans" / f"{label}.json"
        save_plan(plans[label], paths[label])
    # Rounds visit every configuration once each, so slow drift of a shared host's load spreads
    # over all configurations instead of biasing the ones measured last.
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in plans}
    with Progress(console=err_console(), transient=True) as bar:
        task = bar.add_task("measuring configurations", total=len(plans) * repeats)
        for rnd in range(repeats):
            for label, path in paths.items():
                bar.update(task, description=f"round {rnd + 1}/{repeats}: {label}")
                runs[label].append(
                    measure(
                        path,
                        steps=steps,
                        warmup=warmup,
                        work=out / f"round{rnd}",
                        timeout_s=timeout_s,
                    )
                )
                bar.advance(task)
    records = []
    for i, (c, est) in enumerate(predicted):
        label = config_label(c)
        ok = [g for g in runs[label] if "error" not in g]
        errors = [g["error"] for g in runs[label] if "error" in g]
        kept = tuple(t for g in ok for t in g["step_times_s"][g["dropped"] :])
        records.append(
            ValidationRecord(
                label=label,
                config=_config_json(plans[label].config),
                predicted_step_time_s=float(est["step_time_s"]),
                predicted_peak_memory_bytes=float(est["peak_memory_bytes"]),
                breakdown={k: float(v) for k, v in est["breakdown"].items()},
                planner_rank=rank_of[i],
                micro_batch_slots=_slots(c, training),
                measured_step_time_s=statistics.median(g["median_s"] for g in ok) if ok else None,
                measured_step_times_s=kept,
                run_medians_s=tuple(g["median_s"] for g in ok),
                warmup_steps_dropped=ok[0]["dropped"] if ok else 0,
                measured_peak_memory_bytes=max(g["peak_memory_bytes"] for g in ok) if ok else None,
                error="; ".join(errors) or None,
            )
        )
    meta = {
        "model": model.name,
        "cluster": cluster.name,
        "global_batch": training.global_batch,
        "seq_len": training.seq_len,
        "dtype": training.dtype.value,
        "profile": profile_path,
        "profile_sha256": sha,
        "prediction_source": source,
        "corrections": asdict(corrections) if corrections is not None else None,
        "steps": steps,
        "warmup_steps_dropped": warmup,
        "repeats": repeats,
        "statistic": "median over runs of each run's median step time after warm-up",
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory_note": "measured memory on CPU is the process peak RSS (interpreter and torch included)",
        "run_notes": [g["note"] for label in plans for g in runs[label] if g.get("note")],
    }
    report = report_to_json(records, meta)
    if corrections is not None and profile_path is not None:
        report["holdout"] = _holdout_summary(records, profile_path)
    (out / "validation.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    points = scatter_points(records)
    if points:
        rr.save_figure(
            rr.scatter_figure(
                points, title=f"Predicted vs measured step time, {model.name} on {cluster.name}"
            ),
            out / "scatter",
        )
    sections = validation_sections(report, out)
    top_label = (report["summary"].get("top_choice") or {}).get("top_label") or config_label(
        predicted[order[0]][0]
    )
    top_plan = plans[top_label]
    sections += plan_sections(top_plan, top_plan.prediction, out, profile)
    (out / "report.html").write_text(
        rr.html_page(f"meshplan validation: {model.name} on {cluster.name}", sections)
    )
    return report


def _holdout_summary(records: list[Any], profile_path: str) -> dict[str, Any]:
    """MAPE on the configurations the corrections were *not* fitted on (from their provenance)."""
    from planner.validation import corrections_path, mape

    prov = json.loads(corrections_path(profile_path).read_text()).get("provenance", {})
    held = set(prov.get("holdout_labels", []))
    fit = set(prov.get("fit_labels", []))
    done = [r for r in records if r.measured_step_time_s]
    unseen = [r for r in done if r.label not in fit]

    def err(rs: list[Any]) -> float | None:
        return (
            mape([r.predicted_step_time_s for r in rs], [r.measured_step_time_s for r in rs])
            if rs
            else None
        )

    return {
        "holdout_labels": sorted(held),
        "holdout_mape": err([r for r in done if r.label in held]),
        "not_fitted_on_mape": err(unseen),
        "not_fitted_on_labels": sorted(r.label for r in unseen),
    }


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
            None, "--profile", help="Measured profile.json (its .corrections.json is applied)."
        ),
        no_corrections: bool = typer.Option(
            False, "--no-corrections", help="Ignore the profile's corrections file."
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
            DEFAULT_WARMUP_STEPS, "--warmup", help="Steps dropped before the median."
        ),
        device: str = typer.Option(
            None, "--device", help="cpu|cuda; must match the cluster's device kind."
        ),
        timeout_s: float = typer.Option(
            DEFAULT_TIMEOUT_S, "--timeout-s", help="Limit per configuration run (s)."
        ),
        out: str = typer.Option(
            "report", "--out", help="Directory for validation.json, plans, metrics, pictures."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print validation.json to stdout."),
    ) -> None:
        """Run planned configurations on this host and compare measured with predicted step time."""
        import importlib.util

        from cli.common import training_from_args
        from planner.specs import DeviceKind

        if importlib.util.find_spec("torch") is None:
            raise SpecError(
                "`meshplan validate` runs the executor and needs torch: pip install 'meshplan[torch]'"
            )
        if steps < 1 or warmup < 0 or top < 1 or repeats < 1:
            raise SpecError("--steps, --top and --repeats must be >= 1 and --warmup >= 0")
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
        cfgs = load_configs_file(configs) if configs else None
        report = run_validation(
            model=m,
            training=training,
            cluster=cl,
            configs=cfgs,
            top=top,
            profile_path=profile,
            use_corrections=not no_corrections,
            steps=steps,
            warmup=warmup,
            out=Path(out),
            timeout_s=timeout_s,
            repeats=repeats,
        )
        if as_json:
            print_json(report)
        console = err_console()
        for r in report["records"]:
            meas = r.get("measured_step_time_s")
            console.print(
                f"  {r['label']:<32} predicted {fmt_ms(r['predicted_step_time_s']):>8} ms  measured {fmt_ms(meas):>8} ms  "
                f"error {fmt_pct(r.get('error_fraction')):>8}  {r.get('error') or ''}"
            )
        console.print(_summary_line(report))
        console.print(f"wrote {out}/validation.json, {out}/report.html and pictures")

    @app.command("calibrate")
    def calibrate_cmd(
        report: str = typer.Argument(..., help="validation.json written by `meshplan validate`."),
        profile: str = typer.Option(..., "--profile", help="The profile the validation used."),
        out: str = typer.Option(
            ...,
            "--out",
            help="Profile to write (raw samples copied unchanged) + its .corrections.json.",
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
        """Fit correction factors on some configurations and check them on held-out ones."""
        from planner.profile import load_profile, profile_sha256
        from planner.validation import calibrate, corrections_path, corrections_to_json, load_report

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
        if Path(out).resolve() != Path(profile).resolve():
            shutil.copyfile(profile, out)
        provenance = {
            "validation_report": str(report),
            "profile_sha256": profile_sha256(prof),
            "fit_labels": list(result.fit_labels),
            "holdout_labels": list(result.holdout_labels),
            "identified": list(result.identified),
        }
        doc = corrections_to_json(result.corrections, provenance)
        corrections_path(out).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        summary = asdict(result)
        Path(report).with_name("calibration.json").write_text(
            json.dumps(summary, indent=2, sort_keys=True) + "\n"
        )
        if as_json:
            print_json(summary)
        console = err_console()
        for k, v in asdict(result.corrections).items():
            console.print(f"  {k:<18} {v:.4g}")
        console.print(
            f"fit MAPE {fmt_pct(result.fit_mape_before)} -> {fmt_pct(result.fit_mape_after)} on {len(result.fit_labels)}; "
            f"held-out MAPE {fmt_pct(result.holdout_mape_before)} -> {fmt_pct(result.holdout_mape_after)} on "
            f"{len(result.holdout_labels)}; leave-one-out {fmt_pct(result.loo_mape_before)} -> {fmt_pct(result.loo_mape_after)}"
        )
        console.print(f"wrote {out} and {corrections_path(out)}")

    @app.command("report")
    def report_cmd(
        plan: str = typer.Argument(..., help="plan.json."),
        out: str = typer.Option(
            "report", "--out", help="Directory for report.html and the pictures."
        ),
        profile: str = typer.Option(
            None, "--profile", help="Profile the plan was made with (for the timeline)."
        ),
        validation: str = typer.Option(None, "--validation", help="validation.json to include."),
    ) -> None:
        """Render one self-contained HTML page (tables, timeline, memory) for a plan."""
        from cli import report_render as rr
        from planner.plan import load_plan

        p = load_plan(plan)
        if not p.prediction:
            raise SpecError(f"{plan} has no prediction; write it with `meshplan plan`")
        prof, _, _ = _load_profile(profile)
        d = Path(out)
        sections = plan_sections(p, p.prediction, d, prof)
        if validation:
            data = json.loads(Path(validation).read_text())
            from planner.validation import load_report

            records, _ = load_report(validation)
            rr.save_figure(
                rr.scatter_figure(scatter_points(records), title="Predicted vs measured step time"),
                d / "scatter",
            )
            sections = validation_sections(data, d) + sections
        (d / "report.html").write_text(
            rr.html_page(f"meshplan plan report: {p.model.name} on {p.cluster.name}", sections)
        )
        err_console().print(f"wrote {d}/report.html, timeline.png/.svg, memory.png/.svg")
