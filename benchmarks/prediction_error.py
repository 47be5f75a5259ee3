"""Prediction error of the cost model on this host: CPU, 2 gloo ranks, measured profile.

Runs the grid dp2 / pp2 / tp2 x micro-batch x recompute (12 configurations) with the bundled
executor, compares the median step time after warm-up with the cost model's prediction from a
measured profile, and prints a per-configuration table, the MAPE, the Spearman rank correlation
and how much the planner's top choice loses to the measured best. Then fits corrections on
two thirds of the configurations and reports the error on the held-out third.

    python benchmarks/prediction_error.py [--profile P] [--out DIR] [--steps 8] [--repeats 2]

Without --profile it first runs `meshplan profile --device cpu --nproc 2` for the model.
The default model is a 4-layer GPT of hidden 128 (`small-gpt`, written to DIR): large enough
that a step is mostly compute rather than Python overhead, small enough for 2 cores.
Not a timed test: it prints its figures (and writes DIR/validation.json, DIR/report.html).

The raw measured profile prices what this grid found missing (2026-12-02): the optimizer step
with DTensor parameters (profile `optimizer`), tp = 2 blocks timed under the executor's DTensor
TP with their collectives (`tp_collectives_included`) and each FSDP unit's ZeRO-0 sync as
`replicate` runs it (`dp_sync`). Profile and runs share the host's 2 cores with whatever else
runs: a profile taken at a load of 4 times blocks 2-2.5x slower than one at 1, so quote the
load of both (the profile's is printed by `uptime` before it; validation.json has the runs').
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ModelSpec fields of the benchmark model (GPT family: learned positions, GELU, tied head).
SMALL_GPT = "{family: gpt, layers: 4, hidden: 128, heads: 4, ffn_hidden: 512, vocab: 1024, max_seq_len: 128}\n"
GLOBAL_BATCH = 8
SEQ_LEN = 128
LAYOUTS = ((1, 1, 2), (1, 2, 1), (2, 1, 1))  # (tp, pp, dp)
MICRO_BATCHES = (1, 4)
RECOMPUTE = ("none", "full")


def grid() -> list[dict[str, object]]:
    """Every layout x micro-batch x recompute that is valid for batch 8 on 2 ranks."""
    out = []
    for (tp, pp, dp), mb, rc in itertools.product(LAYOUTS, MICRO_BATCHES, RECOMPUTE):
        if GLOBAL_BATCH % (dp * mb) == 0 and GLOBAL_BATCH // (dp * mb) >= pp:
            out.append({"tp": tp, "pp": pp, "dp": dp, "micro_batch": mb, "recompute": rc})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="prediction_error_out", help="working/output directory")
    ap.add_argument("--model", default=None, help="model preset or YAML (default: small-gpt)")
    ap.add_argument("--profile", default=None, help="measured profile (default: measure one)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration (rounds)")
    a = ap.parse_args()

    from cli.validate_cmd import run_validation
    from planner.parallel import ParallelConfig
    from planner.specs import Dtype, TrainingSpec
    from planner.validation import calibrate, load_report
    from presets import load_cluster, load_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_arg = a.model
    if model_arg is None:
        model_arg = str(out / "small-gpt.yaml")
        Path(model_arg).write_text(SMALL_GPT)
    profile = a.profile
    if profile is None:
        profile = str(out / "profile.json")
        cmd = ["meshplan", "profile", "--device", "cpu", "--nproc", "2", "--model", model_arg]
        cmd += ["--micro-batches", ",".join(str(m) for m in MICRO_BATCHES), "--out", profile]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"profiled in {time.perf_counter() - t0:.0f} s -> {profile}")
    model = load_model(model_arg)
    cluster = load_cluster("cpu-2", None)
    training = TrainingSpec(global_batch=GLOBAL_BATCH, seq_len=SEQ_LEN, dtype=Dtype.FP32)
    configs = [ParallelConfig(**c) for c in grid()]
    t0 = time.perf_counter()
    report = run_validation(
        model=model,
        training=training,
        cluster=cluster,
        configs=configs,
        top=len(configs),
        profile_path=profile,
        use_corrections=False,
        steps=a.steps,
        warmup=a.warmup,
        out=out,
        timeout_s=300,
        repeats=a.repeats,
    )
    print(
        f"measured {len(configs)} configurations x {a.repeats} runs in {time.perf_counter() - t0:.0f} s"
    )
    print(
        f"{'configuration':<28} {'rank':>4} {'pred ms':>9} {'meas ms':>9} {'error':>8}  breakdown (ms)"
    )
    for r in sorted(report["records"], key=lambda r: r["planner_rank"]):
        bd = " ".join(
            f"{k.removesuffix('_s')}={v * 1e3:.1f}" for k, v in r["breakdown"].items() if v
        )
        meas = r.get("measured_step_time_s")
        err = r.get("error_fraction")
        print(
            f"{r['label']:<28} {r['planner_rank']:>4} {r['predicted_step_time_s'] * 1e3:>9.2f} "
            f"{'-' if meas is None else f'{meas * 1e3:9.2f}':>9} {'-' if err is None else f'{100 * err:+7.1f}%':>8}  {bd}"
            + (f"  [{r['error']}]" if r.get("error") else "")
        )
    s = report["summary"]
    t = s["top_choice"] or {}
    print(
        f"MAPE {100 * (s['mape'] or 0):.1f} %  (max |error| {100 * (s['max_abs_error'] or 0):.1f} %)"
    )
    noise = s.get("run_to_run_mape")
    print(
        "run-to-run noise floor (MAPE of single runs against the median of runs): "
        + ("-" if noise is None else f"{100 * noise:.1f} %")
    )
    print(f"Spearman rank correlation {s['spearman']}")
    print(
        f"top choice {t.get('top_label')} vs measured best {t.get('best_label')}: "
        f"loses {100 * t.get('loss_fraction', 0):.1f} %"
    )
    records, _ = load_report(out / "validation.json")
    # All factors, then the three terms the per-configuration errors point at on a CPU host
    # (compute under two concurrent workers, TP collectives over gloo, exposed DP sync).
    for factors in (None, ["compute_scale", "tp_comm_scale", "dp_overhead_s"]):
        try:
            cal = calibrate(records, factors=factors)
        except Exception as e:  # too few measured configurations to fit and hold out
            print(f"calibration skipped: {e}")
            return 0
        print(
            f"calibration, factors {'all' if factors is None else ','.join(factors)} "
            f"(fit on {len(cal.fit_labels)}, held out {len(cal.holdout_labels)}):"
        )
        print(
            "  factors:", json.dumps({k: round(v, 4) for k, v in cal.corrections.__dict__.items()})
        )
        print(
            f"  fit MAPE {100 * cal.fit_mape_before:.1f} % -> {100 * cal.fit_mape_after:.1f} %; held-out "
            f"{100 * (cal.holdout_mape_before or 0):.1f} % -> {100 * (cal.holdout_mape_after or 0):.1f} %; "
            f"leave-one-out {100 * (cal.loo_mape_before or 0):.1f} % -> {100 * (cal.loo_mape_after or 0):.1f} %"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
