"""Context parallelism: each sequence split over the cp ranks of a CP group, attention by all-gather.

Owns: `ContextParallel` (this rank's place in its CP group), the load-balanced causal sharding
of a batch's sequence (`shard`), the global positions of the local tokens (RoPE and learned
position tables read them), the all-gather-KV attention with its reduce-scatter backward and
the DeepSpeed-Ulysses attention (`attention`, as the plan's `cp_attention` says), and `apply_cp`, which hands the context to a model chunk's modules.
Does not own: the mesh (mesh.py), gradient averaging over the dp*cp ranks (dp.py wraps the
chunk over the flattened dp_cp mesh, so FSDP's mean reduction averages the per-shard token-mean
losses, which equals the token mean over the whole sequence: every shard holds seq_len/cp
tokens), or the cost of any of this (planner/cost/cp.py prices it; planner/runtime.py
ContextParallelRules says what it keeps).

Why not torch's own `context_parallel` (torch.distributed.tensor.experimental): on torch 2.13 it
replaces the CUDA SDPA kernels (flash, efficient, cuDNN) by ring attention; CPU SDPA
(`_scaled_dot_product_flash_attention_for_cpu`) is not among them, so it cannot run on gloo.

Layout (load balancing for causal attention, Brandon et al. 2023; Llama 3, Dubey et al. 2024
Sec. 3.3.2): the sequence is cut into 2*cp chunks of n = seq_len/(2cp) tokens and CP rank c
holds chunks c and 2cp-1-c, so every rank has the same causal work. Attention (Llama 3's
all-gather variant): each rank rotates its local K with RoPE at the global positions, all-gathers
K and V of the CP group (one collective for both), puts the chunks back in sequence order, and
attends its two query chunks to the keys up to their own end with a lower-right causal mask
(torch.nn.attention.bias.causal_lower_right). Backward reduce-scatters dK, dV to their owners.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.utils._python_dispatch import _disable_current_modes

from planner.runtime import CpAttention


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (equal chunks, one per rank); with equal splits the
    exchange is its own inverse, so backward is the same all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.contiguous()  # empty_like keeps a view's strides; the collective writes densely
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _GatherKV(torch.autograd.Function):
    """all_gather_into_tensor along dim 0 in forward; reduce_scatter_tensor (sum) of the
    gradient in backward, which returns each rank the sum over all ranks' uses of its K, V."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        size = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None, None


@dataclass(frozen=True, kw_only=True)
class ContextParallel:
    """This rank's CP group, its size and its index in it (the mesh's cp coordinate)."""

    group: dist.ProcessGroup
    size: int
    rank: int
    kind: CpAttention = CpAttention.ALL_GATHER_KV

    def chunks(self) -> tuple[int, int]:
        """The two sequence chunks (of 2*cp) this rank holds."""
        return self.rank, 2 * self.size - 1 - self.rank

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full-sequence tensor: chunks c and 2cp-1-c along `dim`."""
        pieces = x.chunk(2 * self.size, dim=dim)
        a, b = self.chunks()
        return torch.cat((pieces[a], pieces[b]), dim=dim)

    def positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """Global positions of the `local_len` local tokens (two chunks of local_len/2)."""
        n = local_len // 2
        a, b = self.chunks()
        return torch.cat(
            (
                torch.arange(a * n, (a + 1) * n, device=device),
                torch.arange(b * n, (b + 1) * n, device=device),
            )
        )

    def _sequence_order(self, n: int, device: torch.device) -> torch.Tensor:
        """Index into the gathered [rank, local token] sequence that puts chunks in order:
        chunk j < cp is rank j's first half, chunk j >= cp rank 2cp-1-j's second half."""
        cp = self.size
        idx = []
        for j in range(2 * cp):
            owner, half = (j, 0) if j < cp else (2 * cp - 1 - j, 1)
            start = owner * 2 * n + half * n
            idx.append(torch.arange(start, start + n, device=device))
        return torch.cat(idx)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal grouped-query attention of the local queries over the whole sequence.

        q [mb, heads, s, d], k and v [mb, kv_heads, s, d] (s = seq_len/cp local tokens, RoPE
        applied at global positions); returns [mb, heads, s, d]."""
        if self.kind is CpAttention.ULYSSES:
            return self._ulysses(q, k, v)
        return self._all_gather_kv(q, k, v)

    def _to_heads(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """[mb, h, s, d] local tokens of all heads -> [mb, h/cp, S, d] all tokens (in sequence
        order) of this rank's heads: one all-to-all, head group j to rank j."""
        mb, h, s, d = x.shape
        parts = x.reshape(mb, self.size, h // self.size, s, d).movedim(1, 0)
        got = _AllToAll.apply(parts, self.group)  # [src rank, mb, h/cp, s, d]
        return (
            got.movedim(0, 2).reshape(mb, h // self.size, self.size * s, d).index_select(2, order)
        )

    def _ulysses(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """DeepSpeed-Ulysses (Jacobs et al. 2023): all-to-alls swap the sequence shard for a
        head shard, plain causal attention runs over the whole sequence, and one all-to-all
        swaps back."""
        mb, h, s, d = q.shape
        order = self._sequence_order(s // 2, q.device)
        q_all, k_all, v_all = (self._to_heads(t, order) for t in (q, k, v))
        grouped = q_all.shape[1] != k_all.shape[1]
        out = F.scaled_dot_product_attention(
            q_all, k_all, v_all, is_causal=True, enable_gqa=grouped
        )  # [mb, h/cp, S, d]
        back = out.index_select(2, torch.argsort(order))  # [rank, local] order again
        parts = back.reshape(mb, h // self.size, self.size, s, d).movedim(2, 0)
        got = _AllToAll.apply(parts, self.group)  # [head group, mb, h/cp, s, d]
        return got.movedim(0, 1).reshape(mb, h, s, d)

    def _all_gather_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mb, kv_heads, s, d = k.shape
        n = s // 2
        kv = torch.stack((k, v))  # [2, mb, kvh, s, d]: one collective for both
        # ranks stacked on the sequence axis: [2, mb, kvh, cp*s, d]
        gathered = _GatherKV.apply(kv.movedim(3, 0), self.group, self.size).movedim(0, 3)
        ordered = gathered.index_select(3, self._sequence_order(n, k.device))
        full_k, full_v = ordered[0], ordered[1]
        grouped = q.shape[1] != kv_heads
        outs = []
        for half, chunk in enumerate(self.chunks()):
            end = (chunk + 1) * n  # queries of this chunk see keys [0, end), causally
            # built outside any dispatch mode (memcheck's FakeTensorMode, its storage tracker):
            # a Tensor subclass cannot wrap a tensor a mode has already given a Python object
            with _disable_current_modes():
                mask = causal_lower_right(n, end)
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, half * n : (half + 1) * n],
                    full_k[:, :, :end],
                    full_v[:, :, :end],
                    attn_mask=mask,
                    enable_gqa=grouped,
                )
            )
        return torch.cat(outs, dim=2)


def apply_cp(model: nn.Module, context: ContextParallel) -> None:
    """Give every module that reads positions or runs attention the CP context (in place):
    attention cores (executor/model.py Attention) and the embedding's position table."""
    for module in model.modules():
        if hasattr(module, "context_parallel"):
            module.context_parallel = context
