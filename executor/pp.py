"""Pipeline parallelism with `torch.distributed.pipelining`: the plan's chunks on this rank and
the schedule that runs them.

Owns: pruning a `Transformer` to one chunk (`prune_to_chunk`), which chunks a pipeline rank holds
(`local_chunks`), and building `PipelineStage`s + the schedule (`build_schedule`).
Does not own: TP/DP/AC on the chunks (parallelize.py) or the training loop (train.py).

Conventions (planner/parallel.py): chunk k of pp*v runs on pipeline rank k % pp (Megatron's
interleaved assignment, Narayanan et al. 2021 Sec. 2.2) and holds blocks
[first_layer, end_layer) of the plan, any counts (e.g. 1 + 3); chunk 0 owns the embedding and the
last chunk the final norm + head + loss. Schedules: GPipe (Huang et al. 2019), 1F1B
(PipeDream-Flush, Narayanan et al. 2021 Sec. 2.1), interleaved 1F1B (Sec. 2.2).
Gradients are averaged over micro-batches by the schedule (`scale_grads=True`), matching a
token-mean loss over the whole local batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.pipelining.stage import _PipelineStageBase

from executor.mesh import MeshInfo
from executor.model import Transformer
from planner.parallel import MeshAxis, Schedule
from planner.plan import Plan, StagePlan


def local_chunks(plan: Plan, pp_rank: int) -> list[StagePlan]:
    """The chunks pipeline rank `pp_rank` runs, in chunk order."""
    return [s for s in plan.stages if s.pp_rank == pp_rank]


def prune_to_chunk(model: Transformer, stage: StagePlan) -> Transformer:
    """Delete the blocks, embedding and head `stage` does not own (in place; keeps layer keys)."""
    for key in list(model.layers.keys()):
        if not stage.first_layer <= int(key) < stage.end_layer:
            del model.layers[key]
    if not stage.has_embedding:
        model.embed = None
    if not stage.has_head:
        model.head = None
    return model


def build_schedule(
    plan: Plan,
    chunks: Sequence[tuple[StagePlan, torch.nn.Module]],
    mesh: MeshInfo,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> _PipelineSchedule:
    """One `PipelineStage` per local chunk and the plan's schedule over them."""
    num_stages = plan.config.num_chunks
    group = mesh.group(MeshAxis.PP)
    stages: list[_PipelineStageBase] = [
        PipelineStage(module, stage.chunk, num_stages, device, group=group)
        for stage, module in chunks
    ]
    m = plan.num_micro_batches
    schedule = plan.config.schedule
    if schedule is Schedule.INTERLEAVED:
        return ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=loss_fn)
    if len(stages) != 1:
        raise ValueError(f"schedule {schedule.value} runs one chunk per rank, got {len(stages)}")
    cls = ScheduleGPipe if schedule is Schedule.GPIPE else Schedule1F1B
    return cls(stages[0], n_microbatches=m, loss_fn=loss_fn)
