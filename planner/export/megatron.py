"""Megatron-LM / NeMo: the `pretrain_gpt.py` arguments for a plan.

Owns: mapping the plan's degrees, batch, split, ZeRO, recompute, precision and the model's
shape to Megatron-LM's argparse flags (read from NVIDIA/Megatron-LM
megatron/training/arguments.py, commit 307dcf3; table in docs/design-export.md), and what
Megatron cannot express.

Mapping notes (why):
- Megatron's default rank order is tp-cp-ep-dp-pp, tp innermost: the plan's identity rank map
  ((pp, dp, cp, tp) outermost first, EP on consecutive data-parallel ranks).
- The split: Megatron splits evenly, or gives the first and last pipeline rank their own
  counts (`--decoder-first/last-pipeline-num-layers`) and the middle ranks the rest evenly;
  each rank's blocks are then split evenly over its virtual stages.
- ZeRO: the distributed optimizer shards the optimizer states and reduce-scatters gradients
  into a full-size gradient buffer: ZeRO-1. ZeRO-2/3 are priced as ZeRO-1, their closest.
- Selective recompute in Megatron is the attention core (Korthikanti et al. 2022), the plan's.
"""

from __future__ import annotations

import shlex
from dataclasses import fields

from planner.export.common import (
    Difference,
    Export,
    closest_split,
    difference,
    finish,
    layout_differences,
    node_layout,
    split_difference,
)
from planner.parallel import Recompute, Schedule
from planner.plan import Plan
from planner.profile import Profile
from planner.runtime import CpAttention
from planner.specs import Dtype, MlpKind, ModelSpec, NormKind, PositionKind

# ModelSpec fields this exporter turns into flags; any other field away from its default is
# a feature the exported arguments do not carry (reported, not priced: the model is the model).
_MAPPED = {
    "name", "layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "max_seq_len",
    "head_dim", "tied_embeddings", "mlp", "norm", "position", "bias", "qkv_bias", "moe",
}  # fmt: skip
CP_COMM = {CpAttention.ALL_GATHER_KV: "allgather", CpAttention.ULYSSES: "a2a"}


