"""The summary of one `benchmarks/gpu_check.sh` run: steps, predicted vs measured, overhead.

Owns: reading what gpu_check.sh leaves in its scratch directory (steps.tsv, env.json,
validate-<dtype>/validation.json, estimate/*.json, memcheck/*.json, overhead*.json, profile.json)
and writing OUT/summary.json and OUT/summary.md; the one-line descriptions the script puts in
its step table (`--describe-profile`, `--describe-validation`, `--describe-overhead`).
Does not own: any measurement or prediction. Every number here comes from a meshplan command's
own output; the one derived figure, the MFU of a measured step time, rescales `meshplan
estimate`'s MFU (model FLOPs per step over the device peak, planner/cost/estimate.py) from the
predicted to the measured step time, so that there is one MFU convention.

Standard library only: it runs with whatever interpreter the GPU machine has, also when the
meshplan install failed.

    python benchmarks/gpu_check_summary.py --work SCRATCH --out DIR [--device cuda] [--quiet]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# The steps gpu_check.sh runs, in order; a step missing from steps.tsv was not reached.
STEPS = (
    ("0", "install"),
    ("1", "pytest"),
    ("2", "profile"),
    ("3", "validate"),
    ("4a", "memcheck"),
    ("4b", "estimate"),
    ("5", "overhead"),
)
STATUSES = ("ok", "failed", "skipped", "timeout", "unavailable")
GIB = 2**30
MIB = 2**20


def _load(path: Path) -> Any:
    """A JSON document, or None when the file is missing, empty or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(work: Path) -> list[dict[str, Any]]:
    """Every step of STEPS with its status; steps the run never reached are `skipped`."""
    seen: dict[str, dict[str, Any]] = {}
    extra: list[dict[str, Any]] = []
    tsv = work / "steps.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        parts = line.split("\t")
        if len(parts) < 5:
            continue
        sid, name, status, seconds, detail = parts[:5]
        row = {
            "id": sid,
            "name": name,
            "status": status if status in STATUSES else "failed",
            "seconds": int(seconds) if seconds.isdigit() else None,
            "detail": detail,
        }
        if sid in dict(STEPS):
            seen[sid] = row
        else:
            extra.append(row)
    rows = [
        seen.get(sid)
        or {"id": sid, "name": name, "status": "skipped", "seconds": None, "detail": "not reached"}
        for sid, name in STEPS
    ]
    return rows + extra


# ------------------------------------------------------------------ one-line descriptions


def describe_profile(path: Path) -> str:
    doc = _load(path)
    if not isinstance(doc, dict):
        return "profile.json unreadable"
    gpus = doc.get("gpus") or []
    names = sorted({g.get("device_name", "?") for g in gpus})
    pairs = len(doc.get("p2p") or [])
    links = (
        f"links: {pairs} pairs, {len(doc.get('collectives') or [])} collective fits"
        if pairs
        else f"links: no pairs ({len(gpus)} device{'s' if len(gpus) != 1 else ''})"
    )
    dtype = (doc.get("meta") or {}).get("dtype", "?")
    return (
        f"{len(doc.get('compute') or [])} compute cases in {dtype} on {', '.join(names) or '?'}; "
        f"{links}"
    )


def describe_validation(path: Path) -> tuple[str, bool]:
    """The line, and whether every configuration was measured."""
    doc = _load(path)
    if not isinstance(doc, dict):
        return "validation.json unreadable", False
    records = doc.get("records") or []
    done = [r for r in records if r.get("measured_step_time_s") is not None]
    s = doc.get("summary") or {}
    line = (
        f"{len(done)}/{len(records)} measured, time MAPE {_pct(s.get('mape'))}, "
        f"memory MAPE {_pct(s.get('memory_mape'))}"
    )
    failed = [r for r in records if r.get("measured_step_time_s") is None]
    if failed:
        line += f", first failure {failed[0].get('label')}: {str(failed[0].get('error'))[:160]}"
    return line, bool(records) and len(done) == len(records)


def overhead_result(work: Path) -> dict[str, Any] | None:
    """executor_overhead.py's JSON with the MFU of both loops added (None if it did not run)."""
    doc = _load(work / "overhead.json")
    if not isinstance(doc, dict) or "executor_median_step_s" not in doc:
        return None
    est = _load(work / "overhead-estimate.json")
    out = dict(doc)
    out["executor_mfu"] = _mfu_at(est, doc["executor_median_step_s"])
    out["plain_mfu"] = _mfu_at(est, doc["plain_median_step_s"])
    return out


