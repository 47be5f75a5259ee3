"""The device mesh of a plan: (pp, dp, cp, tp) with the plan's rank map, not torchrun's order.

Owns: `MeshInfo` (the mesh plus this process's coordinate) and `build_mesh`.
With expert parallelism (ep > 1) the root mesh is (pp, edp, ep, tp): the dp axis split as
d = d_outer * ep + e (planner/parallel.py), the same ranks as (pp, dp, tp); "dp" is then the
flattened (edp, ep) mesh, "ep" the expert-parallel groups and "edp" the expert-data-parallel
groups (dp/ep ranks holding the same experts).
Does not own: the rank map itself (the planner's `Plan.ranks`), or process-group start-up
(train.py).

Convention (planner/parallel.py): mesh rank r = ((p*dp + d)*cp + c)*tp + t is held by global GPU
`plan.ranks[r].gpu_id`, and torchrun starts the process of node i's local GPU j with
RANK = that GPU id (node-major, contiguous).

Why the process group is ranked by mesh rank rather than the mesh listing GPU ids: a
DeviceMesh whose ranks are not ascending along a dimension (e.g. a tp group [1, 0]) gets a
process group whose ranks torch sorts, while DTensor gathers in mesh-coordinate order; on torch
2.13 `distribute_tensor(arange(4), DeviceMesh("cpu", [1, 0]), [Shard(0)]).full_tensor()` returns
[2, 3, 0, 1]. So `init_distributed` gives the process on GPU g the process-group rank
`plan.gpu_to_rank()[g]`; the mesh is then arange(world).reshape(pp, dp, tp), ascending on every
axis (with cp > 1: reshape(pp, dp, cp, tp), and dp x cp flattened into the `dp_cp` mesh that
data parallelism shards and averages over; with cp = 1 the mesh has no cp axis, as before), and mesh rank r still runs on GPU `plan.ranks[r].gpu_id` (the device is chosen by
LOCAL_RANK, i.e. the physical GPU, not by the process-group rank).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from planner.parallel import MESH_ORDER, MeshAxis
from planner.plan import Plan

EP_DIM = "ep"  # expert-parallel sub-axis of dp (inner)
EDP_DIM = "edp"  # expert-data-parallel sub-axis of dp (outer)


@dataclass(frozen=True, kw_only=True)
class MeshInfo:
    """The (pp, dp[, cp], tp) mesh and where this process sits in it."""

    mesh: DeviceMesh
    pp: int
    dp: int
    tp: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    cp: int = 1
    cp_rank: int = 0
    # dp x cp flattened (cp > 1): the group gradients are averaged over and ZeRO shards over
    dp_cp_mesh: DeviceMesh | None = None
    ep: int = 1
    # Meshes kept apart from the root's dims: "dp" when the root splits it into (edp, ep).
    flattened: Mapping[str, DeviceMesh] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pp * self.dp * self.cp * self.tp != self.mesh.size():
            raise ValueError(
                f"pp*dp*cp*tp != mesh size ({self.pp}*{self.dp}*{self.cp}*{self.tp} != "
                f"{self.mesh.size()})"
            )

    def sub(self, axis: MeshAxis) -> DeviceMesh:
        flat = self.flattened.get(axis.value)
        return flat if flat is not None else self.mesh[axis.value]

    def data_parallel_mesh(self) -> DeviceMesh:
        """The mesh data parallelism runs on: dp, or dp x cp flattened when cp > 1."""
        return self.dp_cp_mesh if self.dp_cp_mesh is not None else self.sub(MeshAxis.DP)

    def group(self, axis: MeshAxis) -> dist.ProcessGroup:
        return self.sub(axis).get_group()

    @property
    def ep_mesh(self) -> DeviceMesh | None:
        return self.mesh[EP_DIM] if self.ep > 1 else None

    @property
    def expert_dp_mesh(self) -> DeviceMesh:
        """The ranks holding the same experts: edp (dp/ep of them) with ep > 1, else dp."""
        return self.mesh[EDP_DIM] if self.ep > 1 else self.sub(MeshAxis.DP)

    @property
    def expert_mesh(self) -> DeviceMesh | None:
        """The mesh routed-expert parameters are DTensors on: (ep, tp), ep, tp, or none."""
        if self.ep > 1:
            return self.mesh[EP_DIM, MeshAxis.TP.value] if self.tp > 1 else self.mesh[EP_DIM]
        return self.sub(MeshAxis.TP) if self.tp > 1 else None


def process_gpu_id(plan: Plan, env: Mapping[str, str]) -> int:
    """The global GPU id this process runs on.

    The launch files (executor/emit.py) export MESHPLAN_NODE_INDEX, the plan's node index of this
    host: then the id is that node's first GPU id + LOCAL_RANK, whatever order torchrun's c10d
    rendezvous numbered the nodes in. Without it, torchrun's RANK (node-major) is the id.
    """
    node = env.get("MESHPLAN_NODE_INDEX")
    if node is None:
        return int(env["RANK"])
    index = int(node)
    if not 0 <= index < len(plan.cluster.nodes):
        raise ValueError(
            f"MESHPLAN_NODE_INDEX={index} is outside the plan's nodes 0..{len(plan.cluster.nodes) - 1}"
        )
    return plan.cluster.gpu_ids_of_node(index)[int(env.get("LOCAL_RANK", "0"))]


def init_distributed(
    plan: Plan, backend: str, *, gpu_id: int, store: dist.Store | None = None
) -> int:
    """Start the default process group with this process (on global GPU `gpu_id`, torchrun's
    RANK) ranked by its mesh rank; returns that mesh rank. Without `store`, MASTER_ADDR/PORT
    (torchrun's env://) are used."""
    world = plan.config.world_size
    if not 0 <= gpu_id < world:
        raise ValueError(f"GPU id {gpu_id} is outside the plan's 0..{world - 1}")
    rank = plan.gpu_to_rank()[gpu_id]
    if store is None:
        dist.init_process_group(backend, rank=rank, world_size=world)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return rank


def build_mesh(plan: Plan, device_type: str) -> MeshInfo:
    """The (pp, dp[, cp], tp) mesh over a process group started by `init_distributed`."""
    cfg = plan.config
    world = dist.get_world_size()
    if world != cfg.world_size:
        raise ValueError(
            f"the plan needs {cfg.degrees_text()} = {cfg.world_size} processes; "
            f"{world} were started"
        )
    flattened: dict[str, DeviceMesh] = {}
    dp_cp = None
    if cfg.ep > 1:  # cp == 1 (planner/parallel.py refuses ep with cp)
        layout = torch.arange(world, dtype=torch.int64).reshape(
            cfg.pp, cfg.dp // cfg.ep, cfg.ep, cfg.tp
        )
        names = (MeshAxis.PP.value, EDP_DIM, EP_DIM, MeshAxis.TP.value)
        mesh = DeviceMesh(device_type, layout, mesh_dim_names=names)
        flattened[MeshAxis.DP.value] = mesh[EDP_DIM, EP_DIM]._flatten(MeshAxis.DP.value)
    else:
        axes = [a for a in MESH_ORDER if a is not MeshAxis.CP or cfg.cp > 1]
        sizes = {MeshAxis.PP: cfg.pp, MeshAxis.DP: cfg.dp, MeshAxis.CP: cfg.cp, MeshAxis.TP: cfg.tp}
        layout = torch.arange(world, dtype=torch.int64).reshape(*(sizes[a] for a in axes))
        mesh = DeviceMesh(device_type, layout, mesh_dim_names=tuple(a.value for a in axes))
        dp_cp = mesh["dp", "cp"]._flatten("dp_cp") if cfg.cp > 1 else None
    mesh_rank = dist.get_rank()
    entry = next(e for e in plan.ranks if e.rank == mesh_rank)
    return MeshInfo(
        mesh=mesh,
        pp=cfg.pp,
        dp=cfg.dp,
        tp=cfg.tp,
        pp_rank=entry.pp,
        dp_rank=entry.dp,
        tp_rank=entry.tp,
        cp=cfg.cp,
        cp_rank=entry.cp,
        dp_cp_mesh=dp_cp,
        ep=cfg.ep,
        flattened=flattened,
    )
