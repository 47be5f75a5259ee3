"""How long `meshplan plan`'s search takes as the cluster and the model grow (a benchmark, not a test).

Owns: timing planner.search.search on fixed inputs and printing a table (or --json).
Targets (issue 4, on a 2-core machine): 64 GPUs < 1 s; llama3-70b on 512 x DGX H100 (4096
GPUs) < 10 s; 2048 nodes (16384 GPUs) < 60 s. Wall time depends on what else runs on the
machine, so CPU time (process_time) is printed too, with the work counters
(SplitProblems built, ILPs solved, full estimates) that do not.

Run: python benchmarks/search_time.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

import planner.search as search_mod
import presets
from planner.search import SearchOptions
from planner.specs import ModelSpec, TrainingSpec

# (label, model, node type, nodes, global batch in sequences, seq len). Llama 3 70B pretraining
# used 16M-token batches at 8K context (Dubey et al. 2024, Sec. 3.4.1): 2048 x 8192; the batch
# grows with the cluster so every size has a valid data-parallel degree.
GPU_SWEEP = (
    ("gpt3-13b / 8 x dgx-a100 (64 GPUs)", "gpt3-13b", "dgx-a100-80gb", 8, 512, 2048),
    ("llama3-70b / 64 x dgx-h100 (512 GPUs)", "llama3-70b", "dgx-h100", 64, 2048, 8192),
    ("llama3-70b / 512 x dgx-h100 (4096 GPUs)", "llama3-70b", "dgx-h100", 512, 2048, 8192),
    ("llama3-70b / 2048 x dgx-h100 (16384 GPUs)", "llama3-70b", "dgx-h100", 2048, 8192, 8192),
)
# Layer counts of a llama3-70b-shaped model on 64 x DGX H100 (512 GPUs), batch 2048 x 4096.
LAYER_SWEEP = (16, 32, 64, 80, 128)


class _Counting:
    """Counts calls of the cost model's entry points and the ILP while a search runs."""

    def __init__(self) -> None:
        self.counts = {"split_problems": 0, "estimates": 0, "ilps": 0}
        self._orig = (search_mod.split_problem, search_mod.estimate, search_mod.solve_split)

    def __enter__(self) -> _Counting:
        sp, est, ilp = self._orig

        def count_sp(*a: Any, **k: Any) -> Any:
            self.counts["split_problems"] += 1
            return sp(*a, **k)

        def count_est(*a: Any, **k: Any) -> Any:
            self.counts["estimates"] += 1
            return est(*a, **k)

        def count_ilp(*a: Any, **k: Any) -> Any:
            self.counts["ilps"] += 1
            return ilp(*a, **k)

        search_mod.split_problem = count_sp
        search_mod.estimate = count_est
        search_mod.solve_split = count_ilp
        return self

    def __exit__(self, *exc: object) -> None:
        search_mod.split_problem, search_mod.estimate, search_mod.solve_split = self._orig


def run_one(
    label: str, model: ModelSpec, node: str, nodes: int, batch: int, seq: int
) -> dict[str, Any]:
    cluster = presets.load_cluster(node, nodes)
    training = TrainingSpec(global_batch=batch, seq_len=seq)
    with _Counting() as counter:
        wall, cpu = time.perf_counter(), time.process_time()
        result = search_mod.search(model, training, cluster, SearchOptions(top_k=5))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    c = result.plans[0].config
    return {
        "case": label,
        "gpus": cluster.num_gpus,
        "layers": model.layers,
        "wall_s": wall,
        "cpu_s": cpu,
        "considered": result.candidates_considered,
        "pruned": result.candidates_pruned,
        "evaluated": result.candidates_evaluated,
        **counter.counts,
        "winner": f"tp={c.tp} pp={c.pp} dp={c.dp} mb={c.micro_batch} {c.schedule.value}"
        f"{f' v={c.virtual_stages}' if c.virtual_stages > 1 else ''} "
        f"rc={c.recompute.value} sp={int(c.sequence_parallel)} zero={c.zero}",
        "mfu": result.plans[0].estimate.mfu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 16384-GPU case")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    rows = []
    for label, model, node, nodes, batch, seq in GPU_SWEEP:
        if args.quick and nodes > 512:
            continue
        rows.append(
            {"sweep": "gpus", **run_one(label, presets.load_model(model), node, nodes, batch, seq)}
        )
    base = presets.load_model("llama3-70b")
    for layers in LAYER_SWEEP:
        m = replace(base, name=f"llama3-70b-shape-{layers}L", layers=layers)
        rows.append(
            {
                "sweep": "layers",
                **run_one(f"{layers} layers / 512 GPUs", m, "dgx-h100", 64, 2048, 4096),
            }
        )
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="meshplan search time (top-5, analytic cost model)")
    cols = (
        "case",
        "wall_s",
        "cpu_s",
        "considered",
        "pruned",
        "evaluated",
        "split_problems",
        "ilps",
        "estimates",
        "winner",
        "mfu",
    )
    for col in cols:
        table.add_column(col, justify="left" if col in ("case", "winner") else "right")
    for row in rows:
        table.add_row(
            *(f"{row[c]:.2f}" if c in ("wall_s", "cpu_s", "mfu") else str(row[c]) for c in cols)
        )
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