def describe_overhead(work: Path) -> tuple[str, bool]:
    r = overhead_result(work)
    if r is None:
        return "overhead.json unreadable", False
    return (
        f"executor {_ms(r['executor_median_step_s'])} ms, plain loop "
        f"{_ms(r['plain_median_step_s'])} ms, overhead {_pct(r['overhead_ratio'], signed=True)} "
        f"(target <= {_pct(r.get('target_ratio'))}), MFU {_pct(r['executor_mfu'])}",
        True,
    )


# ------------------------------------------------------------------ predicted vs measured


def _mfu_at(est: Any, step_time_s: float | None) -> float | None:
    """`estimate`'s MFU moved from its predicted step time to `step_time_s` (same FLOPs, peak)."""
    if not isinstance(est, dict) or not step_time_s:
        return None
    mfu, predicted = est.get("mfu"), est.get("step_time_s")
    if not isinstance(mfu, (int, float)) or not isinstance(predicted, (int, float)):
        return None
    return float(mfu) * float(predicted) / float(step_time_s)


def _peak_bytes(doc: Any) -> float | None:
    """The largest number under a key naming peak bytes (`peak_memory_bytes`, per-rank peaks):
    memcheck's JSON schema is its own, and the largest rank is the one that has to fit."""
    found: list[float] = []

    def walk(x: Any, key: str = "") -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, str(k))
        elif isinstance(x, list):
            for v in x:
                walk(v, key)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            k = key.lower()
            if "peak" in k and "bytes" in k and "capacity" not in k:
                found.append(float(x))

    walk(doc)
    return max(found) if found else None


def _error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return predicted / measured - 1.0


def _median_metric(work: Path, dtype: str, label: str, key: str, warmup: int) -> float | None:
    """Median of one executor metric over the measured (post-warm-up) steps of every round."""
    values = []
    for path in sorted((work / f"validate-{dtype}").glob(f"round*/metrics/{label}.jsonl")):
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        values += [float(r[key]) for r in rows[warmup:] if key in r]
    return statistics.median(values) if values else None


def comparison(work: Path) -> list[dict[str, Any]]:
    """One row per validated configuration and dtype: measured, estimate (analytic, with the
    profile) and memcheck, time and memory."""
    rows = []
    for vdir in sorted(work.glob("validate-*")):
        dtype = vdir.name.removeprefix("validate-")
        doc = _load(vdir / "validation.json")
        if not isinstance(doc, dict):
            continue
        warmup = int((doc.get("meta") or {}).get("warmup_steps_dropped", 0))
        for r in doc.get("records") or []:
            c = r.get("config") or {}
            key = f"{dtype}-mb{c.get('micro_batch')}-{c.get('recompute')}"
            analytic = _load(work / "estimate" / f"analytic-{key}.json")
            profiled = _load(work / "estimate" / f"profile-{key}.json")
            memcheck = _load(work / "memcheck" / f"{dtype}-{r['label']}.json")
            t = r.get("measured_step_time_s")
            mem = r.get("measured_peak_memory_bytes")
            row: dict[str, Any] = {
                "dtype": dtype,
                "label": r["label"],
                "micro_batch": c.get("micro_batch"),
                "recompute": c.get("recompute"),
                "measured_step_time_s": t,
                "measured_peak_memory_bytes": mem,
                "measured_mfu": _mfu_at(analytic if isinstance(analytic, dict) else profiled, t),
                "executor_mfu": _median_metric(work, dtype, r["label"], "mfu", warmup),
                "validate_predicted_step_time_s": r.get("predicted_step_time_s"),
                "error": r.get("error"),
            }
            for name, est in (("analytic", analytic), ("profile", profiled)):
                est = est if isinstance(est, dict) else {}
                p_t, p_m = est.get("step_time_s"), est.get("peak_memory_bytes")
                row[f"{name}_step_time_s"] = p_t
                row[f"{name}_peak_memory_bytes"] = p_m
                row[f"{name}_fits"] = est.get("fits")
                row[f"{name}_time_error"] = _error(p_t, t)
                row[f"{name}_memory_error"] = _error(p_m, mem)
            m_peak = _peak_bytes(memcheck) if memcheck is not None else None
            row["memcheck_peak_memory_bytes"] = m_peak
            row["memcheck_fits"] = memcheck.get("fits") if isinstance(memcheck, dict) else None
            row["memcheck_memory_error"] = _error(m_peak, mem)
            rows.append(row)
    return rows


# ------------------------------------------------------------------ output


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f} %" if signed else f"{100 * x:.1f} %"


def _mem(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / GIB:.2f} GiB" if x >= GIB else f"{x / MIB:.0f} MiB"


