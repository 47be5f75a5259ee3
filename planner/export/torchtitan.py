"""torchtitan: the `torchrun ... -m torchtitan.train` command line for a plan.

Owns: mapping the plan's degrees, batch, schedule, split, ZeRO, recompute and FP8 to
torchtitan's JobConfig flags (read from pytorch/torchtitan torchtitan/config/job_config.py,
commit 6404b93; table in docs/design-export.md), and what torchtitan cannot express.

Mapping notes (why):
- torchtitan's data-parallel ranks are dp_replicate x dp_shard, and FSDP always shards over
  dp_shard x cp (its flattened `dp_shard_cp` mesh, as the plan's ZeRO does over dp * cp).
  ZeRO-3 -> shard, `fsdp_reshard_after_forward always`; ZeRO-2 -> shard, `never` (weights stay
  gathered between forward and backward, gradients and optimizer states sharded); ZeRO-0 ->
  replicate (DDP). ZeRO-1 has no torchtitan form: priced as ZeRO-2, its closest.
- `local_batch_size` is per data-parallel rank. Without PP torchtitan accumulates gradients
  over global / (local * dp) forward passes, so local = micro_batch; with PP the pipeline cuts
  local into local / microbatch_size micro-batches, so local = global / dp.
- The split: torchtitan counts the embedding as `first_stage_less_layers` layers and the head
  as `last_stage_less_layers`, spreads the sum evenly (extras first) and builds
  ceil(sum / layers_per_stage) chunks (torchtitan/distributed/pipeline_parallel.py, 02ef790).
  The exporter searches those three flags for the plan's split, else for the nearest one.
- torchtitan always runs sequence parallelism with TP.
"""

from __future__ import annotations

import shlex

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
from planner.specs import Dtype

SCHEDULES = {
    Schedule.ONE_F_ONE_B: "1F1B",
    Schedule.INTERLEAVED: "Interleaved1F1B",
    Schedule.GPIPE: "GPipe",
}


def _batch_args(plan: Plan) -> list[str]:
    c, t = plan.config, plan.training
    local = t.global_batch // c.dp if c.pp > 1 else c.micro_batch
    args = [
        "--training.local_batch_size",
        str(local),
        "--training.global_batch_size",
        str(t.global_batch),
        "--training.seq_len",
        str(t.seq_len),
    ]
    if c.pp > 1:
        args += ["--parallelism.pipeline_parallel_microbatch_size", str(c.micro_batch)]
    return args


def _dp_args(plan: Plan, profile: Profile | None, diffs: list[Difference]) -> list[str]:
    c = plan.config
    zero = c.zero
    if zero == 1:
        diffs.append(
            difference(
                plan,
                profile,
                "torchtitan has no ZeRO-1 (FSDP shards gradients too)",
                "ZeRO-2 (FSDP, reshard_after_forward never)",
                {"zero": 2},
            )
        )
        zero = 2
    if zero == 0 and c.cp > 1:
        diffs.append(
            difference(
                plan,
                profile,
                "torchtitan shards weights with FSDP over dp*cp whenever cp > 1 (no ZeRO-0)",
                "ZeRO-2 over dp*cp",
                {"zero": 2},
            )
        )
        zero = 2
    if zero == 0:
        return [
            "--parallelism.data_parallel_replicate_degree",
            str(c.dp),
            "--parallelism.data_parallel_shard_degree",
            "1",
        ]
    return [
        "--parallelism.data_parallel_replicate_degree",
        "1",
        "--parallelism.data_parallel_shard_degree",
        str(c.dp),
        "--parallelism.fsdp_reshard_after_forward",
        "always" if zero == 3 else "never",
    ]


def torchtitan_split(layers: int, chunks: int, w_in: int, w_out: int) -> tuple[int, ...] | None:
    """The blocks per chunk torchtitan builds (pipeline_parallel.py, pipeline_llm and
    generate_llm_fqn_per_model_part): the embedding counts as `w_in` layers and the head as
    `w_out`; the layers + w_in + w_out are spread evenly (extras first) and the first / last
    chunk give up w_in / w_out blocks. None when no chunk is left with a block."""
    effective = layers + w_in + w_out
    base, extra = divmod(effective, chunks)
    if w_in > base or w_out > base:
        return None  # torchtitan refuses weights above the smallest stage
    split = [base + (1 if k < extra else 0) for k in range(chunks)]
    split[0] -= w_in
    split[-1] -= w_out
    return tuple(split) if min(split) >= 1 and sum(split) == layers else None


