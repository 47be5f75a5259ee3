"""The specs every other part of meshplan speaks: model, GPU, cluster and training.

Owns: the frozen, validated dataclasses and the exact parameter count of a model.
Does not own: loading presets (presets/), reading Hugging Face files (planner/hf.py),
costs (planner/cost/).

Units are in field names (`_bytes`, `_s`, `_flops`, `_bytes_per_s`). Every spec validates on
construction and raises `SpecError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from planner.errors import SpecError


class MlpKind(str, Enum):
    """`gelu`: 2-matrix MLP (GPT); `swiglu`: gated 3-matrix MLP (Llama)."""

    GELU = "gelu"
    SWIGLU = "swiglu"


class NormKind(str, Enum):
    """`layernorm` has weight and bias; `rmsnorm` has a weight only."""

    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"


class PositionKind(str, Enum):
    """`learned`: a (max_seq_len x hidden) table (GPT); `rope`: rotary, no parameters (Llama)."""

    LEARNED = "learned"
    ROPE = "rope"


class Dtype(str, Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def nbytes(self) -> int:
        return 4 if self is Dtype.FP32 else 2


class DeviceKind(str, Enum):
    """`cpu` lets a host's CPU processes be planned for and tested end to end without a GPU."""

    GPU = "gpu"
    CPU = "cpu"


def _enum(cls: type[Enum], field_name: str, value: object) -> Enum:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        allowed = "|".join(str(m.value) for m in cls)
        raise SpecError(f"{field_name}={value!r} is not allowed; use one of {allowed}") from None


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SpecError(f"{owner}.{name}={value!r} must be a positive number")


