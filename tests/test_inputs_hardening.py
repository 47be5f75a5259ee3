"""Hostile inputs are refused with one SpecError/FormatError naming the field: cluster and model
YAML (types, unknown keys), model and cluster bounds, profile numbers, profile-vs-cluster
matching, memory headroom, and the examples of docs/cluster-yaml.md."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

import presets
from planner.errors import FormatError, SpecError
from planner.hf import model_from_hf_config
from planner.serialize import from_jsonable, to_jsonable
from planner.specs import (
    MAX_CLUSTER_GPUS,
    ClusterSpec,
    GpuSpec,
    ModelSpec,
    TrainingSpec,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "cluster-yaml.md"
GIB = 2**30
H100_NAME = "NVIDIA H100 80GB HBM3"
H100_BYTES = 81_559 * 2**20  # what NVML reports for an H100 80GB


def _cluster_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return str(path)


def _refused(tmp_path: Path, text: str, nodes: int | None = None) -> str:
    with pytest.raises(SpecError) as info:
        presets.load_cluster(_cluster_file(tmp_path, text), nodes)
    message = str(info.value)
    assert "\n" not in message and "cluster.yaml" in message
    return message


# ---------------------------------------------------------------- 1. cluster and model YAML

NODE_TYPE = (
    "node_types:\n  box:\n    gpu: A100-80GB\n    gpus: 8\n"
    "    intra_link: {bandwidth_gb_per_s: 300, latency_us: 2}\n"
    "    nic: {bandwidth_gb_per_s: 25, latency_us: 5}\n"
)
GPU_TYPE = (
    "gpus:\n  g:\n    memory_gib: 80\n    peak_bf16_tflops: 312\n    peak_fp16_tflops: 312\n"
    "    peak_fp32_tflops: 19.5\n    hbm_gb_per_s: 2039\n"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes:\n  - {type: cpu-2, count: two}\n", r"nodes\[0\]\.count='two' must be an integer"),
        ("nodes:\n  - {type: cpu-2, count: true}\n", r"nodes\[0\]\.count=True must be an integer"),
        ("nodes:\n  - {type: cpu-2, count: 2.0}\n", r"count=2\.0 must be an integer; write 2"),
        ("nodes:\n  - {type: cpu-2, count: -1}\n", r"nodes\[0\]\.count=-1 must be >= 1"),
        ("nodes:\n  - {type: cpu-2, count: 0}\n", r"nodes\[0\]\.count=0 must be >= 1"),
        ("nodes:\n  - {type: cpu-2, switch: yes}\n", r"nodes\[0\]\.switch=True must be an integer"),
        ("nodes:\n  - {type: cpu-2, switch: -1}\n", r"nodes\[0\]\.switch=-1 must be >= 0"),
        ("nodes:\n  - {type: cpu-2, nic_factor: .nan}\n", r"nic_factor=nan must be a finite"),
        ("nodes:\n  - {type: cpu-2, nic_factor: .inf}\n", r"nic_factor=inf must be a finite"),
        ("nodes:\n  - {type: cpu-2, nic_factor: -0.5}\n", r"nic_factor=-0\.5 must be > 0"),
        ("nodes:\n  - {type: cpu-2, nic_factor: 0}\n", r"nic_factor=0 must be > 0"),
        ("nodes:\n  - {type: cpu-2, nic_factor: half}\n", r"nic_factor='half' must be a finite"),
        ("nodes:\n  - {type: 3}\n", r"nodes\[0\]\.type=3 must be a non-empty string"),
        ("nodes:\n  - {count: 2}\n", r"nodes\[0\]: missing required key 'type'"),
        ("nodes:\n  - cpu-2\n", r"nodes\[0\] must be a mapping with keys type, count"),
        ("nodes: []\n", "nodes must be a non-empty list"),
        ("nodes: {type: cpu-2}\n", "nodes must be a non-empty list"),
        ("nodes:\n  - {type: cpu-3}\n", r"nodes\[0\]\.type: unknown cluster node type 'cpu-3'"),
        ("name: 5\nnodes:\n  - {type: cpu-2}\n", "name=5 must be a non-empty string"),
        (
            "node_type: cpu-2\nnodes:\n  - {type: cpu-2}\n",
            "either 'nodes' .* or 'node_type', not both",
        ),
        ("- {type: cpu-2}\n", "must be a mapping with keys name, gpus"),
    ],
)
def test_cluster_values_are_typed(tmp_path, text, message):
    assert re.search(message, _refused(tmp_path, text))


def test_yaml_exponent_without_dot_gets_a_hint(tmp_path):
    text = "nodes:\n  - {type: cpu-2, nic_factor: 1e-1}\n"
    assert "write 1.0e9, not 1e9" in _refused(tmp_path, text)
    text = "nodes:\n  - {type: cpu-2, count: 1e3}\n"
    assert "count='1e3' must be an integer (YAML reads an exponent" in _refused(tmp_path, text)
    text = "nodes:\n  - {type: cpu-2, nic_factor: nan}\n"
    assert _refused(tmp_path, text).endswith("nic_factor='nan' must be a finite number")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # the example: `gpus: 4` in a node entry was silently ignored
        (
            "nodes:\n  - {type: cpu-2, gpus: 4}\n",
            r"nodes\[0\]: unknown key 'gpus'; allowed: type, count, nic_factor, switch",
        ),
        (
            "nodes:\n  - {type: cpu-2, cuont: 4}\n",
            r"unknown key 'cuont' \(did you mean 'count'\?\)",
        ),
        ("nodez:\n  - {type: cpu-2}\n", r"unknown key 'nodez' \(did you mean 'nodes'\?\)"),
        (
            NODE_TYPE + "    nic_count: 8\nnodes:\n  - {type: box}\n",
            r"node_types\.box: unknown key 'nic_count'.*allowed: gpu, gpus, intra_link, nic, nics",
        ),
        (
            NODE_TYPE.replace("latency_us: 2}", "latency: 2}") + "nodes:\n  - {type: box}\n",
            r"node_types\.box\.intra_link: unknown key 'latency' \(did you mean 'latency_us'\?\)",
        ),
        (
            GPU_TYPE + "    memory_gb: 80\nnodes:\n  - {type: cpu-2}\n",
            r"gpus\.g: unknown key 'memory_gb' \(did you mean 'memory_gib'\?\)",
        ),
        (
            "nodes:\n  - {type: cpu-2}\ninter_switch_link: {bandwidth: 5}\n",
            r"inter_switch_link: unknown key 'bandwidth'",
        ),
    ],
)
def test_unknown_keys_are_refused_in_every_mapping(tmp_path, text, message):
    assert re.search(message, _refused(tmp_path, text))


def _gpu_case(old: str, new: str) -> str:
    return (
        GPU_TYPE.replace(old, new)
        + NODE_TYPE.replace("A100-80GB", "g")
        + "nodes:\n  - {type: box}\n"
    )


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("memory_gib: 80", "memory_gib: lots", r"gpus\.g\.memory_gib='lots' must be a finite"),
        ("memory_gib: 80", "memory_gib: .nan", r"gpus\.g\.memory_gib=nan must be a finite"),
        ("memory_gib: 80", "memory_gib: -80", r"gpus\.g\.memory_gib=-80 must be > 0"),
        ("memory_gib: 80", "memory_gib: true", r"gpus\.g\.memory_gib=True must be a finite"),
        (
            "memory_gib: 80",
            "memory_gib: 1" + "0" * 400,
            r"gpus\.g\.memory_gib=10+ must be a finite",
        ),
        ("hbm_gb_per_s: 2039", "hbm_gb_per_s: .inf", r"gpus\.g\.hbm_gb_per_s=inf"),
        ("    peak_fp32_tflops: 19.5\n", "", r"gpus\.g: missing required key 'peak_fp32_tflops'"),
        ("memory_gib: 80", "memory_gib: 80\n    kind: tpu", r"kind='tpu' is not allowed"),
        (
            "memory_gib: 80",
            "memory_gib: 80\n    usable_memory_gib: 81",
            r"gpus\.g\.usable_memory_gib=81 must be <= memory_gib=80",
        ),
    ],
)
def test_gpu_type_values_are_typed(tmp_path, old, new, message):
    assert re.search(message, _refused(tmp_path, _gpu_case(old, new)))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("gpus: 8", "gpus: eight", r"node_types\.box\.gpus='eight' must be an integer"),
        ("gpus: 8", "gpus: 8.0", r"node_types\.box\.gpus=8\.0 must be an integer; write 8"),
        ("gpus: 8", "gpus: 0", r"node_types\.box\.gpus=0 must be >= 1"),
        ("gpus: 8", "gpus: 1025", r"node_types\.box\.gpus=1,025 exceeds the limit of 1,024"),
        ("gpu: A100-80GB", "gpu: A100-80G", r"unknown GPU 'A100-80G' \(did you mean 'A100-80GB'"),
        ("latency_us: 2", "latency_us: -2", r"intra_link\.latency_us=-2 must be >= 0"),
        ("latency_us: 5", "latency_us: .nan", r"nic\.latency_us=nan must be a finite"),
        (
            "bandwidth_gb_per_s: 25",
            "bandwidth_gb_per_s: 0",
            r"nic\.bandwidth_gb_per_s=0 must be > 0",
        ),
        ("bandwidth_gb_per_s: 300", "bandwidth_gb_per_s: fast", r"bandwidth_gb_per_s='fast'"),
    ],
)
def test_node_type_values_are_typed(tmp_path, old, new, message):
    text = NODE_TYPE.replace(old, new) + "nodes:\n  - {type: box}\n"
    assert re.search(message, _refused(tmp_path, text))


def test_defined_but_unused_types_are_checked_too(tmp_path):
    text = NODE_TYPE.replace("gpus: 8", "gpus: x") + "nodes:\n  - {type: cpu-2}\n"
    assert "node_types.box.gpus='x'" in _refused(tmp_path, text)


def test_valid_cluster_file_still_loads(tmp_path):
    text = GPU_TYPE + NODE_TYPE.replace("A100-80GB", "g") + "nodes:\n  - {type: box, count: 2}\n"
    cluster = presets.load_cluster(_cluster_file(tmp_path, text))
    assert cluster.num_gpus == 16 and cluster.nodes[0].gpu.name == "g"
    assert cluster.nodes[0].intra_link.name == "link"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("layer: 2\n", r"unknown model field 'layer' \(did you mean 'layers'\?\)"),
        ("layers: 2.0\n", r"layers=2\.0 must be a positive integer; write 2"),
        ("layers: true\n", r"layers=True must be a positive integer"),
        ("layers: two\n", r"layers='two' must be a positive integer"),
        ("layers: -2\n", r"layers=-2 must be a positive integer"),
        ("tied_embeddings: 'yes'\n", r"tied_embeddings='yes' must be true or false"),
        ("bias: 1\n", r"bias=1 must be true or false"),
        ("family: [gpt]\n", r"family=\['gpt'\] is not allowed"),
        ("name: 7\n", r"name=7 must be a non-empty string"),
        ("mlp: relu\n", r"mlp='relu' is not allowed"),
    ],
)
def test_model_yaml_values_are_typed(tmp_path, body, message):
    base = {"family": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2}
    base.update(ffn_hidden=96, vocab=50, max_seq_len=16)
    lines = {line.split(":")[0] for line in body.splitlines()}
    text = "".join(f"{k}: {v}\n" for k, v in base.items() if k not in lines) + body
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as info:
        presets.load_model(str(path))
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- 2. bounds


def _hf(**kw):
    cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 64,
        "hidden_act": "silu",
    }
    return model_from_hf_config({**cfg, **kw}, "x", "config.json")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"num_hidden_layers": 1_000_000},
            r"config\.json: num_hidden_layers=1,000,000 exceeds the limit of 2,000 "
            r"\(among the largest published models, PaLM-540B has 118 layers; more is almost",
        ),
        ({"hidden_size": 1e9}, r"hidden_size=1000000000\.0 must be a positive integer; write"),
        ({"hidden_size": 4096.0}, r"hidden_size=4096\.0 must be a positive integer; write 4096"),
        ({"hidden_size": 2_000_000}, r"hidden_size=2,000,000 exceeds the limit of 1,000,000"),
        ({"vocab_size": 20_000_000}, r"vocab_size=20,000,000 exceeds the limit of 10,000,000"),
        ({"intermediate_size": 10**8}, r"intermediate_size=100,000,000 exceeds"),
        ({"num_attention_heads": True}, r"num_attention_heads=True must be a positive integer"),
        ({"num_key_value_heads": "8"}, r"num_key_value_heads='8' must be a positive integer"),
        ({"max_position_embeddings": 10**12}, r"max_position_embeddings=.* exceeds the limit"),
        ({"head_dim": 16.0}, r"head_dim=16\.0 must be a positive integer"),
        ({"tie_word_embeddings": "false"}, r"tie_word_embeddings='false' must be true or false"),
        ({"attention_bias": 0}, r"attention_bias=0 must be true or false"),
    ],
)
def test_hf_config_sizes_are_bounded_and_integers(kw, message):
    with pytest.raises(SpecError, match=message):
        _hf(**kw)


def test_hf_nulls_still_mean_defaults():
    m = _hf(attention_bias=None, tie_word_embeddings=None, head_dim=None)
    assert (m.qkv_bias, m.tied_embeddings, m.head_dim) == (False, False, 16)


def test_real_scale_models_are_within_the_bounds():
    assert presets.load_model("llama3-405b").layers == 126
    assert _hf(num_hidden_layers=2_000).layers == 2_000


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("layers", 2_001, r"model 'm'\.layers=2,001 exceeds the limit of 2,000"),
        ("hidden", 1_000_064, r"hidden=1,000,064 exceeds the limit of 1,000,000"),
        ("vocab", 10**7 + 1, r"vocab=10,000,001 exceeds"),
        ("head_dim", 20_000, r"head_dim=20,000 exceeds the limit of 10,000"),
        ("hidden", 4096.0, r"hidden=4096\.0 must be a positive integer; write 4096"),
        ("head_dim", 0.0, r"head_dim=0\.0 must be a positive integer"),
        ("qkv_bias", "no", r"qkv_bias='no' must be true or false"),
        ("name", "", r"model name='' must be a non-empty string"),
    ],
)
def test_model_spec_bounds(field, value, message):
    base = dict(name="m", layers=2, hidden=64, heads=4, kv_heads=4, ffn_hidden=256, vocab=100)
    with pytest.raises(SpecError, match=message):
        ModelSpec(**{**base, "max_seq_len": 32, field: value})


def test_training_bounds():
    with pytest.raises(SpecError, match=r"training\.global_batch=1,000,001 exceeds the limit"):
        TrainingSpec(global_batch=1_000_001, seq_len=16)
    with pytest.raises(SpecError, match=r"training\.seq_len=2,000,000,000 exceeds the limit"):
        TrainingSpec(global_batch=8, seq_len=2_000_000_000)
    with pytest.raises(SpecError, match=r"training\.global_batch=8\.0 must be a positive integer"):
        TrainingSpec(global_batch=8.0, seq_len=16)
    with pytest.raises(SpecError, match=r"training\.flash_attention=1 must be true or false"):
        TrainingSpec(global_batch=8, seq_len=16, flash_attention=1)


def test_cluster_size_is_bounded_before_building(tmp_path):
    limit = f"{MAX_CLUSTER_GPUS:,}"
    with pytest.raises(SpecError, match=f"GPU count=1,600,000 exceeds the limit of {limit}"):
        presets.load_cluster("dgx-h100", 200_000)
    # a billion nodes would take minutes and all memory to build: refused from the count alone
    text = "nodes:\n  - {type: dgx-h100, count: 1000000000}\n"
    assert re.search(
        r"up to nodes\[0\]\): GPU count=8,000,000,000 exceeds", _refused(tmp_path, text)
    )
    text = "nodes:\n  - {type: cpu-2, count: 2}\n  - {type: dgx-h100, count: 125000}\n"
    assert "up to nodes[1]" in _refused(tmp_path, text)
    assert "with --nodes 1000000000" in _refused(tmp_path, "node_type: cpu-8\n", 10**9)
    node = presets.load_node_type("dgx-h100")
    with pytest.raises(SpecError, match="cluster 'big': GPU count=1,000,008 exceeds"):
        ClusterSpec(name="big", nodes=(node,) * 125_001)
    assert ClusterSpec(name="ok", nodes=(node,) * 125_000).num_gpus == MAX_CLUSTER_GPUS


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"bandwidth_bytes_per_s": math.nan}, "bandwidth_bytes_per_s=nan must be a finite"),
        ({"bandwidth_bytes_per_s": math.inf}, "bandwidth_bytes_per_s=inf must be a finite"),
        ({"latency_s": math.nan}, "latency_s=nan must be a finite number >= 0"),
        ({"latency_s": -1e-6}, "latency_s=-1e-06 must be a finite number >= 0"),
    ],
)
def test_link_spec_refuses_non_finite(kw, message):
    from planner.specs import LinkSpec

    with pytest.raises(SpecError, match=message):
        LinkSpec(**{"name": "l", "bandwidth_bytes_per_s": 1e9, "latency_s": 0.0, **kw})


# ---------------------------------------------------------------- 5. usable memory in files


def test_usable_memory_from_yaml_and_json(tmp_path):
    text = _gpu_case("memory_gib: 80", "memory_gib: 80\n    usable_memory_gib: 77.5")
    cluster = presets.load_cluster(_cluster_file(tmp_path, text))
    gpu = cluster.nodes[0].gpu
    assert gpu.capacity_bytes == int(77.5 * GIB)
    assert from_jsonable(GpuSpec, to_jsonable(gpu)) == gpu
    # a GPU without the field serializes as before (plans keep their bytes and hashes)
    plain = to_jsonable(presets.load_gpu("A100-80GB"))
    assert "usable_memory_bytes" not in plain
    assert from_jsonable(GpuSpec, plain) == presets.load_gpu("A100-80GB")


def test_serialize_refuses_non_finite_numbers():
    data = to_jsonable(presets.load_gpu("A100-80GB"))
    with pytest.raises(
        FormatError, match=r"gpu\.peak_bf16_flops: expected a finite number, got nan"
    ):
        from_jsonable(GpuSpec, {**data, "peak_bf16_flops": math.nan}, "gpu")
    with pytest.raises(FormatError, match=r"gpu\.hbm_bytes_per_s: expected a finite number"):
        from_jsonable(GpuSpec, {**data, "hbm_bytes_per_s": 10**400}, "gpu")


# ---------------------------------------------------------------- 6. docs/cluster-yaml.md


def _doc_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_has_the_promised_examples():
    blocks = _doc_blocks()
    assert len(blocks) >= 4
    joined = "\n".join(blocks)
    for key in ("nic_factor", "switch:", "inter_switch_link", "usable_memory_gib", "node_type:"):
        assert key in joined


@pytest.mark.parametrize("index", range(4))
def test_doc_examples_load(tmp_path, index):
    block = _doc_blocks()[index]
    nodes = 4 if "node_type" in yaml.safe_load(block) else None
    cluster = presets.load_cluster(_cluster_file(tmp_path, block), nodes)
    assert cluster.num_gpus > 0


def test_doc_examples_mean_what_the_doc_says(tmp_path):
    mixed, degraded, racks, single = (
        presets.load_cluster(_cluster_file(tmp_path, b), 4 if "node_type:" in b else None)
        for b in _doc_blocks()[:4]
    )
    assert [n.gpu.name for n in mixed.nodes] == ["A100-80GB"] * 2 + ["H100-SXM-80GB-tight"] * 2
    assert mixed.nodes[2].gpu.capacity_bytes == 76 * GIB
    assert len(degraded.nodes) == 16
    assert degraded.nodes[5].nic.bandwidth_bytes_per_s == pytest.approx(12.5e9)
    assert degraded.nodes[4].nic.bandwidth_bytes_per_s == pytest.approx(50e9)
    assert [n.switch for n in racks.nodes] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert racks.link_between(0, 4 * 8).name == "spine"
    assert single.num_gpus == 32 and single.nodes[0].nics == 2


def test_doc_lists_every_key_the_loader_accepts():
    text = DOC.read_text()
    for key in (
        *presets.CLUSTER_KEYS,
        *presets.NODE_ENTRY_KEYS,
        *presets.NODE_TYPE_KEYS,
        *presets.LINK_KEYS,
        *presets.GPU_KEYS,
    ):
        assert f"| `{key}` |" in text, key
