"""Wall time of `meshplan emit` for 128, 512 and 2,048 DGX H100 nodes (8 GPUs each).

Plan: llama3-8b, seq 4096, tp=8, pp=2, dp = nodes / 2, 4 sequences per node per step. For each
size it prints the seconds of: `render` (all launch files in memory), writing a new launch
directory (render included), re-emitting into that directory, and `load_plan` (the CLI's
other cost: `meshplan emit` = load + write). The issue's bar is 2,048 nodes within 5 s.
Run: `python benchmarks/emit_time.py [--nodes 128 512 2048] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import presets  # noqa: E402
from cli.launch_cmd import write_launch_dir  # noqa: E402
from executor.emit import EmitOptions, render  # noqa: E402
from planner.parallel import ParallelConfig  # noqa: E402
from planner.plan import Plan, build_plan, load_plan, save_plan  # noqa: E402
from planner.specs import TrainingSpec  # noqa: E402

LIMIT_2048_S = 5.0


def make_plan(nodes: int) -> Plan:
    return build_plan(
        model=presets.load_model("llama3-8b"),
        training=TrainingSpec(global_batch=4 * nodes, seq_len=4096),
        cluster=presets.load_cluster("dgx-h100", nodes),
        config=ParallelConfig(tp=8, pp=2, dp=nodes // 2, micro_batch=1),
        prediction={},
        source="analytic",
    )


def _seconds(fn: object, *args: object, **kwargs: object) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)  # type: ignore[operator]
    return time.perf_counter() - start


def run(nodes: int, work: Path) -> dict[str, float | int]:
    plan = make_plan(nodes)
    opts = EmitOptions(rdzv_endpoint="node0.example:29500", steps=100)
    out = work / f"launch-{nodes}"
    plan_path = work / f"plan-{nodes}.json"
    save_plan(plan, plan_path)
    return {
        "nodes": nodes,
        "render_s": _seconds(render, plan, opts),
        "write_new_s": _seconds(write_launch_dir, plan, out, opts),
        "reemit_s": _seconds(write_launch_dir, plan, out, opts),
        "load_plan_s": _seconds(load_plan, plan_path),
        "files": len(list(out.iterdir())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(n, Path(tmp)) for n in args.nodes]
    if args.json:
        print(json.dumps({"rows": rows, "limit_2048_s": LIMIT_2048_S}, indent=2))
        return 0
    print(
        f"{'nodes':>6} {'render s':>9} {'write s':>8} {'re-emit s':>10} {'load_plan s':>12} files"
    )
    for r in rows:
        print(
            f"{r['nodes']:>6} {r['render_s']:>9.2f} {r['write_new_s']:>8.2f} "
            f"{r['reemit_s']:>10.2f} {r['load_plan_s']:>12.2f} {r['files']}"
        )
    print(f"bar: 2048 nodes emitted (load + write) within {LIMIT_2048_S:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
