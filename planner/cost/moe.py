"""Mixture-of-Experts terms of the cost model: expert GEMMs, all-to-all, expert memory.

Owns: what an MoE block adds to or changes in a dense block, per TP rank and expert-parallel
degree ep, for the block described by `planner.runtime.MoeRules` (token-choice top-k router,
dropless dispatch with `all_to_all_single` over the EP group, one gated MLP per local expert,
probability-weighted combine, shared experts): the router, shared-expert and routed-expert
GEMMs at their real shapes; the routed parameters one rank holds and their ZeRO sharding over
the expert-data-parallel group (dp / ep ranks); the activation bytes of the k routed copies of
each token; the dispatch/combine all-to-all bytes and the links of the EP and expert-DP groups.
Does not own: the dense parts of the block (analytic.py, memory.py), the collective formulas
(collectives.py) or the link model (comm.py: the groups here are priced with its
`ClusterArrays`, so EP traffic shares NICs exactly as the DP axis does).

Conventions. T = tokens of one micro-batch on one data-parallel rank (micro_batch * seq_len),
E experts, k = top_k, f_e = expert_ffn_hidden, h = hidden, d = compute-dtype bytes. The busiest
EP rank receives T * k * imbalance routed copies (`MoeRules.imbalance(ep, E)`, 1 at ep = 1), spread
over its E / ep local experts: T * k * imbalance * ep / E tokens per local expert. Model FLOPs
(MFU) count the active path at imbalance 1: 6 * N_active * tokens for the matmul parameters
(router, shared experts and k experts per token, attention projections, head) plus the
attention products (Narayanan et al. 2021 Eq. 3 convention); the embedding lookup is not a
matmul.
Only uniform MoE models (every block an MoE block) are priced: the layer-split ILP assumes
identical blocks (`check_priceable` refuses the others).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost.collectives import CollectiveOp
from planner.cost.comm import ClusterArrays, GroupLink, measured_collective_s, ring_time_s
from planner.errors import ConfigError
from planner.parallel import MeshAxis, ParallelConfig
from planner.profile import Profile
from planner.runtime import EXECUTOR_MOE, MoeRules
from planner.specs import ClusterSpec, MlpKind, ModelSpec

A2A = CollectiveOp.ALL_TO_ALL


def check_priceable(model: ModelSpec) -> None:
    """ConfigError naming the field when the model's MoE layout is not priced (non-uniform)."""
    m = model.moe
    if m is None or m.uniform:
        return
    field, value = (
        ("dense_layers", m.dense_layers) if m.dense_layers else ("layer_interval", m.layer_interval)
    )
    raise ConfigError(
        f"model.moe.{field}={value}: only uniform MoE models (dense_layers=0, layer_interval=1) "
        "are priced; the layer split assumes identical blocks"
    )


def _mats(model: ModelSpec) -> int:
    return 2 if model.mlp is MlpKind.GELU else 3


def _mlp_rank_params(model: ModelSpec, ffn: int, tp: int) -> int:
    """One MLP of width `ffn` on one TP rank (Shoeybi et al. 2019 Sec. 3 split): the matrices
    and column-parallel biases divided by tp, the row-parallel output bias replicated."""
    n = _mats(model)
    params = n * model.hidden * ffn // tp
    if model.bias:
        params += (n - 1) * ffn // tp + model.hidden
    return params


def non_expert_mlp_params(model: ModelSpec, tp: int) -> int:
    """The MoE block's feed-forward parameters that every EP rank holds: the router (h x E,
    replicated over TP: it is small and its output is needed whole), the shared-expert gate
    (h x 1) and the shared experts (split by tp like a dense MLP)."""
    m = model.moe
    assert m is not None
    h = model.hidden
    shared = m.shared_experts * _mlp_rank_params(model, m.shared_ffn_hidden, tp)
    return h * m.experts + (h if m.shared_expert_gate else 0) + shared


def expert_params_per_rank(model: ModelSpec, tp: int, ep: int) -> int:
    """Routed-expert parameters of one block on one rank: E / ep experts, each split by tp."""
    m = model.moe
    assert m is not None
    return m.experts // ep * _mlp_rank_params(model, m.expert_ffn_hidden, tp)


