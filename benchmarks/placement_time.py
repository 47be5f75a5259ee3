"""Wall time and predicted gain of `planner.placement.place` from 64 to 4096 GPUs.

Cluster: N DGX H100 nodes, node 3's NICs at 25 % speed (cluster YAML `nic_factor: 0.25`);
model llama3-70b, seq 8192, tp=8, pp=4, dp = N*8/32, 16 micro-batches of 1 sequence per
pipeline. Run: `python benchmarks/placement_time.py [--budget 5] [--json]`.
Prints one line per size (GPUs, method, seconds, default and placed step time, speedup);
the issue's bar is 4096 GPUs within 10 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from planner.parallel import ParallelConfig  # noqa: E402
from planner.placement import place  # noqa: E402
from planner.specs import TrainingSpec  # noqa: E402
from presets import cluster_from_dict, load_model  # noqa: E402

# The bar for 4096 GPUs (seconds).
LIMIT_4096_S = 10.0


def run(nodes: int, budget_s: float, seed: int) -> dict[str, object]:
    layout = [
        {"type": "dgx-h100", "count": 3},
        {"type": "dgx-h100", "nic_factor": 0.25},
        {"type": "dgx-h100", "count": nodes - 4},
    ]
    cluster = cluster_from_dict({"nodes": layout}, "bench", None)
    model = load_model("llama3-70b")
    tp, pp = 8, 4
    dp = cluster.num_gpus // (tp * pp)
    config = ParallelConfig(tp=tp, pp=pp, dp=dp, micro_batch=1)
    training = TrainingSpec(global_batch=dp * 16, seq_len=8192)
    start = time.perf_counter()
    result = place(model, training, cluster, config, time_budget_s=budget_s, seed=seed)
    seconds = time.perf_counter() - start
    return {
        "gpus": cluster.num_gpus,
        "method": result.method,
        "seconds": seconds,
        "default_step_s": result.default_step_time_s,
        "placed_step_s": result.step_time_s,
        "speedup": result.speedup,
        "objective": result.objective,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=5.0, help="place()'s time_budget_s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    rows = [run(n, args.budget, args.seed) for n in (8, 64, 128, 512)]
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        for r in rows:
            sys.stdout.write(
                f"{r['gpus']:5d} GPUs  {r['method']:12s} {r['seconds']:6.2f} s  step "
                f"{r['default_step_s']:.3f} -> {r['placed_step_s']:.3f} s  "
                f"x{r['speedup']:.3f} ({r['objective']})\n"
            )
    big = rows[-1]
    if big["seconds"] > LIMIT_4096_S:  # type: ignore[operator]
        sys.stderr.write(f"4096 GPUs took {big['seconds']:.1f} s > {LIMIT_4096_S} s\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