def _positive_int(owner: str, **values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SpecError(f"{owner}.{name}={value!r} must be a positive integer")


@dataclass(frozen=True, kw_only=True)
class ParamCount:
    """Exact parameter counts of a ModelSpec, by part (numbers of elements, not bytes)."""

    embedding: int
    position: int
    per_block: int
    blocks: int
    final_norm: int
    head: int

    @property
    def total(self) -> int:
        return self.embedding + self.position + self.blocks + self.final_norm + self.head


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A decoder-only transformer (GPT or Llama family).

    `head_dim` defaults to hidden // heads (0 means "derive"); Llama-3-style models that set
    `head_dim` explicitly keep theirs. `bias` is True for GPT-2/3 (biases on every linear),
    False for Llama; `qkv_bias` adds biases to the q/k/v projections only (Qwen2). `tp_shard(tp)` gives the shapes one tensor-parallel rank holds.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    max_seq_len: int
    head_dim: int = 0
    tied_embeddings: bool = False
    mlp: MlpKind = MlpKind.GELU
    norm: NormKind = NormKind.LAYERNORM
    position: PositionKind = PositionKind.LEARNED
    bias: bool = True
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        owner = f"model '{self.name}'"
        _positive_int(
            owner,
            layers=self.layers,
            hidden=self.hidden,
            heads=self.heads,
            kv_heads=self.kv_heads,
            ffn_hidden=self.ffn_hidden,
            vocab=self.vocab,
            max_seq_len=self.max_seq_len,
        )
        object.__setattr__(self, "mlp", _enum(MlpKind, f"{owner}.mlp", self.mlp))
        object.__setattr__(self, "norm", _enum(NormKind, f"{owner}.norm", self.norm))
        object.__setattr__(
            self, "position", _enum(PositionKind, f"{owner}.position", self.position)
        )
        if self.head_dim == 0:
            if self.hidden % self.heads:
                raise SpecError(
                    f"{owner}: heads={self.heads} must divide hidden={self.hidden} "
                    f"({self.hidden} % {self.heads} = {self.hidden % self.heads}); "
                    "or give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        _positive_int(owner, head_dim=self.head_dim)
        if self.heads % self.kv_heads:
            raise SpecError(
                f"{owner}: kv_heads={self.kv_heads} must divide heads={self.heads} (grouped-query attention)"
            )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def param_count(self) -> ParamCount:
        """Exact element counts, matching executor/model.py's modules one for one."""
        h, b = self.hidden, self.bias
        norm = 2 * h if self.norm is NormKind.LAYERNORM else h
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if b:
            attn += self.q_dim + 2 * self.kv_dim + h
        elif self.qkv_bias:
            attn += self.q_dim + 2 * self.kv_dim
        if self.mlp is MlpKind.GELU:
            mlp = 2 * h * self.ffn_hidden + (self.ffn_hidden + h if b else 0)
        else:
            mlp = 3 * h * self.ffn_hidden + (2 * self.ffn_hidden + h if b else 0)
        per_block = attn + mlp + 2 * norm
        return ParamCount(
            embedding=self.vocab * h,
            position=self.max_seq_len * h if self.position is PositionKind.LEARNED else 0,
            per_block=per_block,
            blocks=per_block * self.layers,
            final_norm=norm,
            head=0 if self.tied_embeddings else self.vocab * h,
        )

    def tp_divisible(self, tp: int) -> str | None:
        """Return the rule tp breaks for this model, or None if tp can shard it."""
        for name, value in (
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("ffn_hidden", self.ffn_hidden),
        ):
            if value % tp:
                return f"tp={tp} must divide {name}={value}"
        return None

    def tp_shard(self, tp: int) -> ModelSpec:
        """The block shapes one tensor-parallel rank holds (heads, kv_heads, ffn, vocab split by tp).

        `hidden` and `head_dim` are unchanged, so a block built from this spec on one device has
        exactly the per-rank matrices of the Megatron split (Shoeybi et al. 2019, Sec. 3).
        """
        rule = self.tp_divisible(tp)
        if rule:
            raise SpecError(f"model '{self.name}': {rule}")
        return replace(
            self,
            heads=self.heads // tp,
            kv_heads=self.kv_heads // tp,
            ffn_hidden=self.ffn_hidden // tp,
            vocab=-(-self.vocab // tp),
        )


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """One accelerator (or one CPU worker process, kind=cpu). Peaks are dense datasheet figures."""

    name: str
    memory_bytes: int
    peak_bf16_flops: float
    peak_fp16_flops: float
    peak_fp32_flops: float
    hbm_bytes_per_s: float
    kind: DeviceKind = DeviceKind.GPU

    def __post_init__(self) -> None:
        owner = f"gpu '{self.name}'"
        _positive_int(owner, memory_bytes=self.memory_bytes)
        _positive(
            owner,
            peak_bf16_flops=self.peak_bf16_flops,
            peak_fp16_flops=self.peak_fp16_flops,
            peak_fp32_flops=self.peak_fp32_flops,
            hbm_bytes_per_s=self.hbm_bytes_per_s,
        )
        object.__setattr__(self, "kind", _enum(DeviceKind, f"{owner}.kind", self.kind))

    def peak_flops(self, dtype: Dtype) -> float:
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
        _positive(f"link '{self.name}'", bandwidth_bytes_per_s=self.bandwidth_bytes_per_s)
        if self.latency_s < 0:
            raise SpecError(f"link '{self.name}'.latency_s={self.latency_s} must be >= 0")

    def scaled(self, factor: float) -> LinkSpec:
        """This link at `factor` of its bandwidth (a degraded NIC or cable, for what-if planning)."""
        _positive(f"link '{self.name}'", factor=factor)
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
        _positive_int("node", gpus=self.gpus, nics=self.nics)
        if self.switch < 0:
            raise SpecError(f"node.switch={self.switch} must be >= 0")

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

    @property
    def num_gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

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
        for i, node in enumerate(self.nodes):
            if gpu_id < node.gpus:
                return i, gpu_id
            gpu_id -= node.gpus
        raise AssertionError("unreachable")

    def gpu_ids_of_node(self, node_index: int) -> range:
        start = sum(n.gpus for n in self.nodes[:node_index])
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
    `grad_dtype` is the dtype gradients are accumulated and reduced in.
    """

    global_batch: int
    seq_len: int
    dtype: Dtype = Dtype.BF16
    grad_dtype: Dtype = Dtype.FP32
    optimizer: str = "adam"
    flash_attention: bool = True

    def __post_init__(self) -> None:
        _positive_int("training", global_batch=self.global_batch, seq_len=self.seq_len)
        object.__setattr__(self, "dtype", _enum(Dtype, "training.dtype", self.dtype))
        object.__setattr__(self, "grad_dtype", _enum(Dtype, "training.grad_dtype", self.grad_dtype))
        if self.optimizer != "adam":
            raise SpecError(f"training.optimizer={self.optimizer!r} is not supported; use adam")

    def check_model(self, model: ModelSpec) -> None:
        if self.seq_len > model.max_seq_len:
            raise SpecError(
                f"training.seq_len={self.seq_len} exceeds model '{model.name}' max_seq_len={model.max_seq_len}"
            )
