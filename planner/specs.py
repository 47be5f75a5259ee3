"""The specs every other part of meshplan speaks: model, GPU, cluster and training.

Owns: the frozen, validated dataclasses and the exact parameter count of a model.
Does not own: loading presets (presets/), reading Hugging Face files (planner/hf.py),
costs (planner/cost/).

Units are in field names (`_bytes`, `_s`, `_flops`, `_bytes_per_s`). Every spec validates on
construction and raises `SpecError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cached_property
from types import MappingProxyType

from planner.errors import SpecError

# Input bounds, far above any real model or cluster, so that a typo (`num_hidden_layers:
# 1000000`) is refused at once instead of making the search run for minutes. Largest published
# dense decoders: PaLM-540B 118 layers, FFN 73,728 (Chowdhery et al. 2022, Table 1); MT-NLG-530B
# hidden 20,480, 128 heads, FFN 81,920 (Smith et al. 2022, Table 1); Llama-3.1-405B 126 layers
# (Dubey et al. 2024, Table 3). Field -> (limit, what the largest real model has).
MODEL_LIMITS: Mapping[str, tuple[int, str]] = MappingProxyType(
    {
        # 2,000, not more: the search's memory floor is O(layers * pp) per candidate, and a
        # 2,000-layer model on 128 GPUs already takes ~30 s to plan (10,000: ~3 minutes).
        # The deepest published research model, DeepNet, has 1,000 layers (Wang et al. 2022).
        "layers": (2_000, "PaLM-540B has 118 layers"),
        "hidden": (1_000_000, "MT-NLG-530B has hidden 20,480"),
        "heads": (10_000, "Llama-3.1-405B has 128 heads"),
        "kv_heads": (10_000, "MT-NLG-530B has 128 KV heads"),
        # Gemma Team 2024, Table 1.
        "head_dim": (10_000, "Gemma 7B has head_dim 256"),
        "ffn_hidden": (10_000_000, "MT-NLG-530B has ffn_hidden 81,920"),
        # Gemma Team 2025 (Gemma 3); PaLM has 256k.
        "vocab": (10_000_000, "Gemma 3 has a vocabulary of 262,144"),
        # meta-llama/Llama-4-Scout-17B-16E config.json, max_position_embeddings.
        "max_seq_len": (1_000_000_000, "Llama 4 Scout has 10,485,760 positions"),
    }
)
# Sequences per optimizer step. DeepSeek-V3 ramps to 15,360 (DeepSeek-AI 2024, Sec. 4.2),
# Llama 3 405B uses 2,048 of 8,192 tokens (Dubey et al. 2024, Sec. 3.4.1); the search
# enumerates the divisors of global_batch / dp, one Python loop over that range per (tp, pp).
MAX_GLOBAL_BATCH = 1_000_000
# GPUs in one cluster: the largest training runs published used 16,384 H100s (Llama 3,
# Dubey et al. 2024, Sec. 3.3.1) of Meta's 24,576-GPU clusters (Meta engineering blog, 2024).
MAX_CLUSTER_GPUS = 1_000_000
# GPUs in one node (one intra-node link class): an NVL72 rack is 72 GPUs in one NVLink
# domain (NVIDIA GB200 NVL72 datasheet, 2024), NVL576 the largest announced (NVIDIA GTC 2025).
# With a measured p2p profile, placement builds each node's complete link graph, O(gpus^2):
# ~10 s for a 1,024-GPU node.
MAX_GPUS_PER_NODE = 1_024
# Fraction of memory_bytes a plan leaves free when a GPU does not give usable_memory_bytes.
# A device exposes less than nominal (H100 80GB: 81,559 of 81,920 MiB, per NVML/nvidia-smi,
# Modal "GPU memory capacity" table, 2024), the CUDA caching allocator rounds and splits
# blocks out of 2 MiB / 20 MiB segments so reserved exceeds allocated (PyTorch "CUDA
# semantics: memory management"), and the memory model's own terms (framework reserve,
# activation fragmentation, in planner/cost/memory.py) are estimates. 5 % of 80 GiB = 4 GiB
# covers the 0.35 GiB exposure gap and a few GiB of allocator slack. The same default holds for
# CPU workers: glibc malloc keeps freed chunks in per-thread arenas (mallopt(3), M_ARENA_MAX),
# so resident memory also exceeds live tensors, and the host's other processes share it.
DEFAULT_MEMORY_HEADROOM = 0.05


class MlpKind(str, Enum):
    """`gelu`: 2-matrix MLP (GPT); `swiglu`: gated 3-matrix MLP (Llama)."""

    GELU = "gelu"
    SWIGLU = "swiglu"


class NormKind(str, Enum):
    """`layernorm` has weight and bias; `rmsnorm` has a weight only."""

    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"


class PositionKind(str, Enum):
    """`learned`: a (max_seq_len x hidden) table (GPT); `rope`: rotary, no parameters (Llama);
    `alibi`: linear biases on the attention scores, no parameters (Press et al. 2022; MPT,
    BLOOM). The executor builds learned and rope only."""

    LEARNED = "learned"
    ROPE = "rope"
    ALIBI = "alibi"


class Activation(str, Enum):
    """The MLP nonlinearity, given where it is not the MlpKind's own (`gelu`: GELU with the tanh
    approximation; `swiglu`: SiLU gate). The structure (gated or 2-matrix) stays `mlp`'s.

    `gelu_erf`: exact GELU (Falcon, GPT-NeoX); `gelu_tanh`; `silu`; `relu` (OPT);
    `swiglu_clamp`: gpt-oss's clamped gate `x * sigmoid(1.702 x)` with (up + 1), limit 7.
    """

    GELU_ERF = "gelu_erf"
    GELU_TANH = "gelu_tanh"
    SILU = "silu"
    RELU = "relu"
    SWIGLU_CLAMP = "swiglu_clamp"


class Dtype(str, Enum):
    """Element types. FP8 (E4M3/E5M2) is a GEMM input type only: a training runs its linears in
    it (`TrainingSpec.fp8_linears`) with bf16 everywhere else, never as its dtype."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    FP8 = "fp8"

    @property
    def nbytes(self) -> int:
        return {Dtype.FP32: 4, Dtype.FP8: 1}.get(self, 2)


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


