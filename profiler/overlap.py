"""Overlap measurement: how much of a collective really hides behind compute on this device.

Owns: timing one transformer block's forward + backward alone, an all-reduce of the block's
gradient bytes over the node's workers alone, and the two together (the all-reduce issued
first, asynchronously, on the communication library's own stream; the block computed; then the
wait), into an `OverlapRecord` whose `efficiency` replaces the runtime's estimated overlap
efficiency in planner/cost/dp_sync.py. On a GPU the collective's kernels take SMs and memory
bandwidth from the block beside them; on CPU workers gloo's threads take the cores the block
computes on (the cost model does not overlap anything on CPU workers, so a CPU record is
information only). Does not own: the block (compute.py) or the format (planner/profile.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from planner.parallel import Recompute
from planner.profile import BlockKind, OverlapRecord
from planner.specs import ModelSpec
from profiler import device as dev
from profiler.compute import ComputeCase, ComputeSettings, _Step, build_block
from profiler.stats import median


def measure_overlap(
    spec: ModelSpec,
    settings: ComputeSettings,
    device: torch.device,
    device_name: str,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[OverlapRecord]:
    """One record for the transformer block at micro-batch 1 (tp = 1), timed on every worker of
    the node at once (the collective needs all of them); `should_stop` must agree across them.
    Each of the three regions runs `warmup` + `repeats` times, interleaved so that a change of
    the host's load shifts all three alike."""
    if should_stop():
        return []
    case = ComputeCase(
        block=BlockKind.TRANSFORMER_BLOCK, tp=1, micro_batch=1, recompute=Recompute.NONE
    )
    module = build_block(spec, case, device, settings.dtype)
    step = _Step(spec, case, module, device, settings.dtype, settings.seq_len)
    grad_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    # the unit's gradients as FSDP reduces them: in the reduce dtype (fp32)
    buf = torch.zeros(max(1, grad_bytes // 4), device=device, dtype=torch.float32)

    def compute() -> None:
        step.forward()
        step.backward()

    def collective() -> None:
        dist.all_reduce(buf)

    def together() -> None:
        work = dist.all_reduce(buf, async_op=True)
        compute()
        assert work is not None
        work.wait()

    times: dict[str, list[float]] = {"compute": [], "collective": [], "together": []}
    for i in range(settings.warmup + settings.repeats):
        for name, fn in (("compute", compute), ("collective", collective), ("together", together)):
            t = dev.time_region(device, fn)
            if i >= settings.warmup:
                times[name].append(t)
    return [
        OverlapRecord(
            device_name=device_name,
            group_size=dist.get_world_size(),
            collective_bytes=int(buf.numel() * buf.element_size()),
            compute_s=median(times["compute"]),
            collective_s=median(times["collective"]),
            together_s=median(times["together"]),
            repeats=settings.repeats,
        )
    ]
