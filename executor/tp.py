"""Tensor parallelism (Megatron-style, Shoeybi et al. 2019 Sec. 3) with DTensor `parallelize_module`.

Owns: `apply_tp` on one model chunk (a pruned `Transformer`).
Does not own: the mesh (mesh.py) or the order techniques are applied in (parallelize.py).

Per block: q/k/v and MLP w1/w3 column-parallel (heads and ffn split over tp), wo and w2
row-parallel, so each block needs one all-reduce in forward after attention and one after the
MLP (Sec. 3, Fig. 3). The token embedding is vocab-parallel (row-parallel over the vocab rows
with replicated token ids) and the LM head column-parallel over the vocab; its logits stay
vocab-sharded (a DTensor) and the cross entropy runs under DTensor's `loss_parallel()`, so the
[mb, seq, vocab] logits are never gathered (Megatron's vocab-parallel cross entropy, Shoeybi et al.
2019 Sec. 3). `loss_parallel()` must wrap backward too: train.py enters `loss_context()` around
the whole forward/backward (the pipeline schedule runs both inside `step`).
With sequence parallelism (Korthikanti et al. 2022 Sec. 4.2.2) norms run on sequence shards and
the all-reduces become reduce-scatter + all-gather; the residual stream between blocks (and across
pipeline stages) is then this rank's [mb, seq/tp, hidden] shard.
"""

from __future__ import annotations

import contextlib

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from executor.model import Transformer, TransformerBlock
from executor.moe import MoE


def loss_context(tp: int) -> contextlib.AbstractContextManager[object]:
    """DTensor loss parallelism for vocab-sharded logits (tp > 1); nothing otherwise."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Shard `model`'s present parts over `tp_mesh` in place (works on meta tensors)."""
    sp = sequence_parallel
    stream = Shard(1) if sp else Replicate()  # layout of the residual stream between blocks
    if model.embed is not None:
        parallelize_module(
            model.embed,
            tp_mesh,
            {"tok_embeddings": RowwiseParallel(input_layouts=Replicate())},
        )
        if sp:
            # The learned position table is added to full-sequence embeddings, then this rank
            # keeps its sequence shard (a local slice, no communication).
            parallelize_module(
                model.embed,
                tp_mesh,
                PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
            )
    for block in model.layers.values():
        assert isinstance(block, TransformerBlock)
        plan: dict[str, ParallelStyle] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
        }
        # An MoE feed-forward shards itself and takes this rank's plain tensor (ep.py).
        moe = isinstance(block.feed_forward, MoE)
        if not moe:
            plan["feed_forward.w1"] = ColwiseParallel()
            plan["feed_forward.w2"] = RowwiseParallel(output_layouts=stream)
            if block.feed_forward.w3 is not None:
                plan["feed_forward.w3"] = ColwiseParallel()
        if sp:
            ffn_input = Shard(1) if moe else Replicate()
            plan |= {
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),),
                    desired_input_layouts=(ffn_input,),
                    use_local_output=moe,
                ),
            }
        parallelize_module(block, tp_mesh, plan)
    if model.head is not None:
        head_plan: dict[str, ParallelStyle] = {
            "output": ColwiseParallel(
                input_layouts=stream, output_layouts=Shard(-1), use_local_output=False
            )
        }
        if sp:
            head_plan["norm"] = SequenceParallel()
        parallelize_module(model.head, tp_mesh, head_plan)
        # Both sides are Shard(0) over the vocab on the same mesh, so they tie again exactly.
        model.tie_weights()
