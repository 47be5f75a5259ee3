"""DeepSpeed: a `ds_config.json` for a plan, plus the launcher line.

Owns: mapping the plan's ZeRO stage, batch and precision to DeepSpeed's config keys (read from
microsoft/DeepSpeed deepspeed/runtime/config.py 063108a, zero/config.py 50c6d6f and
activation_checkpointing/config.py 077e674; table in docs/design-export.md), and what it
cannot express.

DeepSpeed's engine on its own (this config, no Megatron-DeepSpeed model code) is data
parallelism with ZeRO: a plan with tp, pp, cp or ep > 1 cannot be expressed. Its closest is
pure data parallelism over every GPU with ZeRO-3 (the only stage that shards the weights, so
the one most likely to fit), the plan's recompute, and the largest micro-batch <= the plan's
that divides the batch; it is priced, and the line says when it does not fit.
Activation checkpointing in DeepSpeed is called by the model's code
(deepspeed.checkpointing.checkpoint); the config only tunes it, so recompute is a note.
"""

from __future__ import annotations

import json

from planner.export.common import (
    Difference,
    Export,
    difference,
    finish,
    layout_differences,
    node_layout,
)
from planner.parallel import Recompute, Schedule
from planner.plan import Plan
from planner.profile import Profile
from planner.runtime import CpAttention
from planner.specs import Dtype


def _data_parallel_only(plan: Plan, profile: Profile | None) -> Difference | None:
    c, t = plan.config, plan.training
    extra = {n: getattr(c, n) for n in ("tp", "pp", "cp", "ep") if getattr(c, n) > 1}
    if not extra:
        return None
    world = c.world_size
    what = (
        "DeepSpeed's config has no tensor, pipeline, context or expert parallelism (plan: "
        + ", ".join(f"{k}={v}" for k, v in extra.items())
        + ")"
    )
    fits = [mb for mb in range(c.micro_batch, 0, -1) if t.global_batch % (world * mb) == 0]
    if not fits:
        return Difference(
            what=what,
            closest=f"dp={world}",
            unpriced_why=f"global_batch={t.global_batch} is not a multiple of the {world} GPUs",
        )
    changes = {
        "tp": 1,
        "pp": 1,
        "cp": 1,
        "ep": 1,
        "dp": world,
        "micro_batch": fits[0],
        "zero": 3,
        "schedule": Schedule.ONE_F_ONE_B,
        "virtual_stages": 1,
        "sequence_parallel": False,
        "stage_layers": None,
        "cp_attention": CpAttention.ALL_GATHER_KV,
    }
    return difference(plan, profile, what, f"dp={world} ZeRO-3 micro_batch={fits[0]}", changes)


def ds_config(plan: Plan, closest: Difference | None) -> dict:
    """The config for the plan, or for its data-parallel closest when it has other degrees."""
    c, t = plan.config, plan.training
    dp, mb, zero = c.dp, c.micro_batch, c.zero
    if closest is not None:
        dp, mb, zero = c.world_size, closest.config_changes.get("micro_batch", mb), 3
    config: dict = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": t.global_batch // (dp * mb),
        "zero_optimization": {"stage": zero},
        "bf16": {"enabled": t.dtype is Dtype.BF16},
        "fp16": {"enabled": t.dtype is Dtype.FP16},
    }
    if t.grad_dtype is Dtype.FP32 and t.dtype is not Dtype.FP32:
        # accumulate (and reduce) gradients in fp32, as the plan prices
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if c.recompute is not Recompute.NONE:
        config["activation_checkpointing"] = {
            "partition_activations": False,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
        }
    return config


def export(plan: Plan, *, profile: Profile | None) -> Export:
    diffs = layout_differences(plan, profile, "DeepSpeed")
    closest = _data_parallel_only(plan, profile)
    if closest is not None:
        diffs.append(closest)
    t = plan.training
    if t.fp8_linears:
        diffs.append(
            difference(
                plan,
                profile,
                "DeepSpeed's config has no FP8 linears",
                "bf16 linears",
                training_changes={"fp8_linears": False},
            )
        )
    notes = []
    if plan.config.recompute is not Recompute.NONE:
        notes.append(
            f"recompute={plan.config.recompute.value}: wrap each transformer block in "
            "deepspeed.checkpointing.checkpoint in the model code (the config only tunes it)"
        )
    config = ds_config(plan, closest if closest and closest.closest_step_s is not None else None)
    nodes, per_node = node_layout(plan)
    launcher = (
        f"deepspeed --num_nodes {nodes} --num_gpus {per_node} --hostfile hostfile "
        "train.py --deepspeed --deepspeed_config ds_config.json"
    )
    return finish(
        plan,
        profile,
        diffs,
        target="deepspeed",
        text=json.dumps(config, indent=2, sort_keys=True) + "\n",
        config=config,
        launcher=launcher,
        notes=tuple(notes),
    )
