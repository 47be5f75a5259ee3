"""Optimizer-step measurement: the executor's AdamW over one block's parameters, timed.

Owns: building each block kind's parameters at the tensor-parallel-sharded shapes (the same
modules compute.py times), giving them gradients, and timing `step` of the
optimizer executor/train.py runs (AdamW, its betas and weight decay), with the parameters as
plain tensors and as DTensors (`OptimizerRecord.distributed`), into `OptimizerRecord`s.
Does not own: the forward/backward timings (compute.py) or the clock (device.py).

Why it is measured and not priced from bytes alone: on CPU the for-loop AdamW pays a fixed
dispatch cost per tensor and op, and DTensor parameters (FSDP2 / replicate with dp > 1, TP
with tp > 1) pay DTensor's Python dispatch on every op. On the 2-core development VM
(2026-12-02, load ~1.4) the executor's step took 42-72 ms with DTensor parameters (dp2, tp2)
and 6 ms with plain ones (pp2 rank), against 1.3-2.6 ms from bytes / memory bandwidth.
The DTensors are made with `DTensor.from_local` (Replicate over a mesh of the whole world, no
communication), so a worker that measures never waits for one that does not; elementwise
optimizer ops are local under every placement, so the placement does not change the cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from planner.parallel import Recompute
from planner.profile import BlockKind, OptimizerRecord
from planner.specs import ModelSpec
from profiler import device as dev
from profiler.compute import ComputeCase, ComputeSettings, build_block
from profiler.stats import iqr, median


def _world_mesh(device: torch.device) -> object | None:
    """A 1-D DeviceMesh over every rank of the running process group (its default group, so
    no group is created), or None outside a process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_available() or not dist.is_initialized():
        return None
    return DeviceMesh(device.type, list(range(dist.get_world_size())))


def _params(
    module: torch.nn.Module, mesh: object | None, distributed: bool
) -> list[torch.nn.Parameter]:
    """The module's parameters with gradients, as plain tensors or as Replicate DTensors."""
    from torch.distributed.tensor import DTensor, Replicate

    out = []
    for p in module.parameters():
        data = p.detach()
        if distributed:
            data = DTensor.from_local(data, mesh, [Replicate()], run_check=False)
        q = torch.nn.Parameter(data)
        q.grad = torch.randn_like(q)
        out.append(q)
    return out


def measure_optimizer_case(
    spec: ModelSpec,
    block: BlockKind,
    tp: int,
    distributed: bool,
    settings: ComputeSettings,
    device: torch.device,
    device_name: str,
    mesh: object | None,
) -> OptimizerRecord:
    """`warmup` untimed then `repeats` timed `step()` calls on fixed gradients (zero_grad is not
    timed: the executor sets gradients to None, 0.3-1 ms per step in the phase timings)."""
    from executor.train import ADAM_BETAS, WEIGHT_DECAY

    case = ComputeCase(block=block, tp=tp, micro_batch=1, recompute=Recompute.NONE)
    module = build_block(spec, case, device, settings.dtype)
    params = _params(module, mesh, distributed)
    opt = torch.optim.AdamW(params, lr=3e-4, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        opt.step()

    for _ in range(settings.warmup):
        step()
    times = [dev.time_region(device, step) for _ in range(settings.repeats)]
    return OptimizerRecord(
        block=block,
        device_name=device_name,
        tp=tp,
        distributed=distributed,
        step_s=median(times),
        step_spread_s=iqr(times),
        parameter_bytes=sum(p.numel() * p.element_size() for p in module.parameters()),
        parameter_tensors=len(params),
        repeats=settings.repeats,
    )


def measure_optimizer(
    spec: ModelSpec,
    settings: ComputeSettings,
    device: torch.device,
    device_name: str,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[OptimizerRecord]:
    """Every (block kind, tp, plain/DTensor) step; DTensor cases only inside a process group."""
    mesh = _world_mesh(device)
    out = []
    for tp in settings.tps:
        for block in BlockKind:
            for distributed in (False, True) if mesh is not None else (False,):
                if should_stop():
                    return out
                out.append(
                    measure_optimizer_case(
                        spec, block, tp, distributed, settings, device, device_name, mesh
                    )
                )
    return out
