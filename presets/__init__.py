"""Preset GPUs, node types and models, and the loaders that turn names or files into specs.

Owns: reading presets/*.yaml, user model files (HF config.json or model YAML) and cluster YAML.
Every preset cites its source in a comment in its YAML file.

Cluster YAML (user files) — either a node type and `--nodes`, or an explicit node list:

    name: my-cluster
    node_types:                      # optional: new types, same fields as presets/clusters.yaml
      my-node: {gpu: A100-80GB, gpus: 8, intra_link: {...}, nic: {...}, nics: 8}
    node_type: dgx-a100-80gb         # with --nodes N: N nodes of this type
    nodes:                           # or list them (each entry may repeat with `count`)
      - {type: dgx-a100-80gb, count: 3}
      - {type: dgx-a100-80gb, nic_factor: 0.25}   # a degraded NIC, for what-if planning
      - {type: dgx-h100, count: 4, switch: 1}
    inter_switch_link: {name: spine, bandwidth_gb_per_s: 12.5, latency_us: 10}
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from planner.errors import SpecError, did_you_mean
from planner.hf import model_from_fields, model_from_hf_config
from planner.specs import ClusterSpec, GpuSpec, LinkSpec, ModelSpec, NodeSpec

GIB = 2**30


def _read_yaml_text(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{origin}: malformed YAML{where}") from None


@cache
def _preset_file(name: str) -> dict[str, Any]:
    text = resources.files(__name__).joinpath(name).read_text()
    data = _read_yaml_text(text, f"presets/{name}")
    assert isinstance(data, dict)
    return data


def gpu_names() -> list[str]:
    return list(_preset_file("gpus.yaml"))


def node_type_names() -> list[str]:
    return list(_preset_file("clusters.yaml"))


def model_names() -> list[str]:
    return list(_preset_file("models.yaml"))


def _lookup(kind: str, table: dict[str, Any], name: str) -> Any:
    if name not in table:
        raise SpecError(
            f"unknown {kind} '{name}'{did_you_mean(name, table)}; see `meshplan presets`"
        )
    return table[name]


def _require(data: dict[str, Any], key: str, origin: str) -> Any:
    if key not in data:
        raise SpecError(f"{origin}: missing required field '{key}'")
    return data[key]


def gpu_from_fields(name: str, d: dict[str, Any], origin: str) -> GpuSpec:
    if not isinstance(d, dict):
        raise SpecError(f"{origin}: gpu '{name}' must be a mapping")
    return GpuSpec(
        name=name,
        memory_bytes=int(float(_require(d, "memory_gib", origin)) * GIB),
        peak_bf16_flops=float(round(float(_require(d, "peak_bf16_tflops", origin)) * 1e12)),
        peak_fp16_flops=float(round(float(_require(d, "peak_fp16_tflops", origin)) * 1e12)),
        peak_fp32_flops=float(round(float(_require(d, "peak_fp32_tflops", origin)) * 1e12)),
        hbm_bytes_per_s=float(round(float(_require(d, "hbm_gb_per_s", origin)) * 1e9)),
        kind=d.get("kind", "gpu"),
    )


def load_gpu(name: str) -> GpuSpec:
    return gpu_from_fields(
        name, _lookup("GPU", _preset_file("gpus.yaml"), name), "presets/gpus.yaml"
    )


def link_from_fields(d: Any, origin: str) -> LinkSpec:
    if not isinstance(d, dict):
        raise SpecError(
            f"{origin}: a link must be a mapping with bandwidth_gb_per_s and latency_us"
        )
    return LinkSpec(
        name=str(d.get("name", "link")),
        bandwidth_bytes_per_s=float(round(float(_require(d, "bandwidth_gb_per_s", origin)) * 1e9)),
        latency_s=float(d.get("latency_us", 0.0)) / 1e6,
    )


def _node_from_type(d: dict[str, Any], origin: str, gpus: dict[str, Any]) -> NodeSpec:
    gpu = _require(d, "gpu", origin)
    gpu_spec = gpu_from_fields(gpu, gpus[gpu], origin) if gpu in gpus else load_gpu(gpu)
    return NodeSpec(
        gpu=gpu_spec,
        gpus=int(_require(d, "gpus", origin)),
        intra_link=link_from_fields(_require(d, "intra_link", origin), f"{origin}.intra_link"),
        nic=link_from_fields(_require(d, "nic", origin), f"{origin}.nic"),
        nics=int(d.get("nics", 1)),
    )


def load_node_type(name: str) -> NodeSpec:
    d = _lookup("cluster node type", _preset_file("clusters.yaml"), name)
    return _node_from_type(d, f"presets/clusters.yaml:{name}", {})


def cluster_from_dict(data: Any, origin: str, nodes: int | None) -> ClusterSpec:
    """Build a ClusterSpec from a cluster YAML document (see the module docstring)."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a cluster file must be a mapping")
    allowed = {"name", "node_types", "gpus", "node_type", "nodes", "inter_switch_link"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(
            f"{origin}: unknown field '{unknown[0]}'{did_you_mean(unknown[0], allowed)}"
        )
    gpus = data.get("gpus", {}) or {}
    types = {**_preset_file("clusters.yaml"), **(data.get("node_types") or {})}

    def node(type_name: str, where: str) -> NodeSpec:
        return _node_from_type(_lookup("cluster node type", types, type_name), where, gpus)

    built: list[NodeSpec] = []
    if "nodes" in data and isinstance(data["nodes"], list):
        for i, entry in enumerate(data["nodes"]):
            where = f"{origin}: nodes[{i}]"
            if not isinstance(entry, dict) or "type" not in entry:
                raise SpecError(f"{where} must be a mapping with a 'type'")
            base = node(entry["type"], where)
            factor = float(entry.get("nic_factor", 1.0))
            nic = base.nic.scaled(factor) if factor != 1.0 else base.nic
            count = int(entry.get("count", 1))
            if count < 1:
                raise SpecError(f"{where}.count={count} must be >= 1")
            for _ in range(count):
                built.append(
                    NodeSpec(
                        gpu=base.gpu,
                        gpus=base.gpus,
                        intra_link=base.intra_link,
                        nic=nic,
                        nics=base.nics,
                        switch=int(entry.get("switch", 0)),
                    )
                )
        if nodes is not None and nodes != len(built):
            raise SpecError(
                f"--nodes {nodes} disagrees with {origin}, which lists {len(built)} nodes"
            )
    elif "node_type" in data:
        if nodes is None:
            raise SpecError(f"{origin} gives a node_type; say how many with --nodes N")
        built = [node(str(data["node_type"]), origin)] * nodes
    else:
        raise SpecError(f"{origin}: give either 'nodes' (a list) or 'node_type' with --nodes")
    isl = data.get("inter_switch_link")
    return ClusterSpec(
        name=str(data.get("name", Path(origin).stem)),
        nodes=tuple(built),
        inter_switch_link=link_from_fields(isl, f"{origin}.inter_switch_link") if isl else None,
    )


def load_cluster(name_or_path: str, nodes: int | None = None) -> ClusterSpec:
    """A node-type preset with `nodes` (default 1), or a cluster YAML file."""
    if nodes is not None and nodes < 1:
        raise SpecError(f"--nodes={nodes} must be >= 1")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise SpecError(f"cluster file not found: {path}")
        return cluster_from_dict(_read_yaml_text(path.read_text(), str(path)), str(path), nodes)
    node = load_node_type(name_or_path)
    n = nodes or 1
    return ClusterSpec(name=f"{name_or_path}x{n}", nodes=(node,) * n)


def load_model(name_or_path: str) -> ModelSpec:
    """A model preset name, a Hugging Face config.json, or a model YAML of ModelSpec fields."""
    path = Path(name_or_path)
    if path.suffix in (".json", ".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SpecError(f"model file not found: {path}")
        text = path.read_text()
        name = path.parent.name if path.name == "config.json" else path.stem
        if path.suffix == ".json":
            try:
                cfg = json.loads(text)
            except json.JSONDecodeError as e:
                raise SpecError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
            return model_from_hf_config(cfg, name or "model", str(path))
        data = _read_yaml_text(text, str(path))
        if not isinstance(data, dict):
            raise SpecError(f"{path}: a model file must be a mapping of model fields")
        return model_from_fields(str(data.pop("name", name)), data, str(path))
    fields = _lookup("model", _preset_file("models.yaml"), name_or_path)
    return model_from_fields(name_or_path, fields, f"presets/models.yaml:{name_or_path}")