def megatron_split(
    layers: int, pp: int, v: int, first: int | None, last: int | None
) -> tuple[int, ...] | None:
    """The per-chunk split Megatron builds from its flags (chunk k on pipeline rank k % pp):
    the first / last rank take `first` / `last` blocks when given, the other ranks the rest
    evenly, and each rank's blocks are split evenly over its `v` virtual stages. None when
    the flags do not divide so."""
    per_rank = [0] * pp
    rest, remaining = list(range(pp)), layers
    if first is not None:
        per_rank[0], remaining, rest = first, remaining - first, rest[1:]
    if last is not None and pp > 1:
        per_rank[pp - 1], remaining, rest = last, remaining - last, rest[:-1]
    if rest:
        if remaining % len(rest):
            return None
        for r in rest:
            per_rank[r] = remaining // len(rest)
    elif remaining:
        return None
    if any(n % v or n < v for n in per_rank):
        return None
    return tuple(per_rank[k % pp] // v for k in range(pp * v))


def _megatron_splits(layers: int, pp: int, v: int):
    """Every split the flags can give, with (first, last) (None: not given)."""
    even = megatron_split(layers, pp, v, None, None)
    if even is not None:
        yield even, (None, None)
    for first in range(v, layers + 1, v):
        for last in range(v, layers - first + 1, v):
            split = megatron_split(layers, pp, v, first, last)
            if split is not None:
                yield split, (first, last)


def _split_args(plan: Plan, profile: Profile | None, diffs: list[Difference]) -> list[str]:
    c, layers = plan.config, plan.model.layers
    if c.pp == 1:
        return []
    split, v = c.layers_per_chunk(plan.model), c.virtual_stages
    chosen = closest_split(plan, profile, _megatron_splits(layers, c.pp, v))
    if chosen is None:
        diffs.append(
            Difference(
                what=f"Megatron's split flags cannot give {c.num_chunks} chunks of {layers} "
                "layers (each rank's blocks must divide over its virtual stages)",
                closest="none",
                unpriced_why="no expressible split to price",
            )
        )
        return []
    closest, (first, last) = chosen
    if closest != split:
        diffs.append(
            split_difference(
                plan,
                profile,
                "Megatron",
                "it splits evenly, or with the first and last rank's counts given and the "
                "middle ranks even, each rank even over its virtual stages",
                closest,
            )
        )
    if first is None:
        return ["--num-layers-per-virtual-pipeline-stage", str(closest[0])] if v > 1 else []
    args = [
        "--decoder-first-pipeline-num-layers",
        str(first),
        "--decoder-last-pipeline-num-layers",
        str(last),
    ]
    return args + (["--num-virtual-stages-per-pipeline-rank", str(v)] if v > 1 else [])


def _parallel_args(plan: Plan, profile: Profile | None, diffs: list[Difference]) -> list[str]:
    c = plan.config
    args = [
        "--tensor-model-parallel-size",
        str(c.tp),
        "--pipeline-model-parallel-size",
        str(c.pp),
        "--context-parallel-size",
        str(c.cp),
        "--expert-model-parallel-size",
        str(c.ep),
    ]
    if c.cp > 1:
        args += ["--cp-comm-type", CP_COMM[c.cp_attention]]
    sp = c.sequence_parallel
    if c.ep > 1 and c.tp > 1 and not sp:
        # Megatron refuses expert parallelism with TP unless sequence parallelism is on
        diffs.append(
            difference(
                plan,
                profile,
                "Megatron needs sequence parallelism for expert parallelism with TP",
                "sequence_parallel on",
                {"sequence_parallel": True},
            )
        )
        sp = True
    if sp:
        args.append("--sequence-parallel")
    if c.schedule is Schedule.GPIPE:
        diffs.append(
            difference(
                plan,
                profile,
                "Megatron has no GPipe schedule (1F1B, or interleaved with virtual stages)",
                "1f1b",
                {"schedule": Schedule.ONE_F_ONE_B},
            )
        )
    args += _split_args(plan, profile, diffs)
    if c.zero >= 1:
        args.append("--use-distributed-optimizer")
    if c.zero >= 2:
        diffs.append(
            difference(
                plan,
                profile,
                f"Megatron's distributed optimizer is ZeRO-1 (full gradient buffer; plan: "
                f"ZeRO-{c.zero}; its experimental --use-torch-fsdp2, without PP, is not "
                "emitted)",
                "ZeRO-1",
                {"zero": 1},
            )
        )
    if c.recompute is Recompute.FULL:
        args += [
            "--recompute-granularity",
            "full",
            "--recompute-method",
            "uniform",
            "--recompute-num-layers",
            "1",
        ]
    elif c.recompute is Recompute.SELECTIVE:
        args += ["--recompute-granularity", "selective"]
    t = plan.training
    args += [
        "--micro-batch-size",
        str(c.micro_batch),
        "--global-batch-size",
        str(t.global_batch),
        "--seq-length",
        str(t.seq_len),
    ]
    return args


def _precision_args(plan: Plan) -> list[str]:
    t = plan.training
    args = {Dtype.BF16: ["--bf16"], Dtype.FP16: ["--fp16"]}.get(t.dtype, [])
    if t.dtype is not Dtype.FP32 and t.grad_dtype is Dtype.FP32:
        args.append("--accumulate-allreduce-grads-in-fp32")
    if t.fp8_linears:
        args += ["--fp8-format", "hybrid"]
    return args


def _moe_args(m: ModelSpec) -> list[str]:
    moe = m.moe
    if moe is None:
        return []
    args = [
        "--num-experts",
        str(moe.experts),
        "--moe-router-topk",
        str(moe.top_k),
        "--moe-ffn-hidden-size",
        str(moe.expert_ffn_hidden),
    ]
    if moe.shared_experts:
        size = moe.shared_experts * moe.shared_ffn_hidden  # MoeSpec fills it (0: routed size)
        args += ["--moe-shared-expert-intermediate-size", str(size)]
    pattern = [1 if moe.is_moe_layer(i) else 0 for i in range(m.layers)]
    if not all(pattern):
        args += ["--moe-layer-freq", "[" + ",".join(map(str, pattern)) + "]"]
    return args


def model_args(m: ModelSpec) -> list[str]:
    """The model's shape as Megatron flags."""
    args = [
        "--num-layers",
        str(m.layers),
        "--hidden-size",
        str(m.hidden),
        "--num-attention-heads",
        str(m.heads),
        "--ffn-hidden-size",
        str(m.ffn_hidden),
        "--max-position-embeddings",
        str(m.max_seq_len),
    ]
    if m.kv_heads != m.heads:
        args += ["--group-query-attention", "--num-query-groups", str(m.kv_heads)]
    if m.head_dim and m.head_dim * m.heads != m.hidden:
        args += ["--kv-channels", str(m.head_dim)]
    if m.mlp is MlpKind.SWIGLU:
        args.append("--swiglu")
    args += ["--normalization", "RMSNorm" if m.norm is NormKind.RMSNORM else "LayerNorm"]
    if m.position is PositionKind.ROPE:
        args += ["--position-embedding-type", "rope"]
    elif m.position is PositionKind.LEARNED:
        args += ["--position-embedding-type", "learned_absolute"]
    if not m.tied_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    if not m.bias:
        args.append("--disable-bias-linear")
        if m.qkv_bias:
            args.append("--add-qkv-bias")
    return args + _moe_args(m)


def _model_differences(m: ModelSpec) -> list[Difference]:
    out = []
    if m.position not in (PositionKind.ROPE, PositionKind.LEARNED):
        out.append(f"position={m.position.value}")
    for f in fields(m):
        if f.name not in _MAPPED and getattr(m, f.name) != f.default:
            out.append(f"{f.name}={getattr(m, f.name)!r}")
    if not out:
        return []
    return [
        Difference(
            what=f"model features the exported arguments do not set: {', '.join(out)}",
            closest="the model without them (add Megatron's flags for them by hand)",
            unpriced_why="a different model is not a parallel plan to re-estimate",
        )
    ]


def export(plan: Plan, *, profile: Profile | None) -> Export:
    diffs = layout_differences(plan, profile, "Megatron")
    args = _parallel_args(plan, profile, diffs)
    args += model_args(plan.model) + _precision_args(plan)
    diffs += _model_differences(plan.model)
    nodes, per_node = node_layout(plan)
    launcher = [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc_per_node={per_node}",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=$MASTER_ADDR:29500",
        "pretrain_gpt.py",
    ]
    text = " ".join(launcher) + " " + shlex.join(args) + "\n"
    return finish(
        plan,
        profile,
        diffs,
        target="megatron",
        text=text,
        argv=tuple(args),
        launcher=" ".join(launcher),
        notes=(
            f"add the data, tokenizer (vocab {plan.model.vocab}), optimizer and schedule "
            "flags of your run (--data-path, --tokenizer-type, --lr, --train-iters, ...)",
        ),
    )