def layers_per_stage_for(layers: int, chunks: int, w_in: int, w_out: int) -> int | None:
    """A pipeline_parallel_layers_per_stage that makes torchtitan build `chunks` stages: it
    builds ceil(E / per) of E = layers + w_in + w_out, which is `chunks` exactly for
    E / chunks <= per < E / (chunks - 1), so the smallest candidate ceil(E / chunks) decides."""
    effective = layers + w_in + w_out
    per = -(-effective // chunks)
    return per if -(-effective // per) == chunks else None


def _torchtitan_splits(layers: int, chunks: int):
    """Every split the three flags can give, with the flags' values (each weight is at most
    the smallest stage, so at most `layers`)."""
    for w_in in range(layers + 1):
        for w_out in range(layers + 1):
            split = torchtitan_split(layers, chunks, w_in, w_out)
            if split is None:
                continue
            per = layers_per_stage_for(layers, chunks, w_in, w_out)
            if per is not None:
                yield split, (per, w_in, w_out)


def _pp_args(plan: Plan, profile: Profile | None, diffs: list[Difference]) -> list[str]:
    c = plan.config
    if c.pp == 1:
        return []
    args = [
        "--parallelism.pipeline_parallel_degree",
        str(c.pp),
        "--parallelism.pipeline_parallel_schedule",
        SCHEDULES[c.schedule],
    ]
    split = c.layers_per_chunk(plan.model)
    chosen = closest_split(plan, profile, _torchtitan_splits(plan.model.layers, c.num_chunks))
    if chosen is None:
        diffs.append(
            Difference(
                what=f"torchtitan's layer-split flags cannot give {c.num_chunks} chunks of "
                f"{plan.model.layers} layers",
                closest="module_fqns_per_model_part in the TOML, one list per chunk",
                unpriced_why="no command-line split to price",
            )
        )
        return args
    closest, (per, w_in, w_out) = chosen
    if closest != split:
        diffs.append(
            split_difference(
                plan,
                profile,
                "torchtitan",
                "its flags spread the layers evenly, the embedding and head counted as "
                "first/last_stage_less_layers; module_fqns_per_model_part in the TOML can "
                "list each chunk's layers",
                closest,
            )
        )
    return args + [
        "--parallelism.pipeline_parallel_layers_per_stage",
        str(per),
        "--parallelism.pipeline_parallel_first_stage_less_layers",
        str(w_in),
        "--parallelism.pipeline_parallel_last_stage_less_layers",
        str(w_out),
    ]


def _precision_args(plan: Plan, profile: Profile | None, diffs: list[Difference]) -> list[str]:
    t = plan.training
    args: list[str] = []
    if t.dtype is Dtype.FP16:
        diffs.append(
            difference(
                plan,
                profile,
                "torchtitan has no fp16 mixed precision (bfloat16 or float32 parameters)",
                "bf16",
                training_changes={"dtype": Dtype.BF16},
            )
        )
    elif t.dtype is Dtype.FP32:
        args += ["--training.mixed_precision_param", "float32"]
    if t.grad_dtype is not Dtype.FP32:
        diffs.append(
            difference(
                plan,
                profile,
                f"torchtitan reduces gradients in float32 only (plan: {t.grad_dtype.value})",
                "fp32 gradient reduction",
                training_changes={"grad_dtype": Dtype.FP32},
            )
        )
    if t.fp8_linears:
        args += ["--model.converters", "float8"]
    return args


def _recompute_args(plan: Plan, diffs: list[Difference]) -> list[str]:
    mode = plan.config.recompute
    if mode is Recompute.SELECTIVE:
        diffs.append(
            Difference(
                what="torchtitan's selective checkpointing is per-op (saves every other "
                "matmul); the plan's recomputes the attention core only",
                closest="--activation_checkpoint.mode selective, selective_ac_option op",
                unpriced_why="the cost model prices the plan's selective recompute, not "
                "torchtitan's per-op policy",
            )
        )
        return [
            "--activation_checkpoint.mode",
            "selective",
            "--activation_checkpoint.selective_ac_option",
            "op",
        ]
    return ["--activation_checkpoint.mode", mode.value]


def export(plan: Plan, *, profile: Profile | None, config_file: str | None) -> Export:
    c = plan.config
    diffs = layout_differences(plan, profile, "torchtitan")
    args = ["--job.config_file", config_file or "train_configs/MODEL.toml"]
    args += ["--parallelism.tensor_parallel_degree", str(c.tp)]
    if c.tp > 1 and not c.sequence_parallel:
        diffs.append(
            difference(
                plan,
                profile,
                "torchtitan always runs sequence parallelism with TP",
                "sequence_parallel on",
                {"sequence_parallel": True},
            )
        )
    args += _pp_args(plan, profile, diffs)
    args += _dp_args(plan, profile, diffs)
    if c.cp > 1:
        # torchtitan's CP is ring attention; rotate_method allgather all-gathers the KV shards,
        # the plan's all_gather_kv. It has no Ulysses (head-scatter) attention.
        args += [
            "--parallelism.context_parallel_degree",
            str(c.cp),
            "--parallelism.context_parallel_rotate_method",
            "allgather",
        ]
        if c.cp_attention is CpAttention.ULYSSES:
            diffs.append(
                difference(
                    plan,
                    profile,
                    "torchtitan has no Ulysses context parallelism (ring attention only)",
                    "cp_attention all_gather_kv",
                    {"cp_attention": CpAttention.ALL_GATHER_KV},
                )
            )
    if c.ep > 1:
        args += ["--parallelism.expert_parallel_degree", str(c.ep)]
    args += _batch_args(plan)
    args += _recompute_args(plan, diffs)
    args += _precision_args(plan, profile, diffs)
    nodes, per_node = node_layout(plan)
    launcher = [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc_per_node={per_node}",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=$MASTER_ADDR:29500",
        "-m",
        "torchtitan.train",
    ]
    text = " ".join(launcher) + " " + shlex.join(args) + "\n"
    notes = (
        f"--job.config_file: give your torchtitan TOML for {plan.model.name} "
        "(model name/flavor, tokenizer, dataset); the flags above override its parallelism",
    )
    return finish(
        plan,
        profile,
        diffs,
        target="torchtitan",
        text=text,
        argv=tuple(args),
        launcher=" ".join(launcher),
        notes=notes if config_file is None else (),
    )
