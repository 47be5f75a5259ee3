"""Preset GPUs, node types and models, and the loaders that turn names or files into specs.

Owns: reading presets/*.yaml, user model files (HF config.json or model YAML) and cluster YAML,
and refusing anything in them that is not a known key with a value of the right type.
Every preset cites its source in a comment in its YAML file. The cluster YAML format, every
key with its unit and default, is documented in docs/cluster-yaml.md; in short, either a node
type and `--nodes`, or an explicit node list:

    name: my-cluster
    gpus:                            # optional: new GPU types, same fields as presets/gpus.yaml
      my-gpu: {memory_gib: 80, usable_memory_gib: 76, peak_bf16_tflops: 312, ...}
    node_types:                      # optional: new types, same fields as presets/clusters.yaml
      my-node: {gpu: A100-80GB, gpus: 8, intra_link: {...}, nic: {...}, nics: 8}
    node_type: dgx-a100-80gb         # with --nodes N: N nodes of this type
    nodes:                           # or list them (each entry may repeat with `count`)
      - {type: dgx-a100-80gb, count: 3}
      - {type: dgx-a100-80gb, nic_factor: 0.25}   # a degraded NIC, for what-if planning
      - {type: dgx-h100, count: 4, switch: 1}
    inter_switch_link: {name: spine, bandwidth_gb_per_s: 12.5, latency_us: 10}

Errors name the file and the key path (`cluster.yaml: nodes[0].count='two' must be an
integer`). Integers must be written as integers: 4096.0 is refused where a count is needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from planner.errors import SpecError, did_you_mean
from planner.hf import model_from_fields, model_from_hf_config
from planner.specs import (
    MAX_GPUS_PER_NODE,
    ClusterSpec,
    GpuSpec,
    LinkSpec,
    ModelSpec,
    NodeSpec,
    check_cluster_size,
    int_hint,
    is_number,
)

GIB = 2**30
# Keys of each mapping in the YAML formats; anything else is refused (a typo such as
# `gpus: 4` in a node entry would otherwise be silently ignored).
GPU_KEYS = (
    "memory_gib",
    "usable_memory_gib",
    "peak_bf16_tflops",
    "peak_fp16_tflops",
    "peak_fp32_tflops",
    "hbm_gb_per_s",
    "kind",
    "sm_count",
    "peak_fp8_tflops",
    "arch",
)
LINK_KEYS = ("name", "bandwidth_gb_per_s", "latency_us")
NODE_TYPE_KEYS = ("gpu", "gpus", "intra_link", "nic", "nics")
NODE_ENTRY_KEYS = ("type", "count", "nic_factor", "switch")
CLUSTER_KEYS = ("name", "gpus", "node_types", "node_type", "nodes", "inter_switch_link")


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
    if not isinstance(name, str) or name not in table:
        raise SpecError(
            f"unknown {kind} {name!r}{did_you_mean(str(name), table)}; see `meshplan presets`"
        )
    return table[name]


# --- typed access to one YAML mapping; `where` is "origin: key.path" of the mapping


def _mapping(value: Any, where: str, allowed: Iterable[str]) -> dict[str, Any]:
    """`value` as a mapping whose keys are all in `allowed`; SpecError naming the first other."""
    keys = tuple(allowed)
    if not isinstance(value, dict):
        raise SpecError(f"{where} must be a mapping with keys {', '.join(keys)}")
    for key in value:
        if key not in keys:
            raise SpecError(
                f"{where}: unknown key {key!r}{did_you_mean(str(key), keys)}; "
                f"allowed: {', '.join(keys)}"
            )
    return value


def _dot(where: str, key: str) -> str:
    return f"{where}{key}" if where.endswith(": ") else f"{where}.{key}"


def _get(d: dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key in d:
        return d[key]
    if default is ...:
        raise SpecError(f"{where}: missing required key '{key}'")
    return default


def _str(d: dict[str, Any], key: str, where: str, default: Any = ...) -> str:
    value = _get(d, key, where, default)
    if not isinstance(value, str) or not value:
        raise SpecError(f"{_dot(where, key)}={value!r} must be a non-empty string")
    return value


def _int(d: dict[str, Any], key: str, where: str, default: Any = ..., minimum: int = 1) -> int:
    value = _get(d, key, where, default)
    if isinstance(value, bool) or not isinstance(value, int):
        hint = int_hint(value) or _text_hint(value)
        raise SpecError(f"{_dot(where, key)}={value!r} must be an integer{hint}")
    if value < minimum:
        raise SpecError(f"{_dot(where, key)}={value} must be >= {minimum}")
    return value


def _number(
    d: dict[str, Any], key: str, where: str, default: Any = ..., zero_ok: bool = False
) -> float:
    value = _get(d, key, where, default)
    if not is_number(value):
        raise SpecError(f"{_dot(where, key)}={value!r} must be a finite number{_text_hint(value)}")
    if value < 0 or (value == 0 and not zero_ok):
        raise SpecError(f"{_dot(where, key)}={value!r} must be {'>= 0' if zero_ok else '> 0'}")
    return float(value)


def _text_hint(value: Any) -> str:
    """PyYAML (YAML 1.1) reads `1e9` as a string; only `1.0e9` or `1.0e+9` is a float."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+", value):
        return " (YAML reads an exponent without a dot as text: write 1.0e9, not 1e9)"
    return ""


