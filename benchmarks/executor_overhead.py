"""Executor overhead: the executor at (tp, pp, dp) = (1, 1, 1) against a plain PyTorch loop.

Owns: this measurement only. Both loops train the same `executor.model.Transformer`, initialised
by `init_weights` with the same seed, on the same synthetic batches, with the same AdamW and the
same micro-batching, on one process. Each step is timed over the same span (zero_grad ->
forward/backward of every micro-batch -> optimizer step -> loss as a number); runs alternate
(executor, plain, executor, ...) so drifting machine load hits both alike, and the first
`--warmup` steps of every run are dropped. Prints the median step times and the overhead
ratio (target <= 5 %, issue 6); `--json` prints one JSON document instead.

    python benchmarks/executor_overhead.py [--steps 12] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

import presets
from executor.data import SyntheticTokens, local_batch
from executor.device import make_runtime
from executor.mesh import init_distributed
from executor.model import Transformer, init_weights, loss_fn
from executor.train import ADAM_BETAS, WEIGHT_DECAY, TrainOptions, train
from planner.parallel import ParallelConfig
from planner.plan import Plan, build_plan
from planner.specs import Dtype, ModelSpec, TrainingSpec

LR = 3e-4


def _plan(args: argparse.Namespace) -> Plan:
    model = ModelSpec(
        name="bench",
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.heads,
        ffn_hidden=4 * args.hidden,
        vocab=args.vocab,
        max_seq_len=args.seq,
    )
    node_type = "cpu-2" if args.device == "cpu" else "dgx-h100"
    base = presets.load_cluster(node_type)
    cluster = replace(base, name="one", nodes=(replace(base.nodes[0], gpus=1),))
    dtype = Dtype.FP32 if args.device == "cpu" else Dtype.BF16
    return build_plan(
        model=model,
        training=TrainingSpec(global_batch=args.batch, seq_len=args.seq, dtype=dtype),
        cluster=cluster,
        config=ParallelConfig(tp=1, pp=1, dp=1, micro_batch=args.micro_batch),
        prediction={},
        source="analytic",
    )


def _executor_steps(plan: Plan, args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        init_distributed(
            plan, "gloo" if args.device == "cpu" else "nccl", gpu_id=0, store=dist.HashStore()
        )
        try:
            train(
                plan,
                TrainOptions(
                    steps=args.steps, device=args.device, lr=LR, metrics_path=str(metrics)
                ),
            )
        finally:
            dist.destroy_process_group()
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [float(r["step_time_s"]) for r in rows]


def _plain_steps(plan: Plan, args: argparse.Namespace) -> list[float]:
    """The loop a user would write by hand around the same model, data and optimizer."""
    rt = make_runtime(args.device, local_rank=0, local_world_size=1, dtype=plan.training.dtype)
    model = Transformer(plan.model).to(rt.device)
    init_weights(model, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
    t = plan.training
    source = SyntheticTokens(
        vocab=plan.model.vocab, seq_len=t.seq_len, batch=t.global_batch, seed=0
    )
    m = plan.num_micro_batches
    times = []
    for step in range(args.steps):
        inputs, targets = local_batch(source, step, dp=1, dp_rank=0, device=rt.device)
        rt.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=rt.device)
        for x, y in zip(inputs.chunk(m), targets.chunk(m), strict=True):
            with rt.autocast():
                loss = loss_fn(model(x), y) / m
            loss.backward()
            total += loss.detach()
        opt.step()
        float(total)
        rt.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    plan = _plan(args)
    executor: list[float] = []
    plain: list[float] = []
    for _ in range(args.repeats):
        executor += _executor_steps(plan, args)[args.warmup :]
        plain += _plain_steps(plan, args)[args.warmup :]
    e, b = statistics.median(executor), statistics.median(plain)
    result = {
        "device": args.device,
        "steps_timed": len(executor),
        "executor_median_step_s": e,
        "plain_median_step_s": b,
        "overhead_ratio": e / b - 1.0,
        "target_ratio": 0.05,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"executor {e * 1e3:.1f} ms/step, plain loop {b * 1e3:.1f} ms/step "
            f"(medians of {len(executor)} steps each): overhead {100 * result['overhead_ratio']:+.2f} % "
            f"(target <= 5 %)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
