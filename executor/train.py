"""Train with exactly a plan's layout: `python -m executor.train --plan plan.json [...]`.

Owns: the command line, process-group start-up and the training loop (`train`).
Does not own: building the parallel model (parallelize.py), data (data.py), checkpoints
(checkpoint.py) or metrics (metrics.py).

Started by torchrun (one process per plan GPU; torchrun's RANK = GPU id, the process-group rank
becomes the mesh rank, see mesh.py) or as one plain process for a one-GPU plan. `train` runs
inside a process group started by `mesh.init_distributed`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from executor.checkpoint import load_checkpoint, save_checkpoint
from executor.checkpoint_dir import latest_step
from executor.data import local_batch, make_source
from executor.device import Runtime, make_runtime
from executor.faults import maybe_exit
from executor.mesh import build_mesh, init_distributed, process_gpu_id
from executor.metrics import (
    MetricsLog,
    StepMetrics,
    cluster_peak_flops,
    model_flops_per_token,
)
from executor.model import loss_fn
from executor.moe import moe_modules
from executor.parallelize import ParallelModel, context_parallel, parallelize
from executor.tp import loss_context
from planner.errors import ConfigError, MeshplanError, SpecError
from planner.plan import Plan, load_plan

ADAM_BETAS = (0.9, 0.95)  # GPT-3 (Brown et al. 2020, Appendix B) and Llama-2 pre-training
WEIGHT_DECAY = 0.1  # same sources


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    steps: int = 10
    data: str = "synthetic"
    metrics_path: str | None = None
    device: str = "cpu"
    seed: int = 0
    lr: float = 3e-4
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (loss-parallel loss) as a plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local_step(
    model: ParallelModel,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    m: int,
    tp: int,
    zero: int,
    rt: Runtime,
) -> torch.Tensor | None:
    """Forward + backward of this rank's share of one step; the mean loss where the head is."""
    if model.schedule is not None:
        losses: list[torch.Tensor] = []
        args = (inputs,) if model.has_embedding else ()
        with rt.autocast(), loss_context(tp):
            # return_outputs=False: otherwise the last stage keeps every micro-batch's logits
            # until the step ends (torch's `output_chunks`), m x tokens x vocab/tp elements.
            if model.has_head:
                model.schedule.step(*args, target=targets, losses=losses, return_outputs=False)
            else:
                model.schedule.step(*args, return_outputs=False)
        return torch.stack([_local(x) for x in losses]).mean().detach() if model.has_head else None
    ((_, module),) = model.chunks
    total = torch.zeros((), device=rt.device)
    sync = getattr(module, "set_requires_gradient_sync", None)
    for i, (x, y) in enumerate(zip(inputs.chunk(m), targets.chunk(m), strict=True)):
        if sync is not None:
            # ZeRO-2/3 keep gradients sharded: reduce-scatter after every micro-batch (the cost
            # model prices it so, planner/cost/estimate.py); ZeRO-0/1 reduce once per step.
            sync(zero >= 2 or i == m - 1)
        with loss_context(tp):
            with rt.autocast():
                loss = loss_fn(module(x), y) / m
            loss.backward()
        total += _local(loss.detach())
    return total


def _global_loss(
    local: torch.Tensor | None, plan: Plan, tp_rank: int, device: torch.device
) -> float:
    """Mean loss over dp ranks (and the cp shards of each sequence, which hold equal token
    counts), from the last stage's tp-rank-0 processes, known to every rank."""
    value = local.float() if local is not None and tp_rank == 0 else torch.zeros((), device=device)
    value = value / plan.config.dp_cp
    dist.all_reduce(value)
    return float(value)


def _global_aux_loss(
    model: ParallelModel, plan: Plan, tp_rank: int, device: torch.device
) -> float | None:
    """The MoE load-balancing loss of the step (summed over layers, mean over micro-batches and
    dp ranks and cp shards, as `_global_loss`), known to every rank; None for a dense model. The last m values per layer are
    the step's: pipelining's metadata inference runs one extra forward in the first step."""
    if plan.model.moe is None:
        return None
    m, total = plan.num_micro_batches, 0.0
    for module in model.modules:
        for moe in moe_modules(module):
            values = moe.pop_aux_losses()[-m:]
            total += float(torch.stack(values).mean()) if values else 0.0
    value = torch.tensor(total if tp_rank == 0 else 0.0, device=device) / plan.config.dp_cp
    dist.all_reduce(value)
    return float(value)


