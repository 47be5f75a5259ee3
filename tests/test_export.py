"""`meshplan export`: the exported torchtitan / Megatron-LM / DeepSpeed arguments round-trip the
plan's degrees, and what a target cannot express is listed with its predicted cost.

The degrees are parsed back with argparse parsers declaring the targets' flag names (as read
in docs/design-export.md). The targets' own parsers run when their packages import
(`pip install -e '.[interop]'`) and are skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cli.main import main
from planner.export import export_plan
from planner.export.megatron import megatron_split
from planner.export.torchtitan import torchtitan_split
from planner.plan import Plan, build_plan, load_plan

HEADLINE = (
    "--model", "llama3-70b", "--cluster", "dgx-h100", "--nodes", "16",
    "--global-batch", "512", "--seq-len", "8192",
)  # fmt: skip
INTERLEAVED = ("--fix", "pp=4,schedule=interleaved,virtual_stages=2")


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The README headline plan and a pp=4 interleaved plan of the same job (~3 s each)."""
    d = tmp_path_factory.mktemp("plans")
    out = {}
    for name, extra in (("headline", ()), ("interleaved", INTERLEAVED)):
        path = d / f"{name}.json"
        assert main(["plan", *HEADLINE, *extra, "--out", str(path)]) == 0
        out[name] = path
    return out


def _after(text: str, marker: str) -> list[str]:
    """The arguments after `marker` in an exported command line."""
    argv = shlex.split(text)
    return argv[argv.index(marker) + 1 :]


def _torchtitan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    for flag in (
        "--parallelism.tensor_parallel_degree",
        "--parallelism.pipeline_parallel_degree",
        "--parallelism.data_parallel_replicate_degree",
        "--parallelism.data_parallel_shard_degree",
        "--parallelism.context_parallel_degree",
        "--parallelism.expert_parallel_degree",
        "--parallelism.pipeline_parallel_microbatch_size",
        "--parallelism.pipeline_parallel_layers_per_stage",
        "--parallelism.pipeline_parallel_first_stage_less_layers",
        "--parallelism.pipeline_parallel_last_stage_less_layers",
        "--training.local_batch_size",
        "--training.global_batch_size",
        "--training.seq_len",
    ):
        p.add_argument(flag, type=int, default=1)
    for flag in (
        "--job.config_file",
        "--parallelism.pipeline_parallel_schedule",
        "--parallelism.fsdp_reshard_after_forward",
        "--parallelism.context_parallel_rotate_method",
        "--activation_checkpoint.mode",
        "--activation_checkpoint.selective_ac_option",
        "--training.mixed_precision_param",
        "--model.converters",
    ):
        p.add_argument(flag)
    return p


def _megatron_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    ints = (
        "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
        "--context-parallel-size", "--expert-model-parallel-size",
        "--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank",
        "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
        "--recompute-num-layers", "--micro-batch-size", "--global-batch-size", "--seq-length",
        "--num-layers", "--hidden-size", "--num-attention-heads", "--num-query-groups",
        "--ffn-hidden-size", "--max-position-embeddings", "--kv-channels", "--num-experts",
        "--moe-router-topk", "--moe-ffn-hidden-size", "--moe-shared-expert-intermediate-size",
    )  # fmt: skip
    for flag in ints:
        p.add_argument(flag, type=int)
    for flag in (
        "--sequence-parallel", "--use-distributed-optimizer", "--group-query-attention",
        "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--add-qkv-bias", "--bf16", "--fp16", "--accumulate-allreduce-grads-in-fp32",
    ):  # fmt: skip
        p.add_argument(flag, action="store_true")
    for flag in (
        "--recompute-granularity", "--recompute-method", "--normalization",
        "--position-embedding-type", "--fp8-format", "--cp-comm-type", "--moe-layer-freq",
    ):  # fmt: skip
        p.add_argument(flag)
    return p


def _check_torchtitan(plan: Plan, text: str) -> None:
    ns = _torchtitan_parser().parse_args(_after(text, "torchtitan.train"))
    g = vars(ns)
    c, t = plan.config, plan.training
    assert g["parallelism.tensor_parallel_degree"] == c.tp
    assert g["parallelism.pipeline_parallel_degree"] == c.pp
    dp = (
        g["parallelism.data_parallel_replicate_degree"]
        * g["parallelism.data_parallel_shard_degree"]
    )
    assert dp == c.dp
    assert g["parallelism.context_parallel_degree"] == c.cp
    assert g["parallelism.expert_parallel_degree"] == c.ep
    assert g["training.global_batch_size"] == t.global_batch
    assert g["training.seq_len"] == t.seq_len
    if c.pp > 1:
        mb = g["parallelism.pipeline_parallel_microbatch_size"]
        assert g["training.local_batch_size"] // mb == plan.num_micro_batches
    else:
        mb = g["training.local_batch_size"]
        assert t.global_batch // (mb * dp) == plan.num_micro_batches
    assert mb == c.micro_batch
    assert g["activation_checkpoint.mode"] == c.recompute.value