def routed_copies(model: ModelSpec, tokens: int, ep: int, rules: MoeRules = EXECUTOR_MOE) -> float:
    """Routed token copies the busiest rank processes: T * k * imbalance(ep)."""
    m = model.moe
    assert m is not None
    return tokens * m.top_k * rules.imbalance(ep, m.experts)


def mlp_activation_bytes_per_token(
    model: ModelSpec, tp: int, ep: int, dtype_bytes: int, rules: MoeRules = EXECUTOR_MOE
) -> float:
    """Bytes the MoE feed-forward keeps for backward per token of the micro-batch on one rank
    (replacing the dense MLP's (2|4) * d * ffn / tp; the normed input is counted with the
    block's linear inputs in memory.py).

    Router: fp32 probabilities E * 4. Per routed copy (k per token): on the routing side the
    int64 index, the fp32 weight and the expert output received back; on the expert's side
    (times the busiest rank's imbalance) the expert input and the gated expert's
    intermediates as the dense MLP keeps them (gate, up, silu(gate), product: 4 * d * f_e /
    tp; GELU 2). Shared experts keep theirs per token.
    """
    m = model.moe
    assert m is not None
    d, h = dtype_bytes, model.hidden
    inner = 2 if model.mlp is MlpKind.GELU else 4
    router = rules.router_probs_bytes * m.experts
    source = float(rules.routed_index_bytes + rules.routed_weight_bytes)
    source += rules.saved_hidden_at_source * d * h
    at_expert = rules.saved_hidden_at_expert * d * h + inner * d * m.expert_ffn_hidden / tp
    routed = m.top_k * (source + rules.imbalance(ep, m.experts) * at_expert)
    shared = m.shared_experts * inner * d * m.shared_ffn_hidden / tp
    gate = 2 * d if m.shared_expert_gate else 0  # the gate's logit and sigmoid output
    return router + routed + shared + gate


def dispatch_bytes(
    model: ModelSpec, tokens: int, ep: int, dtype_bytes: int, rules: MoeRules = EXECUTOR_MOE
) -> float:
    """The per-rank buffer of one dispatch (or combine) all-to-all: the busiest rank's routed
    copies, h elements each (nccl-tests' "size" convention of collectives.py)."""
    return routed_copies(model, tokens, ep, rules) * model.hidden * dtype_bytes


def routing_grad_bytes(
    model: ModelSpec, tokens: int, dtype_bytes: int, rules: MoeRules = EXECUTOR_MOE
) -> tuple[float, ...]:
    """The TP all-reduces in backward that complete the routing weights' gradient (T x k) and
    the shared gate's (T x 1), one each, when `tp_reduces_routing_grad`."""
    m = model.moe
    assert m is not None
    if not rules.tp_reduces_routing_grad:
        return ()
    gate = (float(tokens * dtype_bytes),) if m.shared_expert_gate else ()
    return (float(tokens * m.top_k * dtype_bytes), *gate)


def transient_bytes(
    model: ModelSpec, tokens: int, ep: int, dtype_bytes: int, rules: MoeRules = EXECUTOR_MOE
) -> float:
    """Buffers alive only while one MoE block runs (the dispatch's sorted send buffer and the
    expert output before the combine), counted once per rank."""
    return rules.transient_hidden_per_routed_copy * dispatch_bytes(
        model, tokens, ep, dtype_bytes, rules
    )


@dataclass(frozen=True, kw_only=True)
class GroupLinks:
    """The slowest link of each pipeline rank's groups of one kind, and the groups as rows of
    GPU ids (for measured collective fits)."""

    links: tuple[GroupLink, ...]
    groups: tuple[np.ndarray, ...]

    def collective_s(
        self, op: CollectiveOp, rank: int, nbytes: float, profile: Profile | None
    ) -> float:
        if self.links[rank].size <= 1:
            return 0.0
        measured = measured_collective_s(profile, op, self.groups[rank], nbytes)
        return measured if measured is not None else ring_time_s(op, nbytes, self.links[rank])