def train(plan: Plan, opts: TrainOptions) -> list[float]:
    """Run `opts.steps` optimizer steps (from the checkpoint with --resume); return every
    step's loss. The default process group must be running with the plan's world size."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    rt = make_runtime(
        opts.device, local_rank=local_rank, local_world_size=local_world, dtype=plan.training.dtype
    )
    mesh = build_mesh(plan, rt.device.type)
    model = parallelize(plan, mesh, rt, seed=opts.seed)
    optimizers = [
        torch.optim.AdamW(m.parameters(), lr=opts.lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
        for m in model.modules
    ]
    start = 0
    if (
        opts.resume
        and opts.checkpoint_dir
        and (last := latest_step(opts.checkpoint_dir)) is not None
    ):
        start = load_checkpoint(opts.checkpoint_dir, last, model, optimizers, plan)
    t = plan.training
    source = make_source(
        opts.data, vocab=plan.model.vocab, seq_len=t.seq_len, batch=t.global_batch, seed=opts.seed
    )
    tokens = t.global_batch * t.seq_len
    flops = model_flops_per_token(plan.model, t.seq_len) * tokens
    peak = cluster_peak_flops(plan)
    log = MetricsLog(opts.metrics_path, enabled=dist.get_rank() == 0)
    cp = context_parallel(mesh, plan) if plan.config.cp > 1 else None
    losses: list[float] = []
    for step in range(start, opts.steps):
        inputs, targets = local_batch(
            source, step, dp=plan.config.dp, dp_rank=mesh.dp_rank, device=rt.device
        )
        if cp is not None:  # this rank's load-balanced chunks of every sequence
            inputs, targets = cp.shard(inputs), cp.shard(targets)
        rt.synchronize()
        rt.reset_peak_memory()
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        local = _local_step(
            model, inputs, targets, plan.num_micro_batches, plan.config.tp, plan.config.zero, rt
        )
        maybe_exit(dist.get_rank(), step + 1)
        for opt in optimizers:
            opt.step()
        loss = _global_loss(local, plan, mesh.tp_rank, rt.device)
        aux = _global_aux_loss(model, plan, mesh.tp_rank, rt.device)
        rt.synchronize()
        dt = time.perf_counter() - t0
        losses.append(loss)
        mem = torch.tensor([rt.peak_memory_bytes()], dtype=torch.int64, device=rt.device)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        log.write(
            StepMetrics(
                step=step + 1,
                loss=loss,
                step_time_s=dt,
                tokens_per_s=tokens / dt,
                mfu=flops / dt / peak,
                peak_memory_bytes=int(mem),
                tokens=tokens,
                lr=opts.lr,
                aux_loss=aux,
            )
        )
        done = step + 1
        if opts.checkpoint_dir and opts.checkpoint_every and done % opts.checkpoint_every == 0:
            save_checkpoint(opts.checkpoint_dir, done, model, optimizers, plan)
    return losses


def _parse(argv: list[str] | None) -> tuple[Path, TrainOptions]:
    p = argparse.ArgumentParser(prog="python -m executor.train", description=__doc__.split("\n")[0])
    p.add_argument("--plan", required=True, type=Path, help="plan.json from `meshplan plan`")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps to run (total)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a uint16/uint32 token file")
    p.add_argument("--metrics", default=None, help="append one JSON line per step here")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return a.plan, TrainOptions(
        steps=a.steps,
        data=a.data,
        metrics_path=a.metrics,
        device=device,
        seed=a.seed,
        lr=a.lr,
        checkpoint_dir=a.checkpoint_dir,
        checkpoint_every=a.checkpoint_every,
        resume=a.resume,
    )


def main(argv: list[str] | None = None) -> int:
    """Known errors (bad plan, wrong process count, missing data) print one `error:` line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    plan_path, opts = _parse(argv)
    try:
        return _run(plan_path, opts)
    except MeshplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _restart_store() -> dist.Store | None:
    """torchrun's agent store under a prefix per restart attempt (None: plain env://). torch
    2.13's c10d rendezvous keeps one TCPStore for every round (dynamic_rendezvous.py,
    `_shared_tcp_store_server`) and the env:// handler adds no per-attempt prefix ("We create a
    new TCPStore for every retry"), so a restarted gloo group could read the dead attempt's peer
    addresses (seen: 1 of 3 restarts failed in `connectFullMesh ... Connection refused`; 0 of 9
    with the prefix)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=default_pg_timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"meshplan/attempt_{attempt}", store)


def _run(plan_path: Path, opts: TrainOptions) -> int:
    plan = load_plan(plan_path)
    if opts.data != "synthetic" and not Path(opts.data).is_file():
        raise SpecError(f"--data {opts.data}: token file not found (or use 'synthetic')")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != plan.config.world_size:
        cfg = plan.config
        raise ConfigError(
            f"the plan needs {cfg.degrees_text()} = {cfg.world_size} processes; "
            f"{world} were started (torchrun --nproc-per-node x --nnodes)"
        )
    backend = "nccl" if opts.device == "cuda" else "gloo"
    if "RANK" in os.environ:
        gpu_id = process_gpu_id(plan, os.environ)
        init_distributed(plan, backend, gpu_id=gpu_id, store=_restart_store())
    else:
        init_distributed(plan, backend, gpu_id=0, store=dist.HashStore())
    try:
        train(plan, opts)
        # Every rank finishes its last collective before any tears gloo down: without this a
        # rank that exits first closes the pairs a peer still reads (SIGABRT seen on CPU).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
