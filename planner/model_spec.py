"""The model spec: a transformer's shape, its Mixture-of-Experts and MLA parts, and its exact
parameter count.

Owns: `ModelSpec`, `MoeSpec`, `MlaSpec`, `ParamCount`, validated on construction (planner/
spec_rules.py). Does not own: reading Hugging Face files (planner/hf.py) or presets (presets/).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from planner.errors import SpecError
from planner.spec_rules import (
    MODEL_LIMITS,
    Activation,
    MlpKind,
    NormKind,
    PositionKind,
    check_bools,
    check_model_limit,
    check_positive_int,
    enum_field,
    is_number,
)


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
        check_positive_int(
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
        check_bools(owner, shared_expert_gate=self.shared_expert_gate, router_bias=self.router_bias)
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
        check_positive_int(
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
        check_positive_int(owner, **sizes)
        for name, value in sizes.items():
            check_model_limit(f"{owner}.{name}", name, value)
        check_bools(
            owner, tied_embeddings=self.tied_embeddings, bias=self.bias, qkv_bias=self.qkv_bias
        )
        object.__setattr__(self, "mlp", enum_field(MlpKind, f"{owner}.mlp", self.mlp))
        object.__setattr__(self, "norm", enum_field(NormKind, f"{owner}.norm", self.norm))
        object.__setattr__(
            self, "position", enum_field(PositionKind, f"{owner}.position", self.position)
        )
        if self.head_dim == 0 and type(self.head_dim) is int:
            if self.hidden % self.heads:
                raise SpecError(
                    f"{owner}: heads={self.heads} must divide hidden={self.hidden} "
                    f"({self.hidden} % {self.heads} = {self.hidden % self.heads}); "
                    "or give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        check_positive_int(owner, head_dim=self.head_dim)
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
        check_bools(
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
                self, "activation", enum_field(Activation, f"{owner}.activation", self.activation)
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
