"""Data parallelism per the plan's ZeRO stage, with FSDP2 (`fully_shard`) and FSDP2-style
`replicate` — never DDP, which fails with DTensor (tp > 1) parameters and with more than one
pipeline stage per rank.

Owns: `apply_dp` on one model chunk. Does not own: the mesh (mesh.py) or gradient accumulation
(train.py / the pipeline schedule decide when gradients are synchronised).

ZeRO stages (Rajbhandari et al. 2020, ZeRO Sec. 5) map to FSDP2 as:
- 0: `replicate` (parameters, gradients and optimizer state replicated; gradients all-reduced).
- 1, 2: `fully_shard(reshard_after_forward=False)`: optimizer state and gradients sharded,
  parameters kept gathered from forward to backward. FSDP2 has no separate ZeRO-1 (sharded
  optimizer state with replicated gradients), so zero=1 runs as ZeRO-2, which never uses more
  memory or communication volume.
- 3: `fully_shard(reshard_after_forward=True)` on every block (parameters re-gathered in backward).
The chunk itself is also wrapped (the root unit holding the embedding/head/final norm).

With expert parallelism (`expert_dp_mesh`), each MoE block's routed experts are a unit of their
own over the expert-data-parallel group (the dp/ep ranks holding the same experts), wrapped
before their block so the block's unit leaves them out. Their gradients are summed over that
group and divided by dp, not dp/ep: each rank's expert gradient already sums the tokens of its
ep peers, so this gives the same mean over all dp ranks' tokens as every other parameter
(torchtitan does the same with `set_gradient_divide_factor`).
"""

from __future__ import annotations

import torch
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from executor.model import Transformer
from executor.moe import moe_modules


def apply_dp(
    model: Transformer,
    dp_mesh: DeviceMesh,
    *,
    zero: int,
    param_dtype: torch.dtype,
    expert_dp_mesh: DeviceMesh | None = None,
) -> None:
    """Wrap `model`'s blocks and the chunk for data parallelism over `dp_mesh` in place.

    `param_dtype` below fp32 gathers parameters in that dtype and reduces gradients in fp32
    (FSDP2 mixed precision). Pipeline chunks are wrapped the same way; the pipeline schedule
    then drives their gradient synchronisation (once per step, after the last micro-batch), and
    train.py does the same by hand without pipelining.
    """
    mp = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=torch.float32,
    )
    if expert_dp_mesh is not None:
        _wrap_experts(model, expert_dp_mesh, zero=zero, mp=mp, dp=dp_mesh.size())
    if zero == 0:
        for block in model.layers.values():
            replicate(block, mesh=dp_mesh, mp_policy=mp)
        replicate(model, mesh=dp_mesh, mp_policy=mp)
        return
    reshard = zero == 3
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp)


def _wrap_experts(
    model: Transformer, mesh: DeviceMesh, *, zero: int, mp: MixedPrecisionPolicy, dp: int
) -> None:
    for experts in (m.experts for m in moe_modules(model)):
        if zero == 0:
            unit = replicate(experts, mesh=mesh, mp_policy=mp)
        else:
            unit = fully_shard(experts, mesh=mesh, reshard_after_forward=zero == 3, mp_policy=mp)
        unit.set_gradient_divide_factor(float(dp))
        # A custom factor makes FSDP reduce-scatter with PREMUL_SUM, which gloo lacks; forcing
        # SUM divides afterwards instead. Only where a reduce-scatter runs: on one rank, and
        # under `replicate` (an all-reduce), torch 2.13 divides once by the factor already and
        # forcing SUM would divide a second time.
        if zero > 0 and mesh.size() > 1:
            unit.set_force_sum_reduction_for_comms(True)