def _with_error(value: str, err: float | None) -> str:
    return value if err is None else f"{value} ({_pct(err, signed=True)})"


def build(work: Path, device: str) -> dict[str, Any]:
    env = _load(work / "env.json") or {}
    validations = {
        p.name.removeprefix("validate-"): (_load(p / "validation.json") or {}).get("summary")
        for p in sorted(work.glob("validate-*"))
    }
    notes = [
        "time error = predicted / measured - 1; MFU of a measured time = estimate's MFU x "
        "predicted / measured step time (model FLOPs over the peak of the configuration's dtype, "
        "planner/cost/estimate.py)",
        "profiled = `meshplan estimate --profile` with the step-2 profile, measured in one dtype "
        "(see step 2) and used for every dtype",
    ]
    if device == "cpu":
        notes.append(
            "CPU: measured memory is the process peak RSS (interpreter and torch included); the "
            "executor trains fp32 on CPU whatever the dtype, which only changes the prediction"
        )
    return {
        "device": device,
        "env": env,
        "steps": read_steps(work),
        "validation_summaries": validations,
        "comparison": comparison(work),
        "overhead": overhead_result(work),
        "profile": describe_profile(work / "profile.json")
        if (work / "profile.json").is_file()
        else None,
        "notes": notes,
    }


def markdown(s: dict[str, Any]) -> str:
    env = s["env"]
    lines = [
        f"# gpu_check: --device {s['device']} on {env.get('host', '?')}",
        "",
        f"python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA "
        f"{env.get('torch_cuda') or '-'}), devices: {', '.join(env.get('gpus') or []) or 'none'}",
        "",
        "## Steps",
        "",
        "| step | name | status | seconds | detail |",
        "|---|---|---|---|---|",
    ]
    for r in s["steps"]:
        secs = "-" if r["seconds"] is None else str(r["seconds"])
        detail = r["detail"].replace("|", "/")
        lines.append(f"| {r['id']} | {r['name']} | {r['status']} | {secs} | {detail} |")
    lines += [
        "",
        "## Predicted vs measured, one device",
        "",
        "| dtype | configuration | measured ms | analytic ms | profiled ms | MFU | "
        "measured peak | analytic peak | memcheck peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["comparison"]:
        lines.append(
            f"| {r['dtype']} | {r['label']} | {_ms(r['measured_step_time_s'])} | "
            f"{_with_error(_ms(r['analytic_step_time_s']), r['analytic_time_error'])} | "
            f"{_with_error(_ms(r['profile_step_time_s']), r['profile_time_error'])} | "
            f"{_pct(r['measured_mfu'])} | {_mem(r['measured_peak_memory_bytes'])} | "
            f"{_with_error(_mem(r['analytic_peak_memory_bytes']), r['analytic_memory_error'])} | "
            f"{_with_error(_mem(r['memcheck_peak_memory_bytes']), r['memcheck_memory_error'])} |"
        )
    if not s["comparison"]:
        lines.append("| - | no configuration was validated | | | | | | | |")
    o = s["overhead"]
    lines += ["", "## Executor vs a plain PyTorch loop", ""]
    if o:
        lines.append(
            f"executor {_ms(o['executor_median_step_s'])} ms/step (MFU {_pct(o['executor_mfu'])}), "
            f"plain loop {_ms(o['plain_median_step_s'])} ms/step (MFU {_pct(o['plain_mfu'])}): "
            f"overhead {_pct(o['overhead_ratio'], signed=True)} over {o.get('steps_timed')} steps "
            f"(target <= {_pct(o.get('target_ratio'))})"
        )
    else:
        lines.append("not measured")
    lines += ["", *[f"- {n}" for n in s["notes"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, help="gpu_check.sh's scratch directory")
    p.add_argument("--out", type=Path, help="where summary.json and summary.md go")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    p.add_argument("--describe-profile", type=Path, metavar="PROFILE_JSON")
    p.add_argument("--describe-validation", type=Path, metavar="VALIDATION_JSON")
    p.add_argument("--describe-overhead", type=Path, metavar="WORK")
    args = p.parse_args(argv)
    if args.describe_profile:
        print(describe_profile(args.describe_profile))
        return 0
    if args.describe_validation or args.describe_overhead:
        line, complete = (
            describe_validation(args.describe_validation)
            if args.describe_validation
            else describe_overhead(args.describe_overhead)
        )
        print(line)
        return 0 if complete else 1
    if args.work is None or args.out is None:
        p.error("--work and --out are needed to write the summary")
    s = build(args.work, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")
    md = markdown(s)
    (args.out / "summary.md").write_text(md)
    if not args.quiet:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
