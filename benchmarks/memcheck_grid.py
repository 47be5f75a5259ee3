"""memcheck against the cost model's memory prediction on a grid of real-size configurations.

Runs `run_memcheck` (the executor's own construction and step on fake tensors, layers and
micro-batches extrapolated) for llama3-8b, llama3-70b and gpt3-13b on DGX-H100 clusters over
tp 1-8, pp 1-8, ZeRO 0-3, recompute none/selective/full, SP on/off, micro-batch 1-4 and the
1F1B / interleaved / GPipe schedules, and writes a markdown table of measured vs predicted
memory per pipeline rank (with pp > 2 the first and last ranks, the extremes of the schedule).

    python benchmarks/memcheck_grid.py [--out benchmarks/results/memcheck_grid.md] [--jobs 2]
                                       [--only 1,5,9]

Results are kept per configuration in OUT with .json for .md and the table is rewritten from
them after every configuration, so a long run leaves partial results and `--only` re-measures
some configurations in place. `--repredict` measures nothing and prices the stored
measurements with the current cost model (the measurement does not depend on it). Not a timed test: it records how long each one took, here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "memcheck_grid.md"


@dataclass(frozen=True, kw_only=True)
class Case:
    model: str
    nodes: int
    global_batch: int
    seq_len: int
    config: dict[str, Any]

    @property
    def label(self) -> str:
        c = self.config
        parts = [f"tp{c['tp']} pp{c['pp']} dp{self.dp}", f"mb{c['micro_batch']}"]
        if c["pp"] > 1:
            sched = c.get("schedule", "1f1b")
            parts.append(sched + (f" v{c['virtual_stages']}" if "virtual_stages" in c else ""))
        parts.append(f"z{c.get('zero', 0)}")
        parts.append({"none": "", "selective": "sel", "full": "full"}[c.get("recompute", "none")])
        parts.append("sp" if c.get("sequence_parallel") else "")
        return f"{self.model} {' '.join(p for p in parts if p)}"

    @property
    def dp(self) -> int:
        return self.nodes * 8 // (self.config["tp"] * self.config["pp"])


def _c(**kw: Any) -> dict[str, Any]:
    return kw


L8, L70, G13 = "llama3-8b", "llama3-70b", "gpt3-13b"
CASES = (
    # llama3-8b on one DGX-H100 (8 GPUs), global batch 64 x 4096 tokens
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=1, pp=1, micro_batch=1)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=1, pp=1, micro_batch=2, zero=1)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=1, pp=1, micro_batch=1, zero=2)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=1, pp=1, micro_batch=4, zero=3, recompute="full")),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=2, pp=1, micro_batch=1, zero=1, sequence_parallel=True)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=2, pp=1, micro_batch=2, zero=3, recompute="selective")),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=4, pp=1, micro_batch=1, zero=1, recompute="full", sequence_parallel=True)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=8, pp=1, micro_batch=1, sequence_parallel=True)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=8, pp=1, micro_batch=2)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=2, pp=2, micro_batch=1, zero=1, sequence_parallel=True)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=1, pp=4, micro_batch=1, recompute="selective")),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=2, pp=4, micro_batch=2, schedule="interleaved", virtual_stages=2, sequence_parallel=True)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=1, pp=8, micro_batch=1)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=1, pp=2, micro_batch=2, zero=2, recompute="full")),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=4, pp=2, micro_batch=4, schedule="gpipe", sequence_parallel=True, recompute="full")),
    # llama3-70b on 8 DGX-H100 (64 GPUs), global batch 128 x 4096 tokens
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=8, pp=1, micro_batch=1, zero=3, recompute="full", sequence_parallel=True)),
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=8, pp=1, micro_batch=2, zero=3, recompute="selective", sequence_parallel=True)),
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=8, pp=2, micro_batch=1, zero=1, sequence_parallel=True)),
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=8, pp=4, micro_batch=1, zero=1, recompute="selective", sequence_parallel=True)),
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=8, pp=4, micro_batch=1, zero=1, schedule="interleaved", virtual_stages=2, sequence_parallel=True)),
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=4, pp=8, micro_batch=1, zero=1, recompute="full", sequence_parallel=True)),
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=8, pp=8, micro_batch=1, sequence_parallel=True)),
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=8, pp=8, micro_batch=2, schedule="interleaved", virtual_stages=2, sequence_parallel=True, recompute="selective")),
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=2, pp=8, micro_batch=1, zero=2, recompute="full")),
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=8, pp=2, micro_batch=4, zero=2, recompute="full", sequence_parallel=True)),
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=4, pp=4, micro_batch=2, zero=1, recompute="selective", sequence_parallel=True)),
    # gpt3-13b (GELU, learned positions, tied embeddings) on 2 DGX-H100 (16 GPUs), 64 x 2048
    Case(model=G13, nodes=2, global_batch=64, seq_len=2048, config=_c(tp=1, pp=1, micro_batch=1, zero=3)),
    Case(model=G13, nodes=2, global_batch=64, seq_len=2048, config=_c(tp=2, pp=1, micro_batch=2, zero=1, sequence_parallel=True)),
    Case(model=G13, nodes=2, global_batch=64, seq_len=2048, config=_c(tp=4, pp=2, micro_batch=2, zero=1, recompute="selective", sequence_parallel=True)),
    Case(model=G13, nodes=2, global_batch=64, seq_len=2048, config=_c(tp=2, pp=4, micro_batch=1)),
    Case(model=G13, nodes=2, global_batch=64, seq_len=2048, config=_c(tp=4, pp=4, micro_batch=4, schedule="interleaved", virtual_stages=2, recompute="full")),
    Case(model=G13, nodes=2, global_batch=64, seq_len=2048, config=_c(tp=8, pp=2, micro_batch=1, sequence_parallel=True)),
    Case(model=G13, nodes=2, global_batch=64, seq_len=2048, config=_c(tp=1, pp=2, micro_batch=4, zero=2, recompute="full")),
    # more data-parallel layouts without pipelining
    Case(model=L70, nodes=8, global_batch=128, seq_len=4096, config=_c(tp=4, pp=1, micro_batch=1, zero=3, recompute="selective", sequence_parallel=True)),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=1, pp=1, micro_batch=2, zero=3)),
    Case(model=G13, nodes=2, global_batch=64, seq_len=2048, config=_c(tp=4, pp=1, micro_batch=4, zero=2, recompute="full")),
    Case(model=L8, nodes=1, global_batch=64, seq_len=4096, config=_c(tp=2, pp=1, micro_batch=4, zero=2, recompute="full", sequence_parallel=True)),
)  # fmt: skip


def build(case: Case) -> Any:
    import presets
    from planner.cost.estimate import estimate
    from planner.parallel import ParallelConfig
    from planner.plan import build_plan
    from planner.specs import TrainingSpec

    model = presets.load_model(case.model)
    cluster = presets.load_cluster("dgx-h100", case.nodes)
    training = TrainingSpec(global_batch=case.global_batch, seq_len=case.seq_len)
    config = ParallelConfig(dp=case.dp, **case.config)
    prediction = estimate(model, training, cluster, config).to_json()
    return build_plan(
        model=model,
        training=training,
        cluster=cluster,
        config=config,
        prediction=prediction,
        source="analytic",
    )


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.1f}"


def _states(kinds: dict[str, float], names: tuple[str, ...]) -> float:
    return sum(kinds.get(k, 0.0) for k in names)


MEASURED_STATES = ("parameters", "gathered_parameters", "gradients", "optimizer_state")
PREDICTED_STATES = ("weights", "grads", "optimizer")


def rows_of(index: int, case: Case, report: Any) -> list[dict[str, Any]]:
    out = []
    for s in report.stages:
        m = s.measured
        pred = s.predicted_by_kind_bytes or {}
        out.append(
            {
                "index": index,
                "label": case.label,
                "pp_rank": s.pp_rank,
                "layers": m.layers,
                "by_kind": dict(m.by_kind_bytes),
                "predicted": s.predicted_bytes,
                "measured": m.peak_bytes,
                "required": s.required_bytes,
                "error": None
                if not s.predicted_bytes
                else s.required_bytes / s.predicted_bytes - 1,
                "pred_states": _states(pred, PREDICTED_STATES),
                "meas_states": _states(m.by_kind_bytes, MEASURED_STATES),
                "pred_act": pred.get("activations"),
                "meas_act": m.by_kind_bytes.get("activations", 0),
                "meas_temp": m.by_kind_bytes.get("temporaries", 0)
                + m.by_kind_bytes.get("pipeline_buffers", 0),
                "fits": s.fits,
                "pred_fits": s.predicted_bytes is not None
                and s.predicted_bytes <= s.capacity_bytes,
                "runs": m.runs,
                "wall_s": m.wall_s,
            }
        )
    return out


HEADER = (
    "| # | configuration | pp rank | predicted GiB | measured GiB | + reserve = required GiB "
    "| error | states pred / meas GiB | activations pred / meas GiB | temps+pp bufs GiB "
    "| fits pred / meas | runs | s |"
)


def render(rows: list[dict[str, Any]], failures: list[str], meta: dict[str, str]) -> str:
    lines = [
        "# memcheck vs the cost model's memory prediction",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "Columns: *predicted* is `estimate`'s `stages[i].memory_bytes` (incl. its 2 GiB framework "
        "reserve and fragmentation); *measured* is memcheck's peak of live tensor bytes on one GPU "
        "of the pipeline rank (the executor's own code on fake tensors, layers and micro-batches "
        "extrapolated); *required* adds the planner's reserve (FRAMEWORK_RESERVE_BYTES + "
        "ALLOCATOR_FRAGMENTATION x measured activations); *error* = required / predicted - 1; "
        "*states* = parameters + gathered parameters + gradients + optimizer state (predicted: "
        "weights + grads + optimizer).",
        "",
        HEADER,
        "|" + "---|" * (HEADER.count("|") - 1),
    ]
    for r in rows:
        err = "-" if r["error"] is None else f"{100 * r['error']:+.0f} %"
        lines.append(
            f"| {r['index']} | {r['label']} | {r['pp_rank']} | {_gib(r['predicted'])} "
            f"| {_gib(r['measured'])} | {_gib(r['required'])} | {err} "
            f"| {_gib(r['pred_states'])} / {_gib(r['meas_states'])} "
            f"| {_gib(r['pred_act'])} / {_gib(r['meas_act'])} | {_gib(r['meas_temp'])} "
            f"| {'yes' if r['pred_fits'] else 'no'} / {'yes' if r['fits'] else 'no'} "
            f"| {r['runs']} | {r['wall_s']:.0f} |"
        )
    errors = sorted(abs(r["error"]) for r in rows if r["error"] is not None)
    if errors:
        lines += [
            "",
            f"Over {len(errors)} pipeline ranks of {len({r['index'] for r in rows})} "
            f"configurations: mean |error| {100 * sum(errors) / len(errors):.0f} %, median "
            f"{100 * errors[len(errors) // 2]:.0f} %, max {100 * errors[-1]:.0f} %; fits verdicts "
            f"differ on {sum(r['fits'] != r['pred_fits'] for r in rows)} ranks.",
        ]
    if failures:
        lines += ["", "Not measured:", *(f"- {f}" for f in failures)]
    return "\n".join(lines) + "\n"


def _meta() -> dict[str, str]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs, load {load[0]:.1f} at start)",
        "torch": torch.__version__,
    }


def _load(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"meta": {}, "cases": {}}


def _save(store: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(store, indent=1, sort_keys=True))
    cases = [store["cases"][k] for k in sorted(store["cases"], key=int)]
    rows = [r for c in cases for r in c.get("rows", [])]
    failures = [c["failure"] for c in cases if c.get("failure")]
    out.write_text(render(rows, failures, store["meta"]))


def repredict(store: dict[str, Any]) -> None:
    """Replace each stored row's prediction with the current cost model's. The measurement does
    not depend on the cost model as long as the plan's layer split is the same (checked)."""
    for key, entry in store["cases"].items():
        plan = build(CASES[int(key) - 1])
        stages = {s["pp_rank"]: s for s in plan.prediction["stages"]}
        for row in entry.get("rows", []):
            stage = stages[row["pp_rank"]]
            if "layers" in row and row["layers"] != stage["layers"]:
                raise SystemExit(f"case {key}: the layer split changed; measure it again")
            pred = stage["memory"]
            row["predicted"] = stage["memory_bytes"]
            row["pred_states"] = _states(pred, PREDICTED_STATES)
            row["pred_act"] = pred.get("activations")
            row["error"] = row["required"] / row["predicted"] - 1
            row["pred_fits"] = row["predicted"] <= stage["capacity_bytes"]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--jobs", type=int, default=2, help="pipeline ranks measured in parallel")
    ap.add_argument(
        "--only", default=None, help="comma-separated case numbers (1-based), run in this order"
    )
    ap.add_argument(
        "--repredict",
        action="store_true",
        help="measure nothing: price the stored measurements again with the current cost model",
    )
    args = ap.parse_args()
    store = _load(args.out.with_suffix(".json"))
    if args.repredict:
        repredict(store)
        _save(store, args.out)
        print(f"wrote {args.out}")
        return 0
    from executor.memcheck import run_memcheck

    # in the order given (cheap cases first), else all in order
    order = [int(x) for x in args.only.split(",")] if args.only else range(1, len(CASES) + 1)
    store["meta"] = _meta()
    for i in order:
        case = CASES[i - 1]
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"label": case.label}
        try:
            plan = build(case)
            pp = plan.config.pp
            ranks = (0, pp - 1) if pp > 2 else None
            report = run_memcheck(plan, pp_ranks=ranks, jobs=args.jobs)
        except Exception as e:  # a case that cannot run is reported, not fatal
            entry["failure"] = f"{i} {case.label}: {type(e).__name__}: {str(e)[:300]}"
        else:
            entry["rows"] = rows_of(i, case, report)
            entry["notes"] = list(report.notes)
        store["cases"][str(i)] = entry
        print(f"[{i}/{len(CASES)}] {case.label}: {time.perf_counter() - t0:.0f} s", flush=True)
        _save(store, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
