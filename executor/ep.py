"""Expert parallelism: each MoE block's routed experts split over `ep` data-parallel ranks, tokens
sent to their experts' ranks and back with `torch.distributed.all_to_all_single`; and the MoE
block under tensor parallelism (expert-TP: every expert's ffn split over tp, as the dense MLP).

Owns: `MoeParallel` (the groups and collectives one MoE block uses), `apply_ep` (shard a chunk's
MoE parameters on the meta device, before initialisation) and `dispatch`.
Does not own: routing and the experts' maths (moe.py), the meshes (mesh.py), or FSDP over the
expert-data-parallel group (dp.py).

Groups (planner/parallel.py): dp index d = d_outer * ep + e; the ep group of a rank is the ep
ranks with its (p, d_outer, t); the expert-data-parallel group is the dp/ep ranks with its
(p, e, t). Expert e of E lives on ep rank e // (E/ep). Parameters are DTensors: routed experts
Shard(0) over ep (and their ffn dim over tp), so initialisation and checkpoints see the full
[E, ...] tensors.

Dispatch, per MoE block and micro-batch (T tokens this rank routes, k slots each):
1. sort the T*k (token, expert) slots by expert and gather their rows: [T*k, h];
2. exchange per-expert counts (all_to_all_single of E int64; one host sync reads the sent and
   received counts), then the rows themselves
   (all_to_all_single with input/output splits), so rank e receives every row for its E/ep
   experts, grouped by source rank; regroup them by local expert;
3. each local expert's MLP on its rows (one GEMM per matrix and expert);
4. the inverse: regroup by source, all_to_all_single back, unsort, weight by the routing
   weights and sum over the k slots.
Backward runs the same exchanges with the splits swapped.

Tensor parallelism (Megatron-style, Shoeybi et al. 2019 Sec. 3, applied per expert): every tp
rank routes the same full token set (under sequence parallelism the block's input is
all-gathered over the sequence first) and holds ffn/tp columns of every expert, so expert
outputs are partial sums; the routed + shared sum is all-reduced once over tp (reduce-scattered
over the sequence with SP). Gradients that would otherwise be partial per tp rank are made
complete by all-reducing the routing weights' gradient [T, k] (and the shared gate's [T, 1])
over tp, and the router's input gradient is divided by tp before the block input's backward
all-reduce sums it, so router and gate weights get complete, identical gradients on every tp
rank without a parameter all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Placement

from executor.moe import GroupedMLP, moe_modules


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # type: ignore[no-untyped-def, override]
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        out_splits, in_splits = ctx.splits
        grad = g.new_empty((sum(in_splits), *g.shape[1:]))
        dist.all_to_all_single(grad, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad, None, None, None


class _AllReduceBackward(torch.autograd.Function):
    """Identity forward, all-reduce (sum) of the gradient over `group` (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[no-untyped-def, override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _AllReduceForward(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[no-untyped-def, override]
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return g, None


def _gather_seq(x: torch.Tensor, group: dist.ProcessGroup, n: int) -> torch.Tensor:
    """[mb, s, h] shards -> [mb, n*s, h] (all-gather over dim 1)."""
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((n * xt.shape[0], *xt.shape[1:]))
    dist.all_gather_into_tensor(out, xt, group=group)
    return out.transpose(0, 1)


def _reduce_scatter_seq(x: torch.Tensor, group: dist.ProcessGroup, n: int) -> torch.Tensor:
    """[mb, n*s, h] partial sums -> this rank's [mb, s, h] of their sum."""
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((xt.shape[0] // n, *xt.shape[1:]))
    dist.reduce_scatter_tensor(out, xt, group=group)
    return out.transpose(0, 1)


class _GatherSeq(torch.autograd.Function):
    """All-gather over the sequence forward, reduce-scatter of (partial) gradients backward."""

    @staticmethod
    def forward(ctx, x, group, n):  # type: ignore[no-untyped-def, override]
        ctx.group, ctx.n = group, n
        return _gather_seq(x, group, n)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return _reduce_scatter_seq(g, ctx.group, ctx.n), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    """Reduce-scatter over the sequence forward, all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group, n):  # type: ignore[no-untyped-def, override]
        ctx.group, ctx.n = group, n
        return _reduce_scatter_seq(x, group, n)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return _gather_seq(g, ctx.group, ctx.n), None, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c):  # type: ignore[no-untyped-def, override]
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return g * ctx.c, None


def _regroup(counts: list[list[int]]) -> torch.Tensor:
    """Row order that turns rows laid out in (source, expert) blocks of `counts` [S][L] into
    (expert, source) blocks."""
    starts, offset = [], 0
    for row in counts:
        starts.append([])
        for c in row:
            starts[-1].append(offset)
            offset += c
    idx = [
        torch.arange(starts[i][j], starts[i][j] + counts[i][j])
        for j in range(len(counts[0]) if counts else 0)
        for i in range(len(counts))
    ]
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routing slots per expert (a static-shape scatter, so fake tensors can run it too)."""
    flat = ids.flatten()
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


def balanced_counts(slots: int, num_experts: int) -> list[int]:
    """`slots` spread as evenly as possible over the experts (memcheck's routing)."""
    base, extra = divmod(slots, num_experts)
    return [base + (1 if i < extra else 0) for i in range(num_experts)]


def dispatch(
    tokens: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    experts: GroupedMLP,
    num_experts: int,
    ep_group: dist.ProcessGroup | None,
    ep: int,
    *,
    balanced: bool = False,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(tokens[t]) for every token t, the experts spread
    over the `ep` ranks of `ep_group` (see the module docstring for the steps). `balanced`
    sizes every exchange as if routing were perfectly even (memcheck: fake tensors have no
    counts); the rows still go where `ids` says on real tensors only."""
    t, k = ids.shape
    order = ids.flatten().argsort(stable=True)
    rows = tokens[order // k]  # [T*k, h], sorted by expert
    if ep == 1:
        counts = (
            balanced_counts(t * k, num_experts)
            if balanced
            else expert_counts(ids, num_experts).tolist()  # the block's one host sync
        )
        out_rows = experts(rows, counts)
    else:
        assert ep_group is not None
        n_local = num_experts // ep
        if balanced:
            counts = balanced_counts(t * k, num_experts)
            mine = dist.get_rank(ep_group)
            recv = [counts[mine * n_local : (mine + 1) * n_local]] * ep
        else:
            sent = expert_counts(ids, num_experts)
            received = torch.empty_like(sent)
            dist.all_to_all_single(received, sent, group=ep_group)  # E/ep from each source
            # One host sync for both: the splits must be Python ints.
            counts, flat_recv = torch.stack((sent, received)).tolist()
            recv = [flat_recv[r * n_local : (r + 1) * n_local] for r in range(ep)]
        in_splits = [sum(counts[r * n_local : (r + 1) * n_local]) for r in range(ep)]
        out_splits = [sum(row) for row in recv]
        got = _AllToAll.apply(rows, out_splits, in_splits, ep_group)
        perm = _regroup(recv).to(got.device)
        y = experts(got[perm], [sum(col) for col in zip(*recv, strict=True)])
        back = y[torch.argsort(perm)]
        out_rows = _AllToAll.apply(back, in_splits, out_splits, ep_group)
    unsorted = out_rows[torch.argsort(order)].view(t, k, -1)
    return (unsorted * weights.unsqueeze(-1)).sum(dim=1)


@dataclass(frozen=True, kw_only=True)
class MoeParallel:
    """The groups one MoE block communicates over (None: that degree is 1)."""

    ep: int
    ep_group: dist.ProcessGroup | None
    tp: int
    tp_group: dist.ProcessGroup | None
    sequence_parallel: bool
    balanced_routing: bool = False  # memcheck: exchanges sized as for even routing

    @staticmethod
    def single() -> MoeParallel:
        return MoeParallel(ep=1, ep_group=None, tp=1, tp_group=None, sequence_parallel=False)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """The block input as every tp rank routes it (the full sequence)."""
        if self.tp == 1:
            return x
        if self.sequence_parallel:
            return _GatherSeq.apply(x, self.tp_group, self.tp)
        return _AllReduceBackward.apply(x, self.tp_group)

    def exit(self, partial: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return partial
        if self.sequence_parallel:
            return _ReduceScatterSeq.apply(partial, self.tp_group, self.tp)
        return _AllReduceForward.apply(partial, self.tp_group)

    def router_input(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens if self.tp == 1 else _ScaleGrad.apply(tokens, 1.0 / self.tp)

    def partial_grad(self, t: torch.Tensor) -> torch.Tensor:
        """`t` multiplies tp-partial expert outputs: sum its gradient over tp."""
        return t if self.tp == 1 else _AllReduceBackward.apply(t, self.tp_group)

    def dispatch(
        self,
        tokens: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        experts: GroupedMLP,
        num_experts: int,
    ) -> torch.Tensor:
        return dispatch(
            tokens,
            ids,
            weights,
            experts,
            num_experts,
            self.ep_group,
            self.ep,
            balanced=self.balanced_routing,
        )


def _distribute(module: torch.nn.Module, name: str, mesh: DeviceMesh, placements) -> None:  # type: ignore[no-untyped-def]
    param = getattr(module, name)
    if param is None:
        return
    dt = distribute_tensor(param.data, mesh, placements, src_data_rank=None)
    setattr(module, name, torch.nn.Parameter(dt, requires_grad=param.requires_grad))


def _shard_grouped(
    mlp: GroupedMLP, mesh: DeviceMesh | None, expert: list[Placement], tp: int
) -> None:
    """Shard `mlp`'s [n, in, out] weights: `expert` placements first (Shard(0) over ep), then,
    with tp > 1, w1/w3 by output columns and w2 by input rows (Megatron column/row split)."""
    if mesh is None:
        return
    col: list[Placement] = [Shard(2)] if tp > 1 else []
    row: list[Placement] = [Shard(1)] if tp > 1 else []
    col_bias: list[Placement] = [Shard(1)] if tp > 1 else []
    rep: list[Placement] = [Replicate()] if tp > 1 else []
    for lin in (mlp.w1, mlp.w3):
        if lin is not None:
            _distribute(lin, "weight", mesh, expert + col)
            _distribute(lin, "bias", mesh, expert + col_bias)
    _distribute(mlp.w2, "weight", mesh, expert + row)
    _distribute(mlp.w2, "bias", mesh, expert + rep)
    if tp > 1:
        mlp.bias_scale = 1.0 / tp


def apply_ep(
    model: torch.nn.Module,
    *,
    ep: int,
    ep_mesh: DeviceMesh | None,
    tp: int,
    tp_mesh: DeviceMesh | None,
    expert_mesh: DeviceMesh | None,
    sequence_parallel: bool,
) -> None:
    """Shard every MoE block of `model` in place (on meta, before init): routed experts over
    `expert_mesh` ((ep, tp), ep or tp alone), shared experts over `tp_mesh`; router and gate
    stay plain (replicated) tensors. Sets each block's `MoeParallel`."""
    for moe in moe_modules(model):
        _shard_grouped(moe.experts, expert_mesh, [Shard(0)] if ep > 1 else [], tp)
        if moe.shared_experts is not None:
            _shard_grouped(moe.shared_experts, tp_mesh if tp > 1 else None, [], tp)
        moe.parallel = MoeParallel(
            ep=ep,
            ep_group=ep_mesh.get_group() if ep > 1 and ep_mesh is not None else None,
            tp=tp,
            tp_group=tp_mesh.get_group() if tp > 1 and tp_mesh is not None else None,
            sequence_parallel=sequence_parallel,
        )


def set_aux_grad_scale(model: torch.nn.Module, scale: float) -> None:
    for moe in moe_modules(model):
        moe.aux_grad_scale = scale