# --- GPUs, links and node types


def gpu_from_fields(name: str, d: Any, origin: str) -> GpuSpec:
    """A GpuSpec from a presets/gpus.yaml-style mapping; `origin` is "file: path.to.gpu"."""
    d = _mapping(d, origin, GPU_KEYS)
    memory = _number(d, "memory_gib", origin) * GIB
    usable = _get(d, "usable_memory_gib", origin, None)
    if usable is not None:
        usable = _number(d, "usable_memory_gib", origin) * GIB
        if usable > memory:
            raise SpecError(
                f"{_dot(origin, 'usable_memory_gib')}={d['usable_memory_gib']!r} must be <= "
                f"memory_gib={d['memory_gib']!r}"
            )
    kind = _str(d, "kind", origin, "gpu")
    fp8 = None if _get(d, "peak_fp8_tflops", origin, None) is None else _number(d, "peak_fp8_tflops", origin)
    try:
        return GpuSpec(
            name=name,
            memory_bytes=int(memory),
            usable_memory_bytes=None if usable is None else int(usable),
            peak_bf16_flops=float(round(_number(d, "peak_bf16_tflops", origin) * 1e12)),
            peak_fp16_flops=float(round(_number(d, "peak_fp16_tflops", origin) * 1e12)),
            peak_fp32_flops=float(round(_number(d, "peak_fp32_tflops", origin) * 1e12)),
            hbm_bytes_per_s=float(round(_number(d, "hbm_gb_per_s", origin) * 1e9)),
            kind=kind,  # type: ignore[arg-type]
            sm_count=_get(d, "sm_count", origin, None),
            arch=_get(d, "arch", origin, None),
            peak_fp8_flops=None if fp8 is None else float(round(fp8 * 1e12)),
        )
    except SpecError as e:
        raise SpecError(f"{origin}: {e}") from None


def load_gpu(name: str) -> GpuSpec:
    table = _preset_file("gpus.yaml")
    return gpu_from_fields(name, _lookup("GPU", table, name), f"presets/gpus.yaml: {name}")


def link_from_fields(d: Any, origin: str) -> LinkSpec:
    """A LinkSpec from {name, bandwidth_gb_per_s, latency_us}; `origin` names the mapping."""
    d = _mapping(d, origin, LINK_KEYS)
    return LinkSpec(
        name=_str(d, "name", origin, "link"),
        bandwidth_bytes_per_s=float(round(_number(d, "bandwidth_gb_per_s", origin) * 1e9)),
        latency_s=_number(d, "latency_us", origin, 0.0, zero_ok=True) / 1e6,
    )


def _node_from_type(d: Any, origin: str, gpus: dict[str, GpuSpec]) -> NodeSpec:
    """A NodeSpec from a node-type mapping; `gpus` are the GPU types the file defines."""
    d = _mapping(d, origin, NODE_TYPE_KEYS)
    gpu = _str(d, "gpu", origin)
    count = _int(d, "gpus", origin)
    if count > MAX_GPUS_PER_NODE:
        raise SpecError(
            f"{_dot(origin, 'gpus')}={count:,} exceeds the limit of {MAX_GPUS_PER_NODE:,} "
            "GPUs per node (one intra-node link class; an NVL72 rack has 72)"
        )
    if gpu not in gpus and gpu not in _preset_file("gpus.yaml"):
        raise SpecError(
            f"{_dot(origin, 'gpu')}: unknown GPU {gpu!r}"
            f"{did_you_mean(gpu, [*gpus, *gpu_names()])}; define it under 'gpus' or see "
            "`meshplan presets gpus`"
        )
    return NodeSpec(
        gpu=gpus[gpu] if gpu in gpus else load_gpu(gpu),
        gpus=count,
        intra_link=link_from_fields(_get(d, "intra_link", origin), _dot(origin, "intra_link")),
        nic=link_from_fields(_get(d, "nic", origin), _dot(origin, "nic")),
        nics=_int(d, "nics", origin, 1),
    )


def load_node_type(name: str) -> NodeSpec:
    d = _lookup("cluster node type", _preset_file("clusters.yaml"), name)
    return _node_from_type(d, f"presets/clusters.yaml: {name}", {})


# --- cluster files


