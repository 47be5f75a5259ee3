"""Runtime semantics: what a training runtime does, as one description the cost model reads.

Owns: `RuntimeSemantics`, the rules of a runtime that decide time and memory but are not
physics: when gradients are reduced, what overlaps with compute and how well, how data-parallel
units are formed. One instance describes meshplan's own executor (`EXECUTOR`); the published
systems the analytic constants are calibrated on are other instances (`MEGATRON_2021`), so
"calibrated on Megatron, executed on torch" is explicit in the code rather than implied.
Does not own: the formulas that price these rules (planner/cost/), or the executor (executor/),
whose docstrings point here.

This is the first part of the runtime description of docs/DESIGN.md: the data-parallel
synchronisation rules. Memory rules (resident buffers, saved bytes per block) still live in
planner/cost/memory.py and move here as the runtime-parity work continues.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from planner.errors import SpecError


class GradSync(str, Enum):
    """When a data-parallel rank reduces its gradients within a step."""

    # Per unit (FSDP unit / DDP bucket) as soon as its gradients are ready in the backward of
    # the micro-batch that synchronises, overlapping the rest of that backward.
    OVERLAPPED_UNITS = "overlapped_units"
    # All units at once after the chunk's last backward: torch.distributed.pipelining's
    # REDUCE_GRAD action (torch/distributed/pipelining/schedules.py `_add_reduce_grad`, stage.py
    # `perform_reduce_grad`), and Megatron-LM 2021's all-reduce of its contiguous gradient buffer
    # after the pipeline flush (Narayanan et al. 2021, Sec. 4.1: no overlap of DP communication).
    AFTER_BACKWARD = "after_backward"


@dataclass(frozen=True, kw_only=True)
class RuntimeSemantics:
    """The data-parallel rules of one runtime (see the module docstring)."""

    name: str
    # How gradients are reduced without pipelining (pp = 1) and with it (pp > 1).
    grad_sync_pp1: GradSync
    grad_sync_pipelined: GradSync
    # Fraction of a collective's time that really hides when it runs beside compute on a GPU;
    # the rest shows up as slower compute (NCCL kernels take SMs and memory bandwidth).
    overlap_efficiency: float
    # The chunk's root unit (embedding, final norm, head) is reduced only after the whole
    # backward (FSDP2's root post-backward), so its collective never overlaps that backward.
    root_unit_last: bool
    # ZeRO-2/3 reduce-scatter after every micro-batch's backward (gradients stay sharded);
    # ZeRO-0/1 reduce only in the last micro-batch.
    sharded_grads_reduce_every_micro_batch: bool
    # Under pipelining, each model chunk reduces after its own last backward (torch's
    # REDUCE_GRAD per stage), so earlier chunks overlap the rest of the backward; otherwise one
    # reduction of everything after the flush.
    reduce_per_chunk: bool
    # ZeRO-1 runs as ZeRO-2 (FSDP2 has no mode with sharded optimizer state and replicated
    # gradients; executor/dp.py).
    zero1_runs_as_zero2: bool

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap_efficiency <= 1.0:
            raise SpecError(
                f"runtime '{self.name}': overlap_efficiency={self.overlap_efficiency} "
                "must be in [0, 1]"
            )

    def grad_sync(self, pp: int) -> GradSync:
        return self.grad_sync_pipelined if pp > 1 else self.grad_sync_pp1


# An estimate, not a measurement yet: NCCL ring kernels occupy one SM per channel, up to 16-32
# channels on Hopper (NCCL_MAX_NCHANNELS, NCCL environment docs) of 132 SMs, so compute beside a
# collective runs ~10-25 % slower. 0.85 takes the middle; the profiler's overlap measurement
# (time a block while a collective runs) is to replace it. Unit: fraction of collective time.
GPU_OVERLAP_EFFICIENCY = 0.85

EXECUTOR = RuntimeSemantics(
    name="meshplan executor (torch FSDP2 + torch.distributed.pipelining)",
    grad_sync_pp1=GradSync.OVERLAPPED_UNITS,
    grad_sync_pipelined=GradSync.AFTER_BACKWARD,
    overlap_efficiency=GPU_OVERLAP_EFFICIENCY,
    root_unit_last=True,
    sharded_grads_reduce_every_micro_batch=True,
    reduce_per_chunk=True,
    zero1_runs_as_zero2=True,
)

MEGATRON_2021 = RuntimeSemantics(
    name="Megatron-LM 2021 (PTD-P, Narayanan et al. 2021)",
    grad_sync_pp1=GradSync.AFTER_BACKWARD,
    grad_sync_pipelined=GradSync.AFTER_BACKWARD,
    overlap_efficiency=GPU_OVERLAP_EFFICIENCY,
    root_unit_last=False,
    sharded_grads_reduce_every_micro_batch=False,
    reduce_per_chunk=False,
    zero1_runs_as_zero2=False,
)