def _check_megatron(plan: Plan, text: str) -> argparse.Namespace:
    ns = _megatron_parser().parse_args(_after(text, "pretrain_gpt.py"))
    c, t, m = plan.config, plan.training, plan.model
    assert ns.tensor_model_parallel_size == c.tp
    assert ns.pipeline_model_parallel_size == c.pp
    assert ns.context_parallel_size == c.cp
    assert ns.expert_model_parallel_size == c.ep
    assert plan.cluster.num_gpus // (c.tp * c.pp * c.cp) == c.dp  # Megatron derives dp
    assert ns.micro_batch_size == c.micro_batch
    assert ns.global_batch_size == t.global_batch
    assert ns.seq_length == t.seq_len
    assert ns.sequence_parallel == c.sequence_parallel
    assert ns.use_distributed_optimizer == (c.zero >= 1)
    assert (ns.num_layers, ns.hidden_size, ns.num_attention_heads) == (m.layers, m.hidden, m.heads)
    assert ns.num_query_groups == m.kv_heads and ns.ffn_hidden_size == m.ffn_hidden
    return ns


def test_headline_plan_round_trips_through_every_target(plans: dict[str, Path]) -> None:
    plan = load_plan(plans["headline"])
    assert (plan.config.tp, plan.config.pp, plan.config.zero) == (1, 1, 3)
    tt = export_plan(plan, "torchtitan")
    _check_torchtitan(plan, tt.text)
    assert tt.differences == ()  # ZeRO-3 FSDP over dp, full AC: torchtitan runs it as planned
    assert tt.exported_step_s == tt.plan_step_s
    mg = export_plan(plan, "megatron")
    ns = _check_megatron(plan, mg.text)
    assert ns.recompute_granularity == "full" and ns.recompute_method == "uniform"
    # Megatron's distributed optimizer is ZeRO-1: listed and priced
    (zero,) = mg.differences
    assert "ZeRO-1" in zero.what and zero.closest_step_s is not None
    assert zero.plan_step_s == pytest.approx(mg.plan_step_s)
    assert zero.closest_step_s != zero.plan_step_s
    ds = export_plan(plan, "deepspeed")
    cfg = json.loads(ds.text)
    c = plan.config
    assert cfg["zero_optimization"]["stage"] == c.zero
    assert cfg["train_batch_size"] == plan.training.global_batch
    assert cfg["train_micro_batch_size_per_gpu"] == c.micro_batch
    assert cfg["gradient_accumulation_steps"] == plan.num_micro_batches
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert ds.differences == ()