def _named_table(data: dict[str, Any], key: str, origin: str) -> dict[str, Any]:
    table = data.get(key) or {}
    if not isinstance(table, dict):
        raise SpecError(f"{origin}: {key} must be a mapping of names to definitions")
    for name in table:
        if not isinstance(name, str):
            raise SpecError(f"{origin}: {key} name {name!r} must be a string")
    return table


def _node_entries(
    entries: Any, origin: str, types: dict[str, Any], node: Any
) -> list[tuple[NodeSpec, int]]:
    """(node, count) per entry of a `nodes:` list, checked before any node is repeated."""
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{origin}: nodes must be a non-empty list of {{type: ...}} entries")
    out: list[tuple[NodeSpec, int]] = []
    total = 0
    for i, entry in enumerate(entries):
        where = f"{origin}: nodes[{i}]"
        entry = _mapping(entry, where, NODE_ENTRY_KEYS)
        base = node(_lookup_type(types, _str(entry, "type", where), where))
        factor = _number(entry, "nic_factor", where, 1.0)
        count = _int(entry, "count", where, 1)
        total += count * base.gpus
        check_cluster_size(f"{origin} (up to nodes[{i}])", total)
        out.append(
            (
                NodeSpec(
                    gpu=base.gpu,
                    gpus=base.gpus,
                    intra_link=base.intra_link,
                    nic=base.nic.scaled(factor) if factor != 1.0 else base.nic,
                    nics=base.nics,
                    switch=_int(entry, "switch", where, 0, minimum=0),
                ),
                count,
            )
        )
    return out


def _lookup_type(types: dict[str, Any], name: str, where: str) -> str:
    if name not in types:
        raise SpecError(
            f"{where}.type: unknown cluster node type {name!r}{did_you_mean(name, types)}; "
            "define it under 'node_types' or see `meshplan presets`"
        )
    return name


def cluster_from_dict(data: Any, origin: str, nodes: int | None) -> ClusterSpec:
    """Build a ClusterSpec from a cluster YAML document (docs/cluster-yaml.md)."""
    data = _mapping(data, origin, CLUSTER_KEYS)
    root = f"{origin}: "
    gpus = {
        name: gpu_from_fields(name, d, f"{origin}: gpus.{name}")
        for name, d in _named_table(data, "gpus", origin).items()
    }
    own = _named_table(data, "node_types", origin)
    built_types: dict[str, NodeSpec] = {}
    for name, d in own.items():
        built_types[name] = _node_from_type(d, f"{origin}: node_types.{name}", gpus)
    types = {**{n: None for n in node_type_names()}, **built_types}

    def node(type_name: str) -> NodeSpec:
        return built_types.get(type_name) or load_node_type(type_name)

    if "nodes" in data and "node_type" in data:
        raise SpecError(f"{origin}: give either 'nodes' (a list) or 'node_type', not both")
    if "nodes" in data:
        entries = _node_entries(data["nodes"], origin, types, node)
        built = tuple(n for n, count in entries for _ in range(count))
        if nodes is not None and nodes != len(built):
            raise SpecError(
                f"--nodes {nodes} disagrees with {origin}, which lists {len(built)} nodes"
            )
    elif "node_type" in data:
        one = node(_lookup_type(types, _str(data, "node_type", root), f"{origin}: node_type"))
        if nodes is None:
            raise SpecError(f"{origin} gives a node_type; say how many with --nodes N")
        check_cluster_size(f"{origin} with --nodes {nodes}", nodes * one.gpus)
        built = (one,) * nodes
    else:
        raise SpecError(f"{origin}: give either 'nodes' (a list) or 'node_type' with --nodes")
    isl = data.get("inter_switch_link")
    return ClusterSpec(
        name=_str(data, "name", root, Path(origin).stem),
        nodes=built,
        inter_switch_link=None
        if isl is None
        else link_from_fields(isl, f"{origin}: inter_switch_link"),
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
    check_cluster_size(f"--cluster {name_or_path} --nodes {n}", n * node.gpus)
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
            except ValueError as e:
                # JSONDecodeError, or the int-digits limit (ValueError) on absurd numbers
                msg = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else e
                raise SpecError(f"{path}: malformed JSON ({msg})") from None
            return model_from_hf_config(cfg, name or "model", str(path))
        data = _read_yaml_text(text, str(path))
        if not isinstance(data, dict):
            raise SpecError(f"{path}: a model file must be a mapping of model fields")
        model_name = data.pop("name", name)
        if not isinstance(model_name, str) or not model_name:
            raise SpecError(f"{path}: name={model_name!r} must be a non-empty string")
        return model_from_fields(model_name, data, str(path))
    fields = _lookup("model", _preset_file("models.yaml"), name_or_path)
    return model_from_fields(name_or_path, fields, f"presets/models.yaml:{name_or_path}")
