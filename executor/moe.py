"""The Mixture-of-Experts feed-forward of a transformer block: router, grouped experts, shared
experts and the load-balancing loss.

Owns: `MoE` (what `TransformerBlock.feed_forward` is for blocks where `spec.moe.is_moe_layer(i)`),
`GroupedMLP`, the routing rule and `aux_loss`. Does not own: moving tokens between
expert-parallel ranks (ep.py), the tensor-parallel sharding of these parameters (ep.py
`apply_ep`), or when the auxiliary gradient is scaled (parallelize.py sets `aux_grad_scale`).

Routing (token choice, Shazeer et al. 2017 Sec. 2.1; Mixtral, Jiang et al. 2024 Sec. 2.1):
logits = x W_r (bias-free, h x experts), p = softmax(logits) in fp32, the top_k experts per
token by p. With top_k > 1 the k weights are renormalised to sum to 1 (Mixtral; HF
`norm_topk_prob=True`); with top_k = 1 the weight is p itself (Switch Transformer, Fedus et al.
2021 Sec. 2.1), since a renormalised single weight is always 1 and the router would learn from
the auxiliary loss alone. Dropless: every token reaches its k experts (no capacity factor).

Load-balancing loss (Switch Transformer, Fedus et al. 2021, Eq. 4-6), per MoE layer and
micro-batch, over the tokens this rank routes: aux = alpha * E * sum_i f_i * P_i with f_i the
fraction of the T*k routing slots sent to expert i (no gradient) and P_i the mean router
probability of expert i; alpha = 0.01 (ibid. Sec. 2.2). Balanced routing gives aux = alpha for
any k (HF Mixtral's `load_balancing_loss_func` counts slots per token, k times this value). The
layer sums are added to the training loss through their gradient (`_AddAuxGrad`, Megatron-LM's
MoEAuxLossAutoScaler), so a pipeline stage without the head still trains its routers, and
are logged (train.py reads `pop_aux_losses`).

Each expert is the block's MLP kind at `expert_ffn_hidden` (SwiGLU: w2(silu(x w1) * x w3);
GELU: w2(gelu(x w1))), with biases when `spec.bias`. Shared experts (DeepSeekMoE, Dai et al.
2024) see every token; Qwen2-MoE's gate multiplies their sum by sigmoid(x w_g) (h x 1, no bias).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from planner.specs import MlpKind, ModelSpec

if TYPE_CHECKING:
    from executor.ep import MoeParallel

AUX_LOSS_COEF = 0.01  # alpha of Switch Transformer (Fedus et al. 2021, Sec. 2.2: alpha = 10^-2)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (DTensor) parameter, as a plain tensor that autograd tracks."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class GroupedLinear(nn.Module):
    """`n` independent linears stored as one [n, in, out] weight (and [n, out] bias), so that
    expert parallelism can shard dim 0 and tensor parallelism the in or out dimension."""

    def __init__(self, n: int, fan_in: int, fan_out: int, *, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, fan_in, fan_out))
        self.bias = nn.Parameter(torch.empty(n, fan_out)) if bias else None


class _ScaleForward(torch.autograd.Function):
    """y = c x in forward, dy passed through unscaled: a row-parallel bias added on each of tp
    ranks as b/tp sums to b after the all-reduce, while each rank keeps b's full gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: float) -> torch.Tensor:  # type: ignore[override]
        return x * c

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


class GroupedMLP(nn.Module):
    """`n` MLPs of the model's kind (w1, w2 and, gated, w3) as grouped weights.

    `forward(x, counts)` runs expert j on the next counts[j] rows of x (rows sorted by expert);
    `forward_all(x)` runs every MLP on all of x and sums them (shared experts). Under tensor
    parallelism each rank holds ffn/tp of every MLP and returns partial sums (`bias_scale`
    = 1/tp spreads the output bias over the ranks); ep.py all-reduces them.
    """

    def __init__(self, spec: ModelSpec, n: int, ffn: int) -> None:
        super().__init__()
        h, b = spec.hidden, spec.bias
        self.swiglu = spec.mlp is MlpKind.SWIGLU
        self.w1 = GroupedLinear(n, h, ffn, bias=b)
        self.w2 = GroupedLinear(n, ffn, h, bias=b)
        self.w3 = GroupedLinear(n, h, ffn, bias=b) if self.swiglu else None
        self.bias_scale = 1.0  # set by ep.apply_ep under tensor parallelism

    @staticmethod
    def _unbound(
        m: GroupedLinear,
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
        """Each expert's weight (and bias) as views of the local tensor, made once per forward:
        one autograd node whose backward stacks the experts' gradients (indexing per expert
        would sum n zero-filled full-size gradients instead)."""
        b = local(m.bias).unbind(0) if m.bias is not None else None
        return local(m.weight).unbind(0), b

    @staticmethod
    def _linear(
        wb: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None],
        x: torch.Tensor,
        j: int,
        bias_scale: float = 1.0,
    ) -> torch.Tensor:
        weights, biases = wb
        y = x @ weights[j]
        if biases is None:
            return y
        bias = biases[j]
        return y + (bias if bias_scale == 1.0 else _ScaleForward.apply(bias, bias_scale))

    def _params(self) -> tuple[Any, Any, Any]:
        w3 = self._unbound(self.w3) if self.w3 is not None else None
        return self._unbound(self.w1), w3, self._unbound(self.w2)

    def _one(self, x: torch.Tensor, j: int, params: tuple[Any, Any, Any]) -> torch.Tensor:
        w1, w3, w2 = params
        if w3 is not None:
            hidden = F.silu(self._linear(w1, x, j)) * self._linear(w3, x, j)
        else:
            hidden = F.gelu(self._linear(w1, x, j), approximate="tanh")
        return self._linear(w2, hidden, j, self.bias_scale)

    @property
    def local_count(self) -> int:
        return local(self.w1.weight).shape[0]

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if len(counts) != self.local_count:
            raise ValueError(f"{len(counts)} expert counts for {self.local_count} local experts")
        # One GEMM per expert (a grouped GEMM kernel would fuse them; the FLOPs are the same).
        # Experts with no rows still run (on 0 rows): every weight then gets a (zero)
        # gradient, so each rank's FSDP unit reduces in step with its peers.
        params = self._params()
        return torch.cat(
            [self._one(rows, j, params) for j, rows in enumerate(torch.split(x, counts))]
        )

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        params = self._params()
        out = self._one(x, 0, params)
        for j in range(1, self.local_count):
            out = out + self._one(x, j, params)
        return out


