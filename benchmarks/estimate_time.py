"""Time one `estimate` call (the cost model alone) at cluster sizes from 64 to 4,096 GPUs.

Prints milliseconds per call (median of repeats) for llama3-70b; not a test. The previous
in-suite assertion (< 50 ms on 4,096 GPUs) moved here because wall-clock limits flake on a
loaded runner. Run: `python benchmarks/estimate_time.py [--repeats N]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import presets
from planner.cost.estimate import estimate
from planner.parallel import ParallelConfig
from planner.specs import TrainingSpec

# (nodes of dgx-h100, tp, pp): 64 to 4,096 GPUs, all fitting llama3-70b at seq 8192.
CASES = ((8, 8, 8), (64, 8, 8), (512, 8, 8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case")
    args = parser.parse_args(argv)
    model = presets.load_model("llama3-70b")
    for nodes, tp, pp in CASES:
        cluster = presets.load_cluster("dgx-h100", nodes)
        dp = cluster.num_gpus // (tp * pp)
        training = TrainingSpec(global_batch=2 * dp * pp, seq_len=8192)
        config = ParallelConfig(tp=tp, pp=pp, dp=dp, micro_batch=1, recompute="full")
        estimate(model, training, cluster, config)  # warm caches, as a search would
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            estimate(model, training, cluster, config)
            times.append(time.perf_counter() - t0)
        print(
            f"{cluster.num_gpus:>5} GPUs  tp={tp} pp={pp} dp={dp}: "
            f"{1e3 * statistics.median(times):.2f} ms per estimate (median of {args.repeats})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