def is_number(value: object) -> bool:
    """A real, finite number; bools are not numbers here (YAML reads `yes` as True)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # ints beyond the float range (a 400-digit YAML number) are not usable numbers either
    return abs(value) < 2**1023 if isinstance(value, int) else math.isfinite(value)


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not is_number(value) or value <= 0:
            raise SpecError(f"{owner}.{name}={value!r} must be a finite number > 0")


def int_hint(value: object) -> str:
    """A hint for an integral float given where an integer is needed (refused everywhere)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return f"; write {int(value)}, not {value!r}"
    return ""


def _positive_int(owner: str, **values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SpecError(f"{owner}.{name}={value!r} must be a positive integer{int_hint(value)}")


def _bools(owner: str, **values: object) -> None:
    for name, value in values.items():
        if not isinstance(value, bool):
            raise SpecError(f"{owner}.{name}={value!r} must be true or false")


def _at_most(shown_as: str, value: int, limit: int, why: str) -> None:
    if value > limit:
        raise SpecError(f"{shown_as}={value:,} exceeds the limit of {limit:,} ({why})")


def check_model_limit(shown_as: str, field_name: str, value: int) -> None:
    """SpecError when ModelSpec field `field_name` is above its MODEL_LIMITS bound; `shown_as`
    names the value in the message (a ModelSpec field or a config.json key)."""
    limit, largest = MODEL_LIMITS[field_name]
    why = f"among the largest published models, {largest}; more is almost surely a typo"
    _at_most(shown_as, value, limit, why)


def check_cluster_size(shown_as: str, gpus: int) -> None:
    """SpecError above MAX_CLUSTER_GPUS (loaders call it before building the node list)."""
    why = "the largest published training clusters have ~25,000 GPUs; planning time grows with it"
    _at_most(f"{shown_as}: GPU count", gpus, MAX_CLUSTER_GPUS, why)


def bytes_after_headroom(memory_bytes: int, fraction: float) -> int:
    """`memory_bytes` less `fraction` of it in whole bytes (>= 1 for fraction < 1)."""
    return memory_bytes - math.floor(memory_bytes * fraction)


def check_headroom(fraction: object) -> float:
    """A memory headroom fraction in [0, 1) as a float; SpecError otherwise."""
    if not is_number(fraction) or not 0 <= fraction < 1:  # type: ignore[operator]
        raise SpecError(
            f"memory_headroom={fraction!r} must be a fraction in [0, 1) of each GPU's "
            "memory_bytes (0.05 keeps 5 % free)"
        )
    return float(fraction)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class MoeSpec:
    """The Mixture-of-Experts feed-forward of a ModelSpec: token-choice top-k routing over
    `experts` routed experts (gated MLPs of `expert_ffn_hidden`) plus `shared_experts` that every
    token passes (Shazeer et al. 2017; Mixtral, Jiang et al. 2024; DeepSeekMoE, Dai et al. 2024).

    Block i is an MoE block when `i >= dense_layers` and `(i + 1 - dense_layers) %
    layer_interval == 0`; the others keep the dense MLP of `ModelSpec.ffn_hidden`
    (DeepSeek-V3 `first_k_dense_replace`, Qwen2-MoE `decoder_sparse_step`, Llama 4
    `interleave_moe_layer_step`). `shared_ffn_hidden` is each shared expert's size (0: the
    routed size). The router is a bias-free h x experts linear; `shared_expert_gate` adds
    Qwen2-MoE's h x 1 sigmoid gate on the shared expert.
    """

    experts: int
    top_k: int
    expert_ffn_hidden: int
    shared_experts: int = 0
    shared_ffn_hidden: int = 0
    dense_layers: int = 0
    layer_interval: int = 1
    shared_expert_gate: bool = False
    # gpt-oss: the router linear has a bias (one per expert). Omitted from JSON while false.
    router_bias: bool = field(default=False, metadata={"json_omit_default": True})

    def __post_init__(self) -> None:
        owner = "model.moe"
        _positive_int(
            owner,
            experts=self.experts,
            top_k=self.top_k,
            expert_ffn_hidden=self.expert_ffn_hidden,
            layer_interval=self.layer_interval,
        )
        for name in ("shared_experts", "shared_ffn_hidden", "dense_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{owner}.{name}={value!r} must be an integer >= 0")
        _bools(owner, shared_expert_gate=self.shared_expert_gate, router_bias=self.router_bias)
        if self.top_k > self.experts:
            raise SpecError(f"{owner}.top_k={self.top_k} must be <= experts={self.experts}")
        check_model_limit(f"{owner}.expert_ffn_hidden", "ffn_hidden", self.expert_ffn_hidden)
        if self.shared_ffn_hidden == 0 and self.shared_experts:
            object.__setattr__(self, "shared_ffn_hidden", self.expert_ffn_hidden)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.dense_layers and (i + 1 - self.dense_layers) % self.layer_interval == 0

    @property
    def uniform(self) -> bool:
        """Every block is an MoE block (Mixtral, Qwen3-MoE)."""
        return self.dense_layers == 0 and self.layer_interval == 1


@dataclass(frozen=True, kw_only=True)
class MlaSpec:
    """Multi-head latent attention (DeepSeek-V2, DeepSeek-AI 2024, Sec. 2.1; DeepSeek-V3).

    Queries pass a low-rank bottleneck of `q_lora_rank` (0: a plain h x heads*(nope+rope)
    projection, DeepSeek-V2-Lite), keys and values one of `kv_lora_rank` plus a decoupled
    rotary key of `qk_rope_head_dim` shared by all heads; each head's query/key has
    `qk_nope_head_dim + qk_rope_head_dim` dimensions and its value `v_head_dim`. The
    bottlenecks are RMS-normalised (q_a_layernorm, kv_a_layernorm).
    """

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self) -> None:
        owner = "model.mla"
        _positive_int(
            owner,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
        )
        q = self.q_lora_rank
        if isinstance(q, bool) or not isinstance(q, int) or q < 0:
            raise SpecError(
                f"{owner}.q_lora_rank={q!r} must be an integer >= 0 (0: no q bottleneck)"
            )
        for name in (
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        ):
            check_model_limit(f"{owner}.{name}", "hidden", getattr(self, name))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def params(self, hidden: int, heads: int, bias: bool) -> int:
        """Elements of one MLA layer as transformers' DeepseekV3Attention builds it: q_a/q_b (or
        q_proj), kv_a_proj_with_mqa, kv_b_proj, o_proj, the two RMSNorm weights; `bias` puts
        biases on q_a_proj, kv_a_proj_with_mqa and o_proj (config `attention_bias`)."""
        h, q_out = hidden, heads * self.qk_head_dim
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * q_out
            q += self.q_lora_rank if bias else 0
        else:
            q = h * q_out
        kv_a = self.kv_lora_rank + self.qk_rope_head_dim
        kv = h * kv_a + (kv_a if bias else 0) + self.kv_lora_rank
        kv += self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        out = heads * self.v_head_dim * h + (h if bias else 0)
        return q + kv + out


