"""Specs validate on construction, count parameters exactly, load from HF/YAML/presets, and
give the memory plans may fill (headroom)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

import presets
from planner.errors import SpecError
from planner.hf import model_from_hf_config
from planner.specs import (
    DEFAULT_MEMORY_HEADROOM,
    ClusterSpec,
    GpuSpec,
    LinkSpec,
    ModelSpec,
    NodeSpec,
    TrainingSpec,
)

GIB = 2**30


def _model(**kw):
    base = dict(
        name="m",
        layers=2,
        hidden=64,
        heads=4,
        kv_heads=4,
        ffn_hidden=256,
        vocab=100,
        max_seq_len=32,
    )
    return ModelSpec(**{**base, **kw})


def test_heads_must_divide_hidden_names_the_arithmetic():
    with pytest.raises(SpecError, match=r"heads=3 must divide hidden=64 \(64 % 3 = 1\)"):
        _model(heads=3, kv_heads=3)


def test_kv_heads_must_divide_heads():
    with pytest.raises(SpecError, match="kv_heads=3 must divide heads=4"):
        _model(kv_heads=3)


@pytest.mark.parametrize("field", ["layers", "hidden", "vocab", "max_seq_len"])
def test_non_positive_fields_are_named(field):
    with pytest.raises(SpecError, match=f"{field}=0 must be a positive integer"):
        _model(**{field: 0})


def test_bad_enum_lists_allowed_values():
    with pytest.raises(SpecError, match=r"mlp='relu' is not allowed; use one of gelu\|swiglu"):
        _model(mlp="relu")


def test_param_count_gpt_by_hand():
    # GPT block: attn 4h^2+4h, mlp 2*h*f + f + h, two LayerNorms 4h.
    m = _model()
    h, f = 64, 256
    per_block = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
    pc = m.param_count()
    assert pc.per_block == per_block
    assert pc.total == 100 * h + 32 * h + 2 * per_block + 2 * h + 100 * h


def test_param_count_llama_gqa_by_hand():
    m = _model(
        kv_heads=2, mlp="swiglu", norm="rmsnorm", position="rope", bias=False, tied_embeddings=True
    )
    h, f, kv = 64, 256, 2 * 16
    per_block = h * h + 2 * h * kv + h * h + 3 * h * f + 2 * h
    assert m.param_count().per_block == per_block
    assert m.param_count().total == 100 * h + 2 * per_block + h


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("llama2-7b", 6.738),
        ("llama3-8b", 8.030),
        ("llama3-70b", 70.554),
        ("mistral-7b", 7.242),
        ("qwen2.5-7b", 7.616),
    ],
)
def test_preset_param_counts_match_published_totals(name, billions):
    # Published counts: the models' Hugging Face model cards / safetensors metadata.
    assert presets.load_model(name).param_count().total / 1e9 == pytest.approx(billions, abs=0.001)


def test_tp_shard_splits_heads_ffn_vocab():
    m = presets.load_model("llama3-8b").tp_shard(4)
    assert (m.heads, m.kv_heads, m.ffn_hidden, m.vocab, m.head_dim) == (8, 2, 3584, 32064, 128)
    with pytest.raises(SpecError, match="tp=16 must divide kv_heads=8"):
        presets.load_model("llama3-8b").tp_shard(16)


def test_hf_llama_config_with_head_dim():
    cfg = {
        "model_type": "llama",
        "hidden_size": 512,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 1024,
        "vocab_size": 1000,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
        "head_dim": 32,
    }
    m = model_from_hf_config(cfg, "x", "config.json")
    assert (m.layers, m.heads, m.kv_heads, m.head_dim, m.mlp.value, m.tied_embeddings) == (
        3,
        8,
        2,
        32,
        "swiglu",
        False,
    )


def test_hf_multimodal_wrapper_is_refused_with_the_supported_families():
    # The old reader took mllama's text_config as a Llama and dropped its cross-attention.
    cfg = {"model_type": "mllama", "text_config": {"hidden_size": 512}}
    with pytest.raises(
        SpecError, match=r"model_type='mllama' is not supported; use one of llama\|"
    ):
        model_from_hf_config(cfg, "x", "config.json")


def test_hf_gpt2_names_and_null_n_inner():
    cfg = {
        "model_type": "gpt2",
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_inner": None,
        "vocab_size": 50257,
        "n_positions": 1024,
    }
    m = model_from_hf_config(cfg, "gpt2", "config.json")
    assert (m.ffn_hidden, m.mlp.value, m.tied_embeddings, m.position.value) == (
        3072,
        "gelu",
        True,
        "learned",
    )
    # GPT-2 small has 124,439,808 parameters (Radford et al. 2019; HF model card).
    assert m.param_count().total == 124_439_808


def test_hf_missing_field_and_bad_activation():
    with pytest.raises(SpecError, match="missing required field 'num_hidden_layers'"):
        model_from_hf_config(
            {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2},
            "x",
            "config.json",
        )
    cfg = {
        "model_type": "llama",
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 8,
        "vocab_size": 10,
        "max_position_embeddings": 8,
        "hidden_act": "relu",
    }
    with pytest.raises(
        SpecError, match="hidden_act='relu' is not supported for model_type 'llama'"
    ):
        model_from_hf_config(cfg, "x", "config.json")


def test_model_yaml_and_unknown_field(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(
        "family: llama\nlayers: 2\nhidden: 64\nheads: 4\nkv_heads: 2\nffn_hidden: 96\nvocab: 50\nmax_seq_len: 16\n"
    )
    assert presets.load_model(str(p)).kv_heads == 2
    p.write_text("family: llama\nlayer: 2\n")
    with pytest.raises(
        SpecError, match="unknown model field 'layer' \\(did you mean 'layers'\\?\\)"
    ):
        presets.load_model(str(p))


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("nodes: [\n")
    with pytest.raises(SpecError, match="malformed YAML"):
        presets.load_cluster(str(p))
    with pytest.raises(SpecError, match="cluster file not found"):
        presets.load_cluster(str(tmp_path / "none.yaml"))


def test_unknown_preset_suggests():
    with pytest.raises(SpecError, match="did you mean 'dgx-h100'"):
        presets.load_cluster("dgx-h10", 2)


def test_cluster_yaml_mixed_degraded_and_switches(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "name: mixed\nnodes:\n  - {type: dgx-a100-80gb, count: 2}\n  - {type: dgx-h100, nic_factor: 0.25, switch: 1}\n"
        "inter_switch_link: {name: spine, bandwidth_gb_per_s: 5, latency_us: 10}\n"
    )
    c = presets.load_cluster(str(p))
    assert c.num_gpus == 24 and c.uniform_gpus_per_node == 8
    assert c.gpu_of(20).name == "H100-SXM-80GB"
    assert c.nodes[2].nic.bandwidth_bytes_per_s == pytest.approx(12.5e9)
    assert c.link_between(0, 1).name == "nvlink3"
    assert c.link_between(0, 9).name == "hdr-ib"
    assert c.link_between(0, 17).name == "spine"
    assert c.gpu_location(17) == (2, 1)


def test_cluster_nodes_disagreeing_with_flag(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("nodes:\n  - {type: cpu-2}\n")
    with pytest.raises(SpecError, match="--nodes 3 disagrees"):
        presets.load_cluster(str(p), 3)


def test_training_validation():
    with pytest.raises(
        SpecError,
        match=r"training.dtype/grad_dtype=fp8 is not allowed: FP8 applies to the linears only",
    ):
        TrainingSpec(global_batch=8, seq_len=16, dtype="fp8")
    with pytest.raises(SpecError, match="exceeds model"):
        TrainingSpec(global_batch=8, seq_len=64).check_model(_model())


def test_spec_constructors_validate_links_and_gpus():
    with pytest.raises(SpecError, match="bandwidth_bytes_per_s"):
        LinkSpec(name="x", bandwidth_bytes_per_s=0, latency_s=0)
    gpu = presets.load_gpu("A100-80GB")
    assert gpu.memory_bytes == 80 * 2**30 and isinstance(gpu, GpuSpec)
    link = LinkSpec(name="l", bandwidth_bytes_per_s=1e9, latency_s=0)
    with pytest.raises(SpecError, match="nodes must list at least one node"):
        ClusterSpec(name="c", nodes=())
    node = NodeSpec(gpu=gpu, gpus=2, intra_link=link, nic=link, nics=1)
    assert ClusterSpec(name="c", nodes=(node,)).num_gpus == 2


def test_importing_planner_does_not_import_torch():
    code = (
        "import sys, pkgutil, importlib, planner, presets\n"
        "for m in pkgutil.walk_packages(planner.__path__, 'planner.'): importlib.import_module(m.name)\n"
        "import cli.main; cli.main.build_app()\n"
        "print(json.dumps('torch' in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) is False


# ---------------------------------------------------------------- usable memory and headroom


def test_capacity_defaults_to_headroom_and_usable_overrides():
    gpu = presets.load_gpu("H100-SXM-80GB")
    assert DEFAULT_MEMORY_HEADROOM == 0.05
    assert gpu.usable_memory_bytes is None
    assert gpu.capacity_bytes == 80 * GIB - math.floor(80 * GIB * 0.05) == 76 * GIB
    assert replace(gpu, usable_memory_bytes=79 * GIB).capacity_bytes == 79 * GIB
    cpu = presets.load_gpu("cpu-worker")
    assert cpu.capacity_bytes == math.ceil(4 * GIB * 0.95)


@pytest.mark.parametrize(
    ("usable", "message"),
    [
        (81 * GIB, "usable_memory_bytes=86973087744 must be <= memory_bytes"),
        (0, "usable_memory_bytes=0 must be a positive integer"),
        (70.5 * GIB, "usable_memory_bytes=75698798592.0 must be a positive integer; write"),
        (True, "usable_memory_bytes=True must be a positive integer"),
    ],
)
def test_usable_memory_is_validated(usable, message):
    with pytest.raises(SpecError, match=message):
        replace(presets.load_gpu("H100-SXM-80GB"), usable_memory_bytes=usable)


def test_with_memory_headroom():
    cluster = presets.load_cluster("dgx-h100", 4)
    tight = cluster.with_memory_headroom(0.1)
    assert tight.num_gpus == 32 and tight.nodes[0] is tight.nodes[3]
    assert all(n.gpu.capacity_bytes == 72 * GIB for n in tight.nodes)
    assert all(n.gpu.memory_bytes == 80 * GIB for n in tight.nodes)
    assert cluster.with_memory_headroom(0).nodes[0].gpu.capacity_bytes == 80 * GIB
    yaml_set = replace(cluster.nodes[0].gpu, usable_memory_bytes=70 * GIB)
    assert yaml_set.with_memory_headroom(0.05).capacity_bytes == 76 * GIB
    for bad in (1, 1.5, -0.1, math.nan, math.inf, True, "0.1"):
        with pytest.raises(SpecError, match=r"memory_headroom=.* must be a fraction in \[0, 1\)"):
            cluster.with_memory_headroom(bad)  # type: ignore[arg-type]


def _mixtral(**moe):
    return ModelSpec(
        name="mixtral-8x7b",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        ffn_hidden=14336,
        vocab=32000,
        max_seq_len=32768,
        mlp="swiglu",
        norm="rmsnorm",
        position="rope",
        bias=False,
        moe={"experts": 8, "top_k": 2, "expert_ffn_hidden": 14336, **moe},
    )


def test_moe_param_count_mixtral_total_and_active():
    # mistralai/Mixtral-8x7B-v0.1: 46.7 B parameters, 12.9 B active per token (Jiang et al. 2024).
    pc = _mixtral().param_count()
    h, f = 4096, 14336
    attn = 2 * h * h + 2 * h * 1024
    block = attn + 2 * h + h * 8 + 8 * 3 * h * f
    assert pc.per_block == block
    assert pc.total == 32 * block + 2 * 32000 * h + h
    assert pc.routed_experts == 32 * 8 * 3 * h * f
    assert pc.active == pc.total - 32 * 6 * 3 * h * f
    assert round(pc.total / 1e9, 1) == 46.7 and round(pc.active / 1e9, 1) == 12.9


def test_moe_dense_first_layers_and_interval():
    dense = replace(_mixtral(), moe=None).param_count().per_block
    pc = _mixtral(dense_layers=2, layer_interval=2).param_count()
    moe_layers = [
        i for i in range(32) if _mixtral(dense_layers=2, layer_interval=2).moe.is_moe_layer(i)
    ]
    assert moe_layers == list(range(3, 32, 2))
    assert pc.blocks == 15 * pc.per_block + 17 * dense


@pytest.mark.parametrize(
    "moe, match",
    [({"top_k": 9}, "top_k=9 must be <= experts=8"), ({"dense_layers": 32}, "dense_layers=32")],
)
def test_moe_fields_are_checked(moe, match):
    with pytest.raises(SpecError, match=match):
        _mixtral(**moe)


def test_training_refuses_other_optimizers():
    with pytest.raises(SpecError, match="training.optimizer='sgd' is not supported; use adam"):
        TrainingSpec(global_batch=8, seq_len=16, optimizer="sgd")
