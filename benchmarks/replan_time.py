"""How long `meshplan replan` takes on a 4,096-GPU job (a benchmark, not a test).

Owns: timing planner.replan (survivors, search, placement, building the plan) after one node,
eight nodes, one GPU or one NIC fails, on the plan `meshplan plan` makes for llama3-70b on
512 x DGX H100 (batch 2,048 x 8,192 tokens, benchmarks/search_time.py's case). Target (issue
19): under 10 s on the 2-core development machine. Wall time depends on the machine's load,
so CPU time (process_time) is printed too, with the predicted slowdown and the global batch.

Run: python benchmarks/replan_time.py [--nodes 512] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import presets
from planner import replan as rp
from planner.plan import Plan, build_plan
from planner.planning import place_winner
from planner.search import search
from planner.specs import TrainingSpec

MODEL, NODE_TYPE, BATCH, SEQ = "llama3-70b", "dgx-h100", 2048, 8192


def _old_plan(nodes: int) -> Plan:
    model, cluster = presets.load_model(MODEL), presets.load_cluster(NODE_TYPE, nodes)
    training = TrainingSpec(global_batch=BATCH, seq_len=SEQ)
    best = place_winner(model, training, cluster, search(model, training, cluster)).plans[0]
    return build_plan(
        model=model,
        training=training,
        cluster=cluster,
        config=best.config,
        prediction=best.estimate.to_json(),
        source=best.estimate.source,
    )


def _cases(nodes: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("lose node3", {"exclude_nodes": [3]}),
        ("lose 8 nodes", {"exclude_nodes": list(range(0, nodes, nodes // 8))[:8]}),
        ("lose GPU 17 (node2 left out)", {"exclude_gpus": [17]}),
        ("node2 NIC at 0.25", {"degrade": [(2, 0.25)]}),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=512)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    old = _old_plan(a.nodes)
    rows = []
    for label, kw in _cases(a.nodes):
        wall, cpu = time.perf_counter(), time.process_time()
        res = rp.replan(old, rp.survivors(old.cluster, **kw))
        rows.append(
            {
                "case": label,
                "gpus": res.plan.cluster.num_gpus,
                "wall_s": time.perf_counter() - wall,
                "cpu_s": time.process_time() - cpu,
                "layout": f"tp={res.plan.config.tp} pp={res.plan.config.pp} dp={res.plan.config.dp}",
                "global_batch": res.plan.training.global_batch,
                "slowdown": res.slowdown,
            }
        )
    load = os.getloadavg()[0]
    if a.json:
        print(json.dumps({"old_gpus": old.cluster.num_gpus, "load_average": load, "rows": rows}))
        return 0
    c = old.config
    print(
        f"{MODEL} on {a.nodes} x {NODE_TYPE} ({old.cluster.num_gpus} GPUs), old plan tp={c.tp} "
        f"pp={c.pp} dp={c.dp}; load average {load:.1f}"
    )
    print(
        f"{'case':32} {'GPUs':>5} {'wall s':>7} {'cpu s':>6} {'batch':>6} {'slowdown':>9}  layout"
    )
    for r in rows:
        print(
            f"{r['case']:32} {r['gpus']:>5} {r['wall_s']:>7.2f} {r['cpu_s']:>6.2f} "
            f"{r['global_batch']:>6} {100 * (r['slowdown'] - 1):>+8.1f}%  {r['layout']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