def _split_from_flags(plan: Plan, target: str, text: str) -> tuple[int, ...] | None:
    """The per-chunk split the exported flags make the target build."""
    c, layers = plan.config, plan.model.layers
    if target == "torchtitan":
        g = vars(_torchtitan_parser().parse_args(_after(text, "torchtitan.train")))
        w_in = g["parallelism.pipeline_parallel_first_stage_less_layers"]
        w_out = g["parallelism.pipeline_parallel_last_stage_less_layers"]
        per = g["parallelism.pipeline_parallel_layers_per_stage"]
        assert -(-(layers + w_in + w_out) // per) == c.num_chunks  # torchtitan's stage count
        return torchtitan_split(layers, c.num_chunks, w_in, w_out)
    ns = _check_megatron(plan, text)
    if ns.num_layers_per_virtual_pipeline_stage is not None:
        assert ns.num_layers_per_virtual_pipeline_stage * c.num_chunks == layers
    first, last = ns.decoder_first_pipeline_num_layers, ns.decoder_last_pipeline_num_layers
    return megatron_split(layers, c.pp, c.virtual_stages, first, last)


def test_interleaved_plan_round_trips_and_prices_its_split(plans: dict[str, Path]) -> None:
    plan = load_plan(plans["interleaved"])
    c = plan.config
    assert (c.pp, c.virtual_stages, c.schedule.value) == (4, 2, "interleaved")
    split = c.layers_per_chunk(plan.model)
    assert len(set(split)) > 1  # the planner's split is uneven: neither target takes it
    for target, check in (("torchtitan", _check_torchtitan), ("megatron", _check_megatron)):
        ex = export_plan(plan, target)
        check(plan, ex.text)
        diffs = [d for d in ex.differences if "split" in d.what]
        assert len(diffs) == 1, [d.what for d in ex.differences]
        d = diffs[0]
        # the split priced is the one the exported flags build, and it is not the plan's
        built = _split_from_flags(plan, target, ex.text)
        assert d.config_changes == {"stage_layers": built}
        assert built != split and sum(built) == plan.model.layers
        assert d.plan_step_s is not None and d.closest_step_s is not None
        assert d.closest_step_s != d.plan_step_s
        assert f"{d.plan_step_s:.3f} s -> {d.closest_step_s:.3f} s" in d.line()
    tt_args = _after(export_plan(plan, "torchtitan").text, "torchtitan.train")
    assert tt_args[tt_args.index("--parallelism.pipeline_parallel_schedule") + 1] == (
        "Interleaved1F1B"
    )
    ds = export_plan(plan, "deepspeed")
    (d,) = ds.differences
    assert "tp=2" in d.what and "pp=4" in d.what and d.closest_step_s is not None
    cfg = json.loads(ds.text)  # the data-parallel closest: every GPU a replica
    world = plan.cluster.num_gpus
    assert (
        cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world
        == cfg["train_batch_size"]
        == plan.training.global_batch
    )


def test_splits_the_targets_take_are_exported_exactly(plans: dict[str, Path]) -> None:
    plan = load_plan(plans["interleaved"])
    for target, split in (
        ("torchtitan", torchtitan_split(80, 8, 1, 1)),  # torchtitan's own default weights
        ("megatron", megatron_split(80, 4, 2, 18, 18)),
    ):
        assert split is not None
        exact = _rebuilt(plan, stage_layers=split)
        ex = export_plan(exact, target)
        assert _split_from_flags(exact, target, ex.text) == split
        assert not [d for d in ex.differences if "split" in d.what]


def test_a_permuted_rank_map_is_priced_against_the_identity(plans: dict[str, Path]) -> None:
    plan = load_plan(plans["headline"])
    n = plan.cluster.num_gpus
    perm = tuple(range(n - 1, -1, -1))
    permuted = _rebuilt(plan, rank_to_gpu=perm)
    for target in ("torchtitan", "megatron", "deepspeed"):
        (d,) = [x for x in export_plan(permuted, target).differences if "rank" in x.what]
        assert d.closest == "the identity rank map"
        assert d.plan_step_s is not None and d.closest_step_s is not None


def _rebuilt(plan: Plan, **config: object) -> Plan:
    return build_plan(
        model=plan.model,
        training=plan.training,
        cluster=plan.cluster,
        config=replace(plan.config, **config),
        prediction={},
        source="test",
    )


def test_torchtitan_sequence_parallel_and_fp8(plans: dict[str, Path]) -> None:
    plan = load_plan(plans["interleaved"])
    no_sp = _rebuilt(plan, sequence_parallel=False)
    (d,) = [x for x in export_plan(no_sp, "torchtitan").differences if "sequence" in x.what]
    assert d.config_changes == {"sequence_parallel": True} and d.closest_step_s is not None
    fp8 = replace(no_sp, training=replace(no_sp.training, fp8_linears=True))
    tt = _after(export_plan(fp8, "torchtitan").text, "torchtitan.train")
    assert tt[tt.index("--model.converters") + 1] == "float8"
    ns = _check_megatron(fp8, export_plan(fp8, "megatron").text)
    assert ns.fp8_format == "hybrid" and ns.bf16 and not ns.sequence_parallel
    (d,) = [x for x in export_plan(fp8, "deepspeed").differences if "FP8" in x.what]
    assert d.training_changes == {"fp8_linears": False} and d.closest_step_s is not None


def test_a_mixed_gpu_cluster_is_reported_unpriced(plans: dict[str, Path]) -> None:
    from presets import load_cluster

    plan = load_plan(plans["headline"])
    a100 = load_cluster("dgx-a100-80gb", 1).nodes[0]
    nodes = tuple(a100 if i % 2 else n for i, n in enumerate(plan.cluster.nodes))
    mixed = replace(plan, cluster=replace(plan.cluster, nodes=nodes))
    for target in ("torchtitan", "megatron", "deepspeed"):
        (d,) = [x for x in export_plan(mixed, target).differences if "mixed-GPU" in x.what]
        assert d.closest_step_s is None and "already prices" in d.unpriced_why
        assert "not priced" in d.line()


def test_cli_prints_the_command_and_one_line_per_difference(
    plans: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(plans["interleaved"]), "--to", "megatron"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("torchrun ") and out.count("\n") == 1
    diff_lines = [x for x in err.splitlines() if x.startswith("differs:")]
    assert len(diff_lines) == 1 and "predicted step" in diff_lines[0]


def test_cli_json_is_one_document(plans: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    assert main(["export", str(plans["interleaved"]), "--to", "deepspeed", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["target"] == "deepspeed" and json.loads(doc["text"]) == doc["config"]
    (d,) = doc["differences"]
    assert d["closest_step_s"] is not None and d["plan_step_s"] is not None


def test_cli_out_is_written_and_errors_are_one_line(
    plans: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ds_config.json"
    assert main(["export", str(plans["headline"]), "--to", "deepspeed", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["zero_optimization"]["stage"] == 3
    assert capsys.readouterr().out == ""
    for args, words in (
        (["--to", "slurm"], ("--to", "torchtitan|megatron|deepspeed")),
        (["--to", "megatron", "--out", str(tmp_path)], ("--out", "is a directory")),
        (["--to", "megatron", "--config-file", "x.toml"], ("--config-file",)),
    ):
        assert main(["export", str(plans["headline"]), *args]) == 2
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err
        assert all(w in lines[0] for w in words), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds_config.json"]


# The targets' own parsers: run where `pip install -e '.[interop]'` installed them.


def test_torchtitan_config_manager_parses_the_export(
    plans: dict[str, Path], tmp_path: Path
) -> None:
    config_mod = pytest.importorskip("torchtitan.config", reason="torchtitan is not installed")
    toml = tmp_path / "base.toml"
    toml.write_text("[job]\ndescription = 'meshplan export test'\n")
    for name in ("headline", "interleaved"):
        plan = load_plan(plans[name])
        text = export_plan(plan, "torchtitan", config_file=str(toml)).text
        cfg = config_mod.ConfigManager().parse_args(_after(text, "torchtitan.train"))
        p = cfg.parallelism
        assert (p.tensor_parallel_degree, p.pipeline_parallel_degree) == (
            plan.config.tp,
            plan.config.pp,
        )
        assert p.data_parallel_shard_degree * p.data_parallel_replicate_degree == plan.config.dp
        assert cfg.training.global_batch_size == plan.training.global_batch


def test_megatron_argument_parser_parses_the_export(
    plans: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    arguments = pytest.importorskip(
        "megatron.training.arguments", reason="Megatron-LM (megatron.training) is not installed"
    )
    for name in ("headline", "interleaved"):
        plan = load_plan(plans[name])
        argv = _after(export_plan(plan, "megatron").text, "pretrain_gpt.py")
        monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
        ns = arguments.parse_args()
        assert ns.tensor_model_parallel_size == plan.config.tp
        assert ns.pipeline_model_parallel_size == plan.config.pp
        assert ns.micro_batch_size == plan.config.micro_batch


def test_megatron_core_model_parallel_config_takes_the_degrees(plans: dict[str, Path]) -> None:
    core = pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    import torch

    plan = load_plan(plans["interleaved"])
    ns = _check_megatron(plan, export_plan(plan, "megatron").text)
    cfg = core.ModelParallelConfig(
        tensor_model_parallel_size=ns.tensor_model_parallel_size,
        pipeline_model_parallel_size=ns.pipeline_model_parallel_size,
        context_parallel_size=ns.context_parallel_size,
        expert_model_parallel_size=ns.expert_model_parallel_size,
        sequence_parallel=ns.sequence_parallel,
        virtual_pipeline_model_parallel_size=plan.config.virtual_stages,
        pipeline_dtype=torch.bfloat16,  # required with pp > 1
        bf16=True,
    )
    assert cfg.tensor_model_parallel_size == plan.config.tp


def test_deepspeed_config_accepts_the_export(plans: dict[str, Path]) -> None:
    ds_config = pytest.importorskip("deepspeed.runtime.config", reason="deepspeed is not installed")
    plan = load_plan(plans["headline"])
    cfg = json.loads(export_plan(plan, "deepspeed").text)

    class _Mpu:  # DeepSpeed reads the data-parallel world size from the model-parallel unit
        def get_data_parallel_world_size(self) -> int:
            return plan.config.dp

        def get_data_parallel_rank(self) -> int:
            return 0

        def get_model_parallel_world_size(self) -> int:
            return 1

    # DeepSpeedConfig asks torch.distributed for the rank first and falls back to a world of
    # 1 (ignoring the mpu) without a process group: give it a one-process gloo group.
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parsed = ds_config.DeepSpeedConfig(cfg, mpu=_Mpu())
    finally:
        dist.destroy_process_group()
    assert parsed.train_batch_size == plan.training.global_batch
    assert parsed.train_micro_batch_size_per_gpu == plan.config.micro_batch
    assert parsed.gradient_accumulation_steps == plan.num_micro_batches
    assert parsed.zero_optimization_stage == plan.config.zero
