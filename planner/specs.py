"""The specs every other part of meshplan speaks: model, GPU, cluster and training.

Owns: the frozen, validated GPU, link, node, cluster and training specs, and the one place every
spec is imported from: the model spec (and its exact parameter count) lives in
planner/model_spec.py, the field bounds, enums and checks in planner/spec_rules.py, both
re-exported here. Does not own: loading presets (presets/), reading Hugging Face files
(planner/hf.py), costs (planner/cost/).

Units are in field names (`_bytes`, `_s`, `_flops`, `_bytes_per_s`). Every spec validates on
construction and raises `SpecError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field, replace
from functools import cached_property

from planner.errors import SpecError
from planner.model_spec import (
    MlaSpec,
    ModelSpec,
    MoeSpec,
    ParamCount,
)
from planner.spec_rules import (
    DEFAULT_MEMORY_HEADROOM,
    MAX_CLUSTER_GPUS,
    MAX_GLOBAL_BATCH,
    MAX_GPUS_PER_NODE,
    MODEL_LIMITS,
    Activation,
    DeviceKind,
    Dtype,
    MlpKind,
    NormKind,
    PositionKind,
    bytes_after_headroom,
    check_at_most,
    check_bools,
    check_cluster_size,
    check_headroom,
    check_model_limit,
    check_positive,
    check_positive_int,
    enum_field,
    int_hint,
    is_number,
)

# The model spec and the field rules live in their own modules; every spec is importable from
# here, as it always was.
__all__ = [
    "Activation",
    "ClusterSpec",
    "DEFAULT_MEMORY_HEADROOM",
    "DeviceKind",
    "Dtype",
    "GpuSpec",
    "LinkSpec",
    "MAX_CLUSTER_GPUS",
    "MAX_GLOBAL_BATCH",
    "MAX_GPUS_PER_NODE",
    "MODEL_LIMITS",
    "MlaSpec",
    "MlpKind",
    "ModelSpec",
    "MoeSpec",
    "NodeSpec",
    "NormKind",
    "ParamCount",
    "PositionKind",
    "TrainingSpec",
    "bytes_after_headroom",
    "check_at_most",
    "check_bools",
    "check_cluster_size",
    "check_headroom",
    "check_model_limit",
    "check_positive",
    "check_positive_int",
    "enum_field",
    "int_hint",
    "is_number",
]


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """One accelerator (or one CPU worker process, kind=cpu). Peaks are dense datasheet figures.

    `memory_bytes` is the nominal size; `usable_memory_bytes`, when given, is what plans may
    fill (a measured figure, say); `capacity_bytes` is the one the cost model plans against.
    """

    name: str
    memory_bytes: int
    peak_bf16_flops: float
    peak_fp16_flops: float
    peak_fp32_flops: float
    hbm_bytes_per_s: float
    kind: DeviceKind = DeviceKind.GPU
    # Omitted from JSON when None, so plans of GPUs without it keep their bytes (and hashes).
    usable_memory_bytes: int | None = field(default=None, metadata={"json_omit_none": True})
    # Streaming multiprocessors (compute units): the GEMM model's wave quantisation
    # (planner/cost/kernels.py). None: one (a CPU worker, or a GPU whose count is not given).
    sm_count: int | None = field(default=None, metadata={"json_omit_none": True})
    # Dense FP8 tensor-core peak; None: the device has no FP8 GEMMs (A100).
    peak_fp8_flops: float | None = field(default=None, metadata={"json_omit_none": True})
    # Microarchitecture (ampere, hopper, ...): the analytic kernel constants are fitted per
    # architecture where calibration data has it (planner/cost/kernels.py).
    arch: str | None = field(default=None, metadata={"json_omit_none": True})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"gpu name={self.name!r} must be a non-empty string")
        owner = f"gpu '{self.name}'"
        check_positive_int(owner, memory_bytes=self.memory_bytes)
        check_positive(
            owner,
            peak_bf16_flops=self.peak_bf16_flops,
            peak_fp16_flops=self.peak_fp16_flops,
            peak_fp32_flops=self.peak_fp32_flops,
            hbm_bytes_per_s=self.hbm_bytes_per_s,
        )
        object.__setattr__(self, "kind", enum_field(DeviceKind, f"{owner}.kind", self.kind))
        if self.sm_count is not None:
            check_positive_int(owner, sm_count=self.sm_count)
        if self.peak_fp8_flops is not None:
            check_positive(owner, peak_fp8_flops=self.peak_fp8_flops)
        usable = self.usable_memory_bytes
        if usable is not None:
            check_positive_int(owner, usable_memory_bytes=usable)
            if usable > self.memory_bytes:
                raise SpecError(f"{owner}.usable_memory_bytes={usable} must be <= memory_bytes")

    @property
    def capacity_bytes(self) -> int:
        """Bytes a plan may fill: usable_memory_bytes when set, else memory_bytes less
        DEFAULT_MEMORY_HEADROOM (5 %)."""
        if self.usable_memory_bytes is not None:
            return self.usable_memory_bytes
        return bytes_after_headroom(self.memory_bytes, DEFAULT_MEMORY_HEADROOM)

    def with_memory_headroom(self, fraction: float) -> GpuSpec:
        """This GPU planning against memory_bytes * (1 - fraction); replaces any
        usable_memory_bytes. `fraction` must be in [0, 1)."""
        usable = bytes_after_headroom(self.memory_bytes, check_headroom(fraction))
        return replace(self, usable_memory_bytes=usable)

    def peak_flops(self, dtype: Dtype) -> float:
        if dtype is Dtype.FP8:
            if self.peak_fp8_flops is None:
                raise SpecError(f"gpu '{self.name}' has no FP8 peak (peak_fp8_tflops); use bf16")
            return self.peak_fp8_flops
        return {
            Dtype.BF16: self.peak_bf16_flops,
            Dtype.FP16: self.peak_fp16_flops,
            Dtype.FP32: self.peak_fp32_flops,
        }[dtype]


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """A link class: attained point-to-point bandwidth (one direction) and latency."""

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float

    def __post_init__(self) -> None:
        owner = f"link '{self.name}'"
        check_positive(owner, bandwidth_bytes_per_s=self.bandwidth_bytes_per_s)
        if not is_number(self.latency_s) or self.latency_s < 0:
            raise SpecError(f"{owner}.latency_s={self.latency_s!r} must be a finite number >= 0")

    def scaled(self, factor: float) -> LinkSpec:
        """This link at `factor` of its bandwidth (a degraded NIC or cable, for what-if planning)."""
        check_positive(f"link '{self.name}'", factor=factor)
        return replace(
            self,
            name=f"{self.name}@{factor:g}",
            bandwidth_bytes_per_s=self.bandwidth_bytes_per_s * factor,
        )


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """One server: `gpus` devices of one type, an intra-node link class and its NICs.

    `nic` is one NIC's link class and `nics` how many the node has; GPUs of the node that cross
    the network at once share them. `switch` groups nodes under one leaf switch.
    """

    gpu: GpuSpec
    gpus: int
    intra_link: LinkSpec
    nic: LinkSpec
    nics: int
    switch: int = 0

    def __post_init__(self) -> None:
        check_positive_int("node", gpus=self.gpus, nics=self.nics)
        why = "one intra-node link class; an NVL72 rack has 72 GPUs in one NVLink domain"
        check_at_most("node.gpus", self.gpus, MAX_GPUS_PER_NODE, why)
        if isinstance(self.switch, bool) or not isinstance(self.switch, int) or self.switch < 0:
            raise SpecError(f"node.switch={self.switch!r} must be an integer >= 0")

    @property
    def network_bytes_per_s(self) -> float:
        return self.nic.bandwidth_bytes_per_s * self.nics


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Nodes (mixed GPU types allowed) and how switches connect them.

    GPU ids are global and dense: node i's local GPU j has id sum(gpus of nodes < i) + j.
    `inter_switch_link`, when given, caps traffic between nodes on different switches.
    """

    name: str
    nodes: tuple[NodeSpec, ...]
    inter_switch_link: LinkSpec | None = None

    def __post_init__(self) -> None:
        if not self.nodes:
            raise SpecError(f"cluster '{self.name}': nodes must list at least one node")
        object.__setattr__(self, "nodes", tuple(self.nodes))
        check_cluster_size(f"cluster '{self.name}'", self.num_gpus)

    def with_memory_headroom(self, fraction: float) -> ClusterSpec:
        """This cluster with every GPU planning against memory_bytes * (1 - fraction)
        (`GpuSpec.with_memory_headroom`; replaces usable_memory_bytes set in YAML)."""
        check_headroom(fraction)
        changed: dict[NodeSpec, NodeSpec] = {}
        for node in self.nodes:
            if node not in changed:
                changed[node] = replace(node, gpu=node.gpu.with_memory_headroom(fraction))
        return replace(self, nodes=tuple(changed[n] for n in self.nodes))

    # Derived from `nodes` once per instance (cached_property writes the instance __dict__,
    # not a field, so frozen-ness, equality and JSON are untouched): the cost model asks for
    # these per candidate, and summing 100,000 nodes each time made planning O(nodes^2).
    @cached_property
    def node_starts(self) -> tuple[int, ...]:
        """The global id of each node's first GPU, then the GPU count."""
        return tuple(itertools.accumulate((n.gpus for n in self.nodes), initial=0))

    @cached_property
    def num_gpus(self) -> int:
        return self.node_starts[-1]

    @property
    def uniform_gpus_per_node(self) -> int | None:
        counts = {n.gpus for n in self.nodes}
        return counts.pop() if len(counts) == 1 else None

    def gpu_location(self, gpu_id: int) -> tuple[int, int]:
        """(node index, local index) of a global GPU id."""
        if not 0 <= gpu_id < self.num_gpus:
            raise SpecError(
                f"gpu id {gpu_id} is outside 0..{self.num_gpus - 1} of cluster '{self.name}'"
            )
        node = bisect.bisect_right(self.node_starts, gpu_id) - 1
        return node, gpu_id - self.node_starts[node]

    def gpu_ids_of_node(self, node_index: int) -> range:
        start = self.node_starts[node_index]
        return range(start, start + self.nodes[node_index].gpus)

    def gpu_of(self, gpu_id: int) -> GpuSpec:
        return self.nodes[self.gpu_location(gpu_id)[0]].gpu

    def link_between(self, gpu_a: int, gpu_b: int) -> LinkSpec:
        """The link class two GPUs talk over without a measured profile."""
        node_a, _ = self.gpu_location(gpu_a)
        node_b, _ = self.gpu_location(gpu_b)
        if node_a == node_b:
            return self.nodes[node_a].intra_link
        a, b = self.nodes[node_a], self.nodes[node_b]
        slower = a.nic if a.nic.bandwidth_bytes_per_s <= b.nic.bandwidth_bytes_per_s else b.nic
        isl = self.inter_switch_link
        if (
            a.switch != b.switch
            and isl is not None
            and isl.bandwidth_bytes_per_s < slower.bandwidth_bytes_per_s
        ):
            slower = isl
        return slower


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    """What one optimizer step processes: `global_batch` sequences of `seq_len` tokens.

    Mixed precision keeps fp32 master weights and two fp32 Adam moments (Rajbhandari et al.
    2020, ZeRO Sec. 3.1: 16 bytes per parameter with bf16/fp16 weights and grads);
    `grad_dtype` is the dtype gradients are accumulated and reduced in. `fp8_linears` runs the
    transformer blocks' linears in FP8 with dynamic tensor-wise scaling (torchao float8
    training, Transformer Engine's delayed-scaling recipe is priced alike), bf16 elsewhere.
    """

    global_batch: int
    seq_len: int
    dtype: Dtype = Dtype.BF16
    grad_dtype: Dtype = Dtype.FP32
    optimizer: str = "adam"
    flash_attention: bool = True
    fp8_linears: bool = field(default=False, metadata={"json_omit_default": True})

    def __post_init__(self) -> None:
        check_positive_int("training", global_batch=self.global_batch, seq_len=self.seq_len)
        why = "sequences per step; the largest published batches are ~15,000 (DeepSeek-V3)"
        check_at_most("training.global_batch", self.global_batch, MAX_GLOBAL_BATCH, why)
        check_model_limit("training.seq_len", "max_seq_len", self.seq_len)
        check_bools("training", flash_attention=self.flash_attention)
        object.__setattr__(self, "dtype", enum_field(Dtype, "training.dtype", self.dtype))
        object.__setattr__(
            self, "grad_dtype", enum_field(Dtype, "training.grad_dtype", self.grad_dtype)
        )
        check_bools("training", fp8_linears=self.fp8_linears)
        if Dtype.FP8 in (self.dtype, self.grad_dtype):
            raise SpecError(
                "training.dtype/grad_dtype=fp8 is not allowed: FP8 applies to the linears only; "
                "set fp8_linears=true with dtype=bf16 (the CLI's --dtype fp8 does)"
            )
        if self.fp8_linears and self.dtype is not Dtype.BF16:
            raise SpecError(f"training.fp8_linears needs dtype=bf16 (got {self.dtype.value})")
        if self.optimizer != "adam":
            raise SpecError(f"training.optimizer={self.optimizer!r} is not supported; use adam")

    @property
    def gemm_dtype(self) -> Dtype:
        """The input type of the blocks' linear GEMMs."""
        return Dtype.FP8 if self.fp8_linears else self.dtype

    def check_model(self, model: ModelSpec) -> None:
        if self.seq_len > model.max_seq_len:
            raise SpecError(
                f"training.seq_len={self.seq_len} exceeds model '{model.name}' max_seq_len={model.max_seq_len}"
            )
