"""The one entry that turns a plan into this rank's ready-to-train model chunks.

Owns: `parallelize` and `ParallelModel`. Does not own: any single technique (tp.py, pp.py,
dp.py, activation_checkpoint.py) or the loop (train.py).

Fixed order, each step on every local chunk (torchtitan's order):
1. build the full `Transformer` on the meta device and prune it to the chunk (pp.py),
   so a rank only ever allocates its own stages;
2. tensor parallel (tp.py), then the MoE blocks' expert-parallel/tensor-parallel sharding
   (ep.py), still on meta;
3. materialise on the device and initialise from (seed, parameter name) (model.init_weights),
   so values are identical for any layout;
4. activation checkpointing per the plan's recompute mode (activation_checkpoint.py), and with
   cp > 1 the context-parallel attention and positions (cp.py);
5. data parallel per the ZeRO stage (dp.py) when dp * cp > 1 (over dp x cp flattened);
6. with pp > 1, pipeline stages and the plan's schedule (pp.py).

Embeddings stay tied only when the embedding and the head live in one chunk (pp = 1); across
pipeline stages they are untied (an extra vocab x hidden head matrix on the last stage, which
`ModelSpec.param_count` does not count for a tied model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.pipelining.schedules import _PipelineSchedule

from executor.activation_checkpoint import apply_ac
from executor.cp import ContextParallel, apply_cp
from executor.device import Runtime
from executor.dp import apply_dp
from executor.ep import apply_ep, set_aux_grad_scale
from executor.fp8 import apply_fp8, check_fp8_supported
from executor.mesh import MeshInfo
from executor.model import Transformer, init_weights, loss_fn
from executor.pp import build_schedule, local_chunks, prune_to_chunk
from executor.tp import apply_tp
from planner.parallel import MeshAxis
from planner.plan import Plan, StagePlan


@dataclass(frozen=True, kw_only=True)
class ParallelModel:
    """This rank's chunks (in chunk order) and, with pp > 1, the pipeline schedule."""

    chunks: tuple[tuple[StagePlan, Transformer], ...]
    schedule: _PipelineSchedule | None
    has_embedding: bool
    has_head: bool

    @property
    def modules(self) -> list[nn.Module]:
        return [m for _, m in self.chunks]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]


def context_parallel(mesh: MeshInfo, plan: Plan) -> ContextParallel:
    """This rank's CP group (cp > 1) and the plan's CP attention."""
    return ContextParallel(
        group=mesh.group(MeshAxis.CP),
        size=mesh.cp,
        rank=mesh.cp_rank,
        kind=plan.config.cp_attention,
    )


def parallelize(plan: Plan, mesh: MeshInfo, runtime: Runtime, *, seed: int) -> ParallelModel:
    """Apply pp -> tp -> materialise/init -> AC -> dp -> pipeline schedule, in that order."""
    cfg = plan.config
    if plan.training.fp8_linears:
        check_fp8_supported(runtime)  # before any chunk is built and initialised
    tie = plan.model.tied_embeddings and cfg.pp == 1
    chunks: list[tuple[StagePlan, Transformer]] = []
    for stage in local_chunks(plan, mesh.pp_rank):
        with torch.device("meta"):
            model = prune_to_chunk(Transformer(plan.model, tie_embeddings=tie), stage)
        if cfg.tp > 1:
            apply_tp(model, mesh.sub(MeshAxis.TP), sequence_parallel=cfg.sequence_parallel)
        if plan.model.moe is not None:
            _apply_moe(model, plan, mesh)
        model.to_empty(device=runtime.device)
        model.tie_weights()
        init_weights(model, seed)
        if plan.training.fp8_linears:
            apply_fp8(model)
        for block in model.layers.values():
            apply_ac(block, cfg.recompute)
        if cfg.cp > 1:
            apply_cp(model, context_parallel(mesh, plan))
        if cfg.dp_cp > 1:
            apply_dp(
                model,
                mesh.data_parallel_mesh(),
                zero=cfg.zero,
                param_dtype=runtime.compute_dtype,
                expert_dp_mesh=mesh.expert_dp_mesh if cfg.ep > 1 else None,
            )
        chunks.append((stage, model))
    schedule = None
    if cfg.pp > 1:
        schedule = build_schedule(plan, chunks, mesh, runtime.device, loss_fn)
    return ParallelModel(
        chunks=tuple(chunks),
        schedule=schedule,
        has_embedding=any(s.has_embedding for s, _ in chunks),
        has_head=any(s.has_head for s, _ in chunks),
    )


def _apply_moe(model: Transformer, plan: Plan, mesh: MeshInfo) -> None:
    """Shard the chunk's MoE blocks (ep.py) and set the auxiliary loss's gradient per
    micro-batch to match the LM loss's: train.py divides that by m without pipelining, the
    pipeline schedule divides every gradient by m (`scale_grads`)."""
    cfg = plan.config
    apply_ep(
        model,
        ep=cfg.ep,
        ep_mesh=mesh.ep_mesh,
        tp=cfg.tp,
        tp_mesh=mesh.sub(MeshAxis.TP) if cfg.tp > 1 else None,
        expert_mesh=mesh.expert_mesh,
        sequence_parallel=cfg.sequence_parallel,
    )
    set_aux_grad_scale(model, 1.0 if cfg.pp > 1 else 1.0 / plan.num_micro_batches)