def _dp_axis_of(
    cluster: ClusterSpec,
    config: ParallelConfig,
    outer: int,
    size: int,
    inner: int,
    eff: tuple[float, float],
) -> GroupLinks:
    """Links of the groups that are the middle axis when the mesh (pp, dp, tp) is re-read as
    (pp * outer, size, inner) with the same rank order and placement: comm.ClusterArrays then
    prices them as its DP axis (NIC sharing included). Reduced to the worst per pipeline rank."""
    view = ParallelConfig(
        tp=inner, pp=config.pp * outer, dp=size, micro_batch=1, rank_to_gpu=config.placement()
    )
    arrays = ClusterArrays(cluster, view, *eff)
    per_view = arrays.axis_links(MeshAxis.DP)
    links, groups = [], []
    for r in range(config.pp):
        mine = per_view[r * outer : (r + 1) * outer]
        links.append(
            GroupLink(
                size=size,
                bandwidth_bytes_per_s=min(g.bandwidth_bytes_per_s for g in mine),
                latency_s=max(g.latency_s for g in mine),
            )
        )
        rows = [arrays.gpu[q].T for q in range(r * outer, (r + 1) * outer)]
        groups.append(np.concatenate(rows, axis=0))
    return GroupLinks(links=tuple(links), groups=tuple(groups))


def ep_links(cluster: ClusterSpec, config: ParallelConfig, eff: tuple[float, float]) -> GroupLinks:
    """The EP groups: ep consecutive data-parallel indices (d = d_outer * ep + e) at one
    (pp, tp) coordinate, i.e. the mesh read as (pp * dp/ep, ep, tp)."""
    return _dp_axis_of(cluster, config, config.dp // config.ep, config.ep, config.tp, eff)


def expert_dp_links(
    cluster: ClusterSpec, config: ParallelConfig, eff: tuple[float, float]
) -> GroupLinks:
    """The expert-data-parallel groups that reduce (and under ZeRO shard) one expert's
    gradients: the dp / ep ranks of equal e, i.e. the mesh read as (pp, dp/ep, ep * tp)."""
    # dp_cp: with cp > 1 (ep = 1 then) the experts' data-parallel group is the dp x cp group
    return _dp_axis_of(cluster, config, 1, config.dp_cp // config.ep, config.ep * config.tp, eff)


def all_to_all_pass_s(
    nbytes: float, links: GroupLinks, rank: int, profile: Profile | None
) -> float:
    """One pass (forward or backward) of one MoE block: a dispatch and a combine all-to-all of
    `nbytes` per rank on the rank's EP group (the backward sends the gradients the same way)."""
    return 2.0 * links.collective_s(A2A, rank, nbytes, profile)


def count_exchange_s(
    model: ModelSpec,
    links: GroupLinks,
    rank: int,
    profile: Profile | None,
    rules: MoeRules = EXECUTOR_MOE,
) -> float:
    """The forward's exchange of per-expert counts before the dispatch: an all-to-all of E
    int64 per rank (latency-bound; backward reuses the splits)."""
    m = model.moe
    assert m is not None
    return links.collective_s(A2A, rank, float(rules.count_bytes_per_expert * m.experts), profile)


def notes(model: ModelSpec, ep: int, rules: MoeRules = EXECUTOR_MOE) -> list[str]:
    """What an MoE estimate assumes, for its notes: the MFU convention and, with ep > 1, the
    routing imbalance (an estimate)."""
    m = model.moe
    assert m is not None
    active = model.param_count().active
    out = [
        f"MoE: model FLOPs and MFU count the {active / 1e9:.1f} B active parameters "
        f"(6 * N_active * tokens + attention; top-{m.top_k} of {m.experts} experts)"
    ]
    if ep > 1:
        out.append(
            f"MoE: the busiest of ep={ep} ranks is priced at {rules.imbalance(ep, m.experts):.3f} "
            f"x the mean routed tokens (an estimate from a per-expert imbalance of "
            f"{rules.routing_imbalance:g}, the Switch Transformer capacity factor; not measured)"
        )
    return out
