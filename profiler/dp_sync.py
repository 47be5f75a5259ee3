"""Data-parallel synchronisation measurement: one FSDP unit's gradient sync as the executor runs it.

Owns: wrapping each block kind (tp = 1) in the executor's ZeRO-0 data parallelism
(`replicate`, executor/dp.py's wrapper) over the workers of the profiled node and timing its
backward with gradient synchronisation on and off; the difference is the unit's sync, into
`DpSyncRecord`s. Does not own: the raw collectives (links.py) or the block timings (compute.py).

Why it is measured and not priced from the collective fit alone: on the 2-core development VM
(2026-12-02, load ~3.4) one small-gpt block's sync under `replicate` added 15-19 ms to its
backward while a bare all-reduce of the same 0.79 MB took 4.1-4.4 ms (and the profile's
alpha-beta fit says 2.4 ms): the wrapper copies gradients into a flat buffer, divides and
copies them out around the collective, and on CPU all of it runs on the cores that compute.
Only CPU profiles measure it (GPUs overlap the sync with backward on their own streams, which
planner/cost/dp_sync.py models from the collective fit), and only ZeRO-0 (`replicate`).
The same run times the wrapper's own hooks with sync off against the plain block, per
micro-batch: 0.66 ms forward and 0.26 ms backward per small-gpt block unit on the 2-core VM
(2026-12-02, load ~1), which a dp2 micro-batch-1 step pays 4 x 6 units times; the cost model
adds it to every unit's compute (planner/cost/rankcosts.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from planner.parallel import Recompute
from planner.profile import BlockKind, DpSyncRecord
from planner.specs import ModelSpec
from profiler import device as dev
from profiler.compute import ComputeCase, ComputeSettings, _Step, build_block
from profiler.stats import iqr, median


def measure_dp_sync_case(
    spec: ModelSpec,
    block: BlockKind,
    settings: ComputeSettings,
    device: torch.device,
    device_name: str,
    mesh: object,
) -> DpSyncRecord:
    """The plain block's forward and backward, then under `replicate` with sync off, then
    on, each `warmup` + `repeats` times (micro-batch 1): the sync is the median backward with
    it on minus off, the wrapper's overhead the medians with it off minus the plain block's."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    case = ComputeCase(block=block, tp=1, micro_batch=1, recompute=Recompute.NONE)
    module = build_block(spec, case, device, settings.dtype)
    step = _Step(spec, case, module, device, settings.dtype, settings.seq_len)

    def times(toggle: Callable[[bool], None] | None, sync: bool) -> tuple[list[float], list[float]]:
        if toggle is not None:
            toggle(sync)
        fwd, bwd = [], []
        for i in range(settings.warmup + settings.repeats):
            f = dev.time_region(device, step.forward)
            b = dev.time_region(device, step.backward)
            if i >= settings.warmup:
                fwd.append(f)
                bwd.append(b)
        return fwd, bwd

    plain_f, plain_b = times(None, False)
    replicate(module, mesh=mesh)  # type: ignore[arg-type]
    toggle = module.set_requires_gradient_sync  # type: ignore[operator]
    off_f, off = times(toggle, False)
    _, on = times(toggle, True)
    return DpSyncRecord(
        block=block,
        device_name=device_name,
        group_size=int(mesh.size()),  # type: ignore[attr-defined]
        sync_s=max(median(on) - median(off), 0.0),
        sync_spread_s=iqr(on),
        gradient_bytes=sum(p.numel() * p.element_size() for p in module.parameters()),
        repeats=settings.repeats,
        forward_overhead_s=max(median(off_f) - median(plain_f), 0.0),
        backward_overhead_s=max(median(off) - median(plain_b), 0.0),
    )


def measure_dp_sync(
    spec: ModelSpec,
    settings: ComputeSettings,
    device: torch.device,
    device_name: str,
    mesh: object,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[DpSyncRecord]:
    """One record per block kind; every worker of the node runs the same cases in step (the
    collectives need all of them), `should_stop` must agree across them."""
    out = []
    for block in BlockKind:
        if should_stop():
            return out
        out.append(measure_dp_sync_case(spec, block, settings, device, device_name, mesh))
    return out