@dataclass(frozen=True, kw_only=True)
class ParamCount:
    """Exact parameter counts of a ModelSpec, by part (numbers of elements, not bytes)."""

    embedding: int
    position: int
    per_block: int
    blocks: int
    final_norm: int
    head: int
    # Routed-expert parameters of all MoE blocks, and the part one token uses (top_k of experts).
    routed_experts: int = 0
    routed_active: int = 0

    @property
    def total(self) -> int:
        return self.embedding + self.position + self.blocks + self.final_norm + self.head

    @property
    def active(self) -> int:
        """Parameters one token passes through (all of them for a dense model)."""
        return self.total - self.routed_experts + self.routed_active


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
    moe: MoeSpec | None = field(default=None, metadata={"json_omit_none": True})
    # Architecture features beyond GPT/Llama, read from Hugging Face configs by
    # planner/model_registry.py. Each is omitted from JSON at its default, so older plans keep
    # their bytes; planner/model_support.py says which ones the cost model prices and which the
    # executor builds.
    # The MLP nonlinearity when it is not mlp's own (None: gelu_tanh for gelu, silu for swiglu).
    activation: Activation | None = field(default=None, metadata={"json_omit_none": True})
    # Biases on the attention output projection / on the MLP (or expert) linears only (Llama
    # `attention_bias` + `mlp_bias`, GPT-NeoX's always-biased MLP); `bias` puts them everywhere.
    out_bias: bool = field(default=False, metadata={"json_omit_default": True})
    mlp_bias: bool = field(default=False, metadata={"json_omit_default": True})
    # RMSNorm over each head's q and k (Qwen3; Dehghani et al. 2023): 2 x head_dim per block.
    qk_norm: bool = field(default=False, metadata={"json_omit_default": True})
    # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-J, GPT-NeoX, Falcon); `shared_block_norm`: both
    # branches read one norm (Falcon-7B).
    parallel_block: bool = field(default=False, metadata={"json_omit_default": True})
    shared_block_norm: bool = field(default=False, metadata={"json_omit_default": True})
    # A norm on the attention and MLP outputs too, four per block (Gemma 2 "sandwich").
    post_norms: bool = field(default=False, metadata={"json_omit_default": True})
    # A norm right after the token embedding (BLOOM word_embeddings_layernorm).
    embedding_norm: bool = field(default=False, metadata={"json_omit_default": True})
    # Token embeddings multiplied by sqrt(hidden) (Gemma); no parameters.
    scaled_embedding: bool = field(default=False, metadata={"json_omit_default": True})
    # Extra rows of the learned position table (OPT: max_seq_len + 2).
    position_offset: int = field(default=0, metadata={"json_omit_default": True})
    # Fraction of head_dim that is rotated (GPT-NeoX rotary_pct 0.25).
    rope_fraction: float = field(default=1.0, metadata={"json_omit_default": True})
    # Sliding-window attention of `sliding_window` tokens in the blocks `sliding_layers`.
    sliding_window: int = field(default=0, metadata={"json_omit_default": True})
    sliding_layers: tuple[int, ...] = field(default=(), metadata={"json_omit_default": True})
    # tanh soft-capping of attention scores / final logits (Gemma 2); 0: none.
    attn_logit_softcap: float = field(default=0.0, metadata={"json_omit_default": True})
    final_logit_softcap: float = field(default=0.0, metadata={"json_omit_default": True})
    # One learned sink logit per head in every softmax (gpt-oss).
    attention_sinks: bool = field(default=False, metadata={"json_omit_default": True})
    mla: MlaSpec | None = field(default=None, metadata={"json_omit_none": True})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"model name={self.name!r} must be a non-empty string")
        owner = f"model '{self.name}'"
        sizes = {n: getattr(self, n) for n in MODEL_LIMITS if n != "head_dim"}
        _positive_int(owner, **sizes)
        for name, value in sizes.items():
            check_model_limit(f"{owner}.{name}", name, value)
        _bools(owner, tied_embeddings=self.tied_embeddings, bias=self.bias, qkv_bias=self.qkv_bias)
        object.__setattr__(self, "mlp", _enum(MlpKind, f"{owner}.mlp", self.mlp))
        object.__setattr__(self, "norm", _enum(NormKind, f"{owner}.norm", self.norm))
        object.__setattr__(
            self, "position", _enum(PositionKind, f"{owner}.position", self.position)
        )
        if self.head_dim == 0 and type(self.head_dim) is int:
            if self.hidden % self.heads:
                raise SpecError(
                    f"{owner}: heads={self.heads} must divide hidden={self.hidden} "
                    f"({self.hidden} % {self.heads} = {self.hidden % self.heads}); "
                    "or give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        _positive_int(owner, head_dim=self.head_dim)
        check_model_limit(f"{owner}.head_dim", "head_dim", self.head_dim)
        if self.heads % self.kv_heads:
            raise SpecError(
                f"{owner}: kv_heads={self.kv_heads} must divide heads={self.heads} (grouped-query attention)"
            )
        if isinstance(self.moe, Mapping):
            object.__setattr__(self, "moe", MoeSpec(**self.moe))
        if self.moe is not None and not isinstance(self.moe, MoeSpec):
            raise SpecError(f"{owner}.moe={self.moe!r} must be a mapping of MoeSpec fields or null")
        if self.moe is not None and self.moe.dense_layers >= self.layers:
            raise SpecError(
                f"{owner}.moe.dense_layers={self.moe.dense_layers} must be < layers={self.layers}"
            )
        self._check_features(owner)

    def _check_features(self, owner: str) -> None:
        _bools(
            owner,
            out_bias=self.out_bias,
            mlp_bias=self.mlp_bias,
            qk_norm=self.qk_norm,
            parallel_block=self.parallel_block,
            shared_block_norm=self.shared_block_norm,
            post_norms=self.post_norms,
            embedding_norm=self.embedding_norm,
            scaled_embedding=self.scaled_embedding,
            attention_sinks=self.attention_sinks,
        )
        if self.activation is not None:
            object.__setattr__(
                self, "activation", _enum(Activation, f"{owner}.activation", self.activation)
            )
        if self.shared_block_norm and not self.parallel_block:
            raise SpecError(f"{owner}.shared_block_norm needs parallel_block: true")
        p = self.position_offset
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise SpecError(f"{owner}.position_offset={p!r} must be an integer >= 0")
        if not is_number(self.rope_fraction) or not 0 < self.rope_fraction <= 1:
            raise SpecError(f"{owner}.rope_fraction={self.rope_fraction!r} must be in (0, 1]")
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            v = getattr(self, name)
            if not is_number(v) or v < 0:
                raise SpecError(f"{owner}.{name}={v!r} must be a finite number >= 0 (0: none)")
        w = self.sliding_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise SpecError(f"{owner}.sliding_window={w!r} must be an integer >= 0 (0: none)")
        layers = tuple(self.sliding_layers)
        object.__setattr__(self, "sliding_layers", layers)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in layers) or list(
            layers
        ) != sorted(set(layers)):
            raise SpecError(f"{owner}.sliding_layers must be increasing block indices")
        if layers and (layers[0] < 0 or layers[-1] >= self.layers):
            raise SpecError(f"{owner}.sliding_layers must lie in 0..{self.layers - 1}")
        if bool(layers) != bool(w):
            raise SpecError(f"{owner}: sliding_window and sliding_layers go together")
        if isinstance(self.mla, Mapping):
            object.__setattr__(self, "mla", MlaSpec(**self.mla))
        if self.mla is not None and not isinstance(self.mla, MlaSpec):
            raise SpecError(f"{owner}.mla={self.mla!r} must be a mapping of MlaSpec fields or null")

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def _mlp_params(self, ffn: int) -> int:
        h, b = self.hidden, self.bias or self.mlp_bias
        if self.mlp is MlpKind.GELU:
            return 2 * h * ffn + (ffn + h if b else 0)
        return 3 * h * ffn + (2 * ffn + h if b else 0)

    def norm_params(self, size: int) -> int:
        """Elements of one norm over `size` features (LayerNorm: weight and bias)."""
        return 2 * size if self.norm is NormKind.LAYERNORM else size

    def attention_params(self) -> int:
        """Elements of one block's attention (projections, biases, q/k norms, sinks)."""
        h = self.hidden
        if self.mla is not None:
            attn = self.mla.params(h, self.heads, self.bias or self.qkv_bias)
        else:
            attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
            if self.bias or self.qkv_bias:
                attn += self.q_dim + 2 * self.kv_dim
            if self.bias or self.out_bias:
                attn += h
        if self.qk_norm:
            attn += 2 * self.norm_params(self.head_dim)
        return attn + (self.heads if self.attention_sinks else 0)

    @property
    def block_norms(self) -> int:
        """Norms per block: 2 (pre-norm), 1 (parallel block sharing one), 4 (sandwich)."""
        return (1 if self.shared_block_norm else 2) + (2 if self.post_norms else 0)

    def param_count(self) -> ParamCount:
        """Exact element counts, matching executor/model.py's modules one for one and, for the
        Hugging Face families of planner/model_registry.py, transformers' own models
        (tests/test_hf_parity.py builds them on the meta device).

        `per_block` is one block's count when all blocks are alike (a dense model or a uniform
        MoE); with dense-first or interleaved MoE layers it is the MoE block's and `blocks` is
        the exact sum. `embedding` includes an embedding norm (BLOOM).
        """
        h = self.hidden
        norm = self.norm_params(h)
        attn = self.attention_params()
        block_norms = self.block_norms * norm
        dense_block = attn + self._mlp_params(self.ffn_hidden) + block_norms
        routed = routed_active = 0
        per_block, blocks = dense_block, dense_block * self.layers
        if self.moe is not None:
            m = self.moe
            expert = self._mlp_params(m.expert_ffn_hidden)
            shared = m.shared_experts * self._mlp_params(m.shared_ffn_hidden)
            router = h * m.experts + (h if m.shared_expert_gate else 0)
            router += m.experts if m.router_bias else 0
            per_block = attn + block_norms + router + shared + m.experts * expert
            n_moe = sum(m.is_moe_layer(i) for i in range(self.layers))
            blocks = per_block * n_moe + dense_block * (self.layers - n_moe)
            routed, routed_active = n_moe * m.experts * expert, n_moe * m.top_k * expert
        positions = self.max_seq_len + self.position_offset
        return ParamCount(
            embedding=self.vocab * h + (norm if self.embedding_norm else 0),
            position=positions * h if self.position is PositionKind.LEARNED else 0,
            per_block=per_block,
            blocks=blocks,
            final_norm=norm,
            head=0 if self.tied_embeddings else self.vocab * h,
            routed_experts=routed,
            routed_active=routed_active,
        )

    def tp_divisible(self, tp: int) -> str | None:
        """Return the rule tp breaks for this model, or None if tp can shard it."""
        sizes = [
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("ffn_hidden", self.ffn_hidden),
        ]
        if self.moe is not None:
            sizes.append(("moe.expert_ffn_hidden", self.moe.expert_ffn_hidden))
            if self.moe.shared_experts:
                sizes.append(("moe.shared_ffn_hidden", self.moe.shared_ffn_hidden))
        for name, value in sizes:
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
        moe = self.moe
        if moe is not None:
            moe = replace(
                moe,
                expert_ffn_hidden=moe.expert_ffn_hidden // tp,
                shared_ffn_hidden=moe.shared_ffn_hidden // tp,
            )
        return replace(
            self,
            heads=self.heads // tp,
            kv_heads=self.kv_heads // tp,
            ffn_hidden=self.ffn_hidden // tp,
            vocab=-(-self.vocab // tp),
            moe=moe,
        )


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
        _positive_int(owner, memory_bytes=self.memory_bytes)
        _positive(
            owner,
            peak_bf16_flops=self.peak_bf16_flops,
            peak_fp16_flops=self.peak_fp16_flops,
            peak_fp32_flops=self.peak_fp32_flops,
            hbm_bytes_per_s=self.hbm_bytes_per_s,
        )
        object.__setattr__(self, "kind", _enum(DeviceKind, f"{owner}.kind", self.kind))
        if self.sm_count is not None:
            _positive_int(owner, sm_count=self.sm_count)
        if self.peak_fp8_flops is not None:
            _positive(owner, peak_fp8_flops=self.peak_fp8_flops)
        usable = self.usable_memory_bytes
        if usable is not None:
            _positive_int(owner, usable_memory_bytes=usable)
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
        _positive(owner, bandwidth_bytes_per_s=self.bandwidth_bytes_per_s)
        if not is_number(self.latency_s) or self.latency_s < 0:
            raise SpecError(f"{owner}.latency_s={self.latency_s!r} must be a finite number >= 0")

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
        why = "one intra-node link class; an NVL72 rack has 72 GPUs in one NVLink domain"
        _at_most("node.gpus", self.gpus, MAX_GPUS_PER_NODE, why)
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
        _positive_int("training", global_batch=self.global_batch, seq_len=self.seq_len)
        why = "sequences per step; the largest published batches are ~15,000 (DeepSeek-V3)"
        _at_most("training.global_batch", self.global_batch, MAX_GLOBAL_BATCH, why)
        check_model_limit("training.seq_len", "max_seq_len", self.seq_len)
        _bools("training", flash_attention=self.flash_attention)
        object.__setattr__(self, "dtype", _enum(Dtype, "training.dtype", self.dtype))
        object.__setattr__(self, "grad_dtype", _enum(Dtype, "training.grad_dtype", self.grad_dtype))
        _bools("training", fp8_linears=self.fp8_linears)
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