class _AddAuxGrad(torch.autograd.Function):
    """Returns `out` unchanged; in backward gives `aux` the gradient `scale`, i.e. trains as if
    `scale * aux` had been added to the loss (Megatron-LM `MoEAuxLossAutoScaler`)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        (aux,) = ctx.saved_tensors
        return g, torch.full_like(aux, ctx.scale), None


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities [T, E] fp32, top-k weights [T, k], top-k expert ids [T, k]); see the
    module docstring for the renormalisation rule."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, ids


def aux_loss(probs: torch.Tensor, ids: torch.Tensor, coef: float = AUX_LOSS_COEF) -> torch.Tensor:
    """Switch Transformer Eq. 4: coef * E * sum_i f_i P_i over these tokens (f_i per slot)."""
    from executor.ep import expert_counts

    experts = probs.shape[-1]
    slots = expert_counts(ids, experts).to(probs.dtype)
    f = slots / ids.numel()
    return coef * experts * (f * probs.mean(dim=0)).sum()


class MoE(nn.Module):
    """The MoE feed-forward: router + routed `experts` (+ `shared_experts`, `shared_gate`).

    `parallel` (ep.py `MoeParallel`) moves tokens to their experts' ranks and handles the tensor
    -parallel group; without it (one process) every expert is local.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        moe = spec.moe
        assert moe is not None
        h = spec.hidden
        self.top_k = moe.top_k
        self.num_experts = moe.experts
        self.router = nn.Linear(h, moe.experts, bias=False)
        self.experts = GroupedMLP(spec, moe.experts, moe.expert_ffn_hidden)
        self.shared_experts = (
            GroupedMLP(spec, moe.shared_experts, moe.shared_ffn_hidden)
            if moe.shared_experts
            else None
        )
        self.shared_gate = nn.Linear(h, 1, bias=False) if moe.shared_expert_gate else None
        # Gradient the auxiliary loss gets per micro-batch: 1/m where train.py divides the
        # loss by m, 1 under pipelining (the schedule divides every gradient by m).
        self.aux_grad_scale = 1.0
        self.parallel: MoeParallel | None = None  # set by ep.apply_ep
        self._aux_values: list[torch.Tensor] = []

    def pop_aux_losses(self) -> list[torch.Tensor]:
        """The auxiliary losses of the forwards since the last call (detached), oldest first."""
        values, self._aux_values = self._aux_values, []
        return values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from executor.ep import MoeParallel

        par = self.parallel or MoeParallel.single()
        full = par.enter(x)  # [mb, seq, h], the full sequence on every tensor-parallel rank
        tokens = full.reshape(-1, full.shape[-1])
        # The router sees the same tokens on every tp rank: its gradient is complete on each,
        # so the input gradient through it is divided by tp before `enter`'s backward sums.
        rx = par.router_input(tokens)
        probs, weights, ids = route(F.linear(rx, self.router.weight), self.top_k)
        aux = aux_loss(probs, ids)
        if torch._C._current_graph_task_id() == -1:  # not a recompute inside backward
            self._aux_values.append(aux.detach())
        weights = par.partial_grad(weights.to(tokens.dtype))
        out = par.dispatch(tokens, ids, weights, self.experts, self.num_experts)
        if self.shared_experts is not None:
            shared = self.shared_experts.forward_all(tokens)
            if self.shared_gate is not None:
                gate = torch.sigmoid(F.linear(rx, self.shared_gate.weight))
                shared = shared * par.partial_grad(gate)
            out = out + shared
        out = par.exit(out.view(full.shape))
        return _AddAuxGrad.apply(out, aux, self.aux_grad_scale)


def moe_modules(module: nn.Module) -> list[MoE]:
    return [m for m in module.modules() if isinstance(m, MoE)]
