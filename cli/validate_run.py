"""Measuring planned configurations on this host for `meshplan validate`.

Owns: `run_validation` (a plan file per configuration, the executor under torchrun in
interleaved rounds, its JSONL metrics, one ValidationRecord per configuration) and writing
OUT/validation.json, the scatter picture and OUT/report.html.
Does not own: the command, its checks and exit status (cli/validate_cmd.py), predictions
(planner/cost/), the search (planner/search.py), the metrics (planner/validation.py), the
HTML sections (cli/plan_report.py) or drawing (cli/report_render.py).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from cli.calibrate_cmd import load_profile_arg
from cli.common import err_console
from cli.plan_report import (
    config_label,
    ensure_output_dir,
    plan_sections,
    scatter_points,
    validation_sections,
)
from planner.errors import SpecError
from planner.fileio import atomic_write_text


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


def _predict(model: Any, training: Any, cluster: Any, config: Any, profile: Any) -> dict[str, Any]:
    """The estimate's JSON; a profile's corrections are applied by the cost model itself."""
    from planner.cost.estimate import estimate

    return estimate(model, training, cluster, config, profile).to_json()


def _slots(config: Any, training: Any) -> int:
    from planner.validation import micro_batch_slots

    m = config.num_micro_batches(training)
    return micro_batch_slots(m, config.pp, config.virtual_stages)


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
    from planner.validation import report_to_json

    profile, corrections, sha = load_profile_arg(profile_path)
    if profile is not None and not use_corrections:
        profile = replace(profile, corrections=None)
    if profile is not None:
        from planner.profile_match import check_profile_matches

        for note in check_profile_matches(profile, cluster, training, model=model):
            err_console().print(f"note: --profile {profile_path}: {note}", highlight=False)
    fitted = profile.corrections if profile is not None else None
    corrections = fitted.factors if fitted is not None else None
    source = "measured" if profile is not None else "analytic"
    if configs is None:
        from planner.search import SearchOptions, search

        result = search(model, training, cluster, SearchOptions(top_k=top), profile=profile)
        configs = [p.config for p in result.plans]
    labels = [config_label(c) for c in configs]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise SpecError(f"configuration(s) listed more than once: {', '.join(repeated)}")
    predicted = [(c, _predict(model, training, cluster, c, profile)) for c in configs]
    order = sorted(range(len(predicted)), key=lambda i: predicted[i][1]["step_time_s"])
    rank_of = {i: k for k, i in enumerate(order)}
    plans, paths = _write_plans(predicted, model, training, cluster, source, sha, out)
    runs = _measure_rounds(
        paths, steps=steps, warmup=warmup, out=out, timeout_s=timeout_s, repeats=repeats
    )
    records = [
        _record(c, est, runs[config_label(c)], plans[config_label(c)], rank_of[i], training)
        for i, (c, est) in enumerate(predicted)
    ]
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
        "corrections_note": fitted.note if fitted is not None else None,
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
    if fitted is not None:
        report["holdout"] = _holdout_summary(records, fitted)
    top_label = (report["summary"].get("top_choice") or {}).get("top_label")
    top_plan = plans[top_label or config_label(predicted[order[0]][0])]
    _write_report_files(report, records, top_plan, profile, out)
    return report


def _write_plans(
    predicted: list[tuple[Any, dict[str, Any]]],
    model: Any,
    training: Any,
    cluster: Any,
    source: str,
    sha: str | None,
    out: Path,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """One plan file per configuration under OUT/plans, keyed by the configuration's label."""
    from planner.plan import build_plan, save_plan

    plans_dir = ensure_output_dir(ensure_output_dir(out, "--out") / "plans", "--out")
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
        paths[label] = plans_dir / f"{label}.json"
        save_plan(plans[label], paths[label])
    return plans, paths


def _measure_rounds(
    paths: dict[str, Path], *, steps: int, warmup: int, out: Path, timeout_s: float, repeats: int
) -> dict[str, list[dict[str, Any]]]:
    """Every configuration's runs, from `measure`, in `repeats` rounds."""
    from rich.progress import Progress

    # Rounds visit every configuration once each, so slow drift of a shared host's load spreads
    # over all configurations instead of biasing the ones measured last.
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in paths}
    with Progress(console=err_console(), transient=True) as bar:
        task = bar.add_task("measuring configurations", total=len(paths) * repeats)
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
    return runs


def _record(
    c: Any, est: dict[str, Any], runs: list[dict[str, Any]], plan: Any, rank: int, training: Any
) -> Any:
    """The ValidationRecord of one configuration: its prediction and its successful runs."""
    from planner.validation import ValidationRecord

    ok = [g for g in runs if "error" not in g]
    errors = [g["error"] for g in runs if "error" in g]
    return ValidationRecord(
        label=config_label(c),
        config=_config_json(plan.config),
        predicted_step_time_s=float(est["step_time_s"]),
        predicted_peak_memory_bytes=float(est["peak_memory_bytes"]),
        breakdown={k: float(v) for k, v in est["breakdown"].items()},
        planner_rank=rank,
        micro_batch_slots=_slots(c, training),
        measured_step_time_s=statistics.median(g["median_s"] for g in ok) if ok else None,
        measured_step_times_s=tuple(t for g in ok for t in g["step_times_s"][g["dropped"] :]),
        run_medians_s=tuple(g["median_s"] for g in ok),
        warmup_steps_dropped=ok[0]["dropped"] if ok else 0,
        measured_peak_memory_bytes=max(g["peak_memory_bytes"] for g in ok) if ok else None,
        error="; ".join(errors) or None,
    )


def _write_report_files(
    report: dict[str, Any], records: list[Any], top_plan: Any, profile: Any, out: Path
) -> None:
    """validation.json, the scatter picture and report.html (with the top plan's pictures)."""
    from cli import report_render as rr

    atomic_write_text(out / "validation.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    model, cluster = top_plan.model.name, top_plan.cluster.name
    points = scatter_points(records)
    if points:
        rr.save_figure(
            rr.scatter_figure(
                points, title=f"Predicted vs measured step time, {model} on {cluster}"
            ),
            out / "scatter",
        )
    sections = validation_sections(report, out)
    sections += plan_sections(top_plan, top_plan.prediction, out, profile)
    page = rr.html_page(f"meshplan validation: {model} on {cluster}", sections)
    atomic_write_text(out / "report.html", page)


def _holdout_summary(records: list[Any], fitted: Any) -> dict[str, Any]:
    """MAPE on the configurations the corrections were *not* fitted on (from their provenance)."""
    from planner.validation import mape

    held = set(fitted.holdout_labels)
    fit = set(fitted.fit_labels)
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
