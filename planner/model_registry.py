"""The strict registry from a Hugging Face `model_type` to the reader of its config.json.

Owns: one reader per supported family, each mapping every config key that changes parameters,
compute or memory onto ModelSpec fields exactly as transformers' modeling code builds the model
(transformers 5.x `models/<family>/modeling_<family>.py`; tests/test_hf_parity.py builds each
family on the meta device and compares parameter counts), naming the keys it ignores as
irrelevant to cost, and refusing (one SpecError naming the key) what meshplan cannot price.
Does not own: the key bookkeeping (planner/hf_config.py), which features the cost model prices
or the executor builds (planner/model_support.py), or meshplan's own model YAML (planner/hf.py).

Defaults of absent keys are those of transformers' config classes (`LlamaConfig` etc.), since
that is what `from_pretrained` would build; the core sizes (layers, hidden, heads, FFN, vocab,
positions) are required.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from planner.errors import SpecError
from planner.hf_config import HfConfig
from planner.specs import Activation, MlaSpec, MlpKind, ModelSpec, MoeSpec, NormKind, PositionKind

# Rope, norm-epsilon, dropout and initialisation settings: no parameters, and cost differences
# below anything the cost model resolves (the executor has no dropout; RoPE scaling changes
# the angle table only).
NUMERIC_IGNORED = (
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_interleave",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "activation_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "dropout",
    "classifier_dropout",
    "pretraining_tp",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "output_router_logits",
    "router_jitter_noise",
    "norm_topk_prob",
    "original_max_position_embeddings",
)


@dataclass(frozen=True, kw_only=True)
class ReadModel:
    """A config.json read: the spec, its family, the keys present but irrelevant to cost, and
    notes on what is counted how (e.g. DeepSeek-V3's multi-token-prediction module)."""

    spec: ModelSpec
    family: str
    ignored: tuple[str, ...]
    notes: tuple[str, ...]


Reader = Callable[[HfConfig], dict[str, Any]]
_LLAMA_STYLE = {"mlp": MlpKind.SWIGLU, "norm": NormKind.RMSNORM, "position": PositionKind.ROPE}


def _core(c: HfConfig, heads_key: str = "num_attention_heads") -> dict[str, Any]:
    """Layers, hidden, heads, KV heads, vocab and positions under their Llama-style names."""
    heads = c.size("heads", heads_key)
    hidden = c.size("hidden", "hidden_size")
    fields = {
        "layers": c.size("layers", "num_hidden_layers"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": c.size("kv_heads", "num_key_value_heads", default=heads),
        "vocab": c.size("vocab", "vocab_size"),
        "max_seq_len": c.size("max_seq_len", "max_position_embeddings"),
    }
    if c.has("head_dim"):
        fields["head_dim"] = c.size("head_dim", "head_dim")
    c.get("head_dim", default=None)
    return fields


def _gated_mlp(c: HfConfig, act_key: str = "hidden_act", default: str = "silu") -> dict[str, Any]:
    """A gate/up/down MLP of intermediate_size; the activation is the family's, not the
    structure's (gemma's gated GELU is still 3 matrices)."""
    act = c.activation(
        act_key, default, (Activation.SILU, Activation.GELU_TANH, Activation.GELU_ERF)
    )
    return {
        "ffn_hidden": c.size("ffn_hidden", "intermediate_size"),
        "activation": None if act is Activation.SILU else act,
    }


def _sliding(
    c: HfConfig, layers: int, rule: Callable[[int], bool] | None, default: int = 0
) -> dict[str, Any]:
    """Sliding-window layers from `layer_types` when given, else the family's rule (None: no
    sliding window in this config); `default`: the config class's window when the key is
    absent (a null key means none)."""
    c.ignore("use_sliding_window", "max_window_layers")
    c.get("layer_types", default=None)
    c.get("sliding_window", default=None)
    if rule is None:
        return {}
    window = c.count("sliding_window", default if "sliding_window" not in c.cfg else 0)
    if c.has("layer_types"):
        types = c.cfg["layer_types"]
        kinds = {"full_attention", "sliding_attention"}
        if not isinstance(types, list) or len(types) != layers or not set(types) <= kinds:
            raise c.error(
                f"layer_types must list {layers} entries of full_attention|sliding_attention"
            )
        chosen = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        chosen = tuple(i for i in range(layers) if rule(i))
    if not window or not chosen:
        return {}
    c.note(
        f"sliding window of {window} tokens in {len(chosen)} of {layers} blocks "
        "(priced as full causal attention)"
    )
    return {"sliding_window": window, "sliding_layers": chosen}


def _tie(c: HfConfig, default: bool) -> dict[str, Any]:
    return {"tied_embeddings": c.flag("tie_word_embeddings", default)}


def _llama(c: HfConfig) -> dict[str, Any]:
    # LlamaAttention: q/k/v/o biases = attention_bias; LlamaMLP biases = mlp_bias.
    f = {**_LLAMA_STYLE, **_core(c), **_gated_mlp(c), **_tie(c, False), "bias": False}
    bias = c.flag("attention_bias", False)
    f.update(qkv_bias=bias, out_bias=bias, mlp_bias=c.flag("mlp_bias", False))
    return f


def _mistral(c: HfConfig) -> dict[str, Any]:
    f = {**_LLAMA_STYLE, **_core(c), **_gated_mlp(c), **_tie(c, False), "bias": False}
    # MistralConfig.sliding_window defaults to 4096; a null key turns it off.
    rule = None if "sliding_window" in c.cfg and not c.has("sliding_window") else lambda i: True
    return {**f, **_sliding(c, f["layers"], rule, default=4096)}


def _qwen_sliding(c: HfConfig, layers: int) -> dict[str, Any]:
    """Qwen2/Qwen3(-MoE): sliding only with use_sliding_window, in blocks >= max_window_layers."""
    if not c.flag("use_sliding_window", False):
        c.ignore("sliding_window", "max_window_layers", "layer_types")
        return {}
    start = c.count("max_window_layers", 28)
    return _sliding(c, layers, lambda i: i >= start, default=4096)


def _qwen2(c: HfConfig) -> dict[str, Any]:
    # Qwen2Attention: q/k/v with bias, o without; MLP without.
    f = {**_LLAMA_STYLE, **_core(c), **_gated_mlp(c), **_tie(c, False), "bias": False}
    c.ignore("use_mrope")  # multimodal RoPE sections (Qwen2-VL): no parameters
    return {**f, "qkv_bias": True, **_qwen_sliding(c, f["layers"])}


def _qwen3(c: HfConfig) -> dict[str, Any]:
    # Qwen3Attention: q/k/v/o biases = attention_bias; q_norm/k_norm RMSNorm(head_dim).
    f = {**_LLAMA_STYLE, **_core(c), **_gated_mlp(c), **_tie(c, False), "bias": False}
    f.setdefault("head_dim", 128)  # Qwen3Config.head_dim default
    bias = c.flag("attention_bias", False)
    return {
        **f,
        "qkv_bias": bias,
        "out_bias": bias,
        "qk_norm": True,
        **_qwen_sliding(c, f["layers"]),
    }


def _gemma_common(c: HfConfig, act_key: str) -> dict[str, Any]:
    f = {**_LLAMA_STYLE, **_core(c), **_gated_mlp(c, act_key, "gelu_pytorch_tanh")}
    f.setdefault("head_dim", 256)  # GemmaConfig/Gemma2Config.head_dim default
    bias = c.flag("attention_bias", False)
    c.require(
        "use_bidirectional_attention", lambda v: not v, None, "only causal attention is priced"
    )
    # Gemma's RMSNorm scales by (1 + weight): the same parameters as weight alone.
    return {
        **f,
        **_tie(c, True),
        "bias": False,
        "qkv_bias": bias,
        "out_bias": bias,
        "scaled_embedding": True,
    }


def _gemma(c: HfConfig) -> dict[str, Any]:
    c.ignore("hidden_activation")  # transformers 4.x spelling; GemmaMLP reads hidden_act
    return _gemma_common(c, "hidden_act")


def _gemma2(c: HfConfig) -> dict[str, Any]:
    # Gemma2MLP reads hidden_activation; sliding_window_size is the 4.x alias of sliding_window.
    c.ignore("hidden_act", "query_pre_attn_scalar", "sliding_window_size")
    f = _gemma_common(c, "hidden_activation")
    f.update(post_norms=True, **_sliding(c, f["layers"], lambda i: i % 2 == 0, default=4096))
    f["attn_logit_softcap"] = c.number("attn_logit_softcapping", 50.0)
    f["final_logit_softcap"] = c.number("final_logit_softcapping", 30.0)
    return f


def _phi3(c: HfConfig) -> dict[str, Any]:
    # Phi3: fused qkv_proj and gate_up_proj without biases: the same elements as Llama's.
    # Phi3Attention never reads attention_bias (Phi-3 config.json files carry it as false).
    c.ignore("attention_bias")
    f = {**_LLAMA_STYLE, **_core(c), **_gated_mlp(c), **_tie(c, False), "bias": False}
    rope = c.cfg.get("rope_parameters") or {}
    fraction = c.number("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    rule = (lambda i: True) if c.has("sliding_window") else None
    return {**f, "rope_fraction": fraction, **_sliding(c, f["layers"], rule)}


def _gpt2(c: HfConfig) -> dict[str, Any]:
    hidden = c.size("hidden", "n_embd", "hidden_size")
    act = c.activation(
        "activation_function",
        "gelu_new",
        (Activation.GELU_TANH, Activation.GELU_ERF, Activation.RELU),
    )
    heads = c.size("heads", "n_head", "num_attention_heads")
    c.ignore(
        "n_ctx", "summary_type", "summary_use_proj", "summary_activation",
        "summary_proj_to_labels", "summary_first_dropout", "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    )  # fmt: skip
    ffn = c.value("n_inner", default=None)
    return {
        "layers": c.size("layers", "n_layer", "num_hidden_layers"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": heads,
        "ffn_hidden": 4 * hidden if ffn is None else c.size("ffn_hidden", "n_inner"),
        "vocab": c.size("vocab", "vocab_size"),
        "max_seq_len": c.size("max_seq_len", "n_positions", "max_position_embeddings"),
        "activation": None if act is Activation.GELU_TANH else act,
        **_tie(c, True),
    }


def _gpt_neox(c: HfConfig) -> dict[str, Any]:
    # GPTNeoXAttention: query_key_value/dense biases = attention_bias; GPTNeoXMLP always biased.
    f = {**_core(c), "position": PositionKind.ROPE, **_tie(c, False)}
    f["kv_heads"] = f["heads"]
    act = c.activation(
        "hidden_act", "gelu", (Activation.GELU_ERF, Activation.GELU_TANH, Activation.RELU)
    )
    rope = c.cfg.get("rope_parameters") or {}
    c.ignore("rotary_emb_base")
    fraction = c.number("rotary_pct", rope.get("partial_rotary_factor", 0.25))
    bias = c.flag("attention_bias", True)
    return {
        **f,
        "ffn_hidden": c.size("ffn_hidden", "intermediate_size"),
        "activation": None if act is Activation.GELU_TANH else act,
        "bias": bias,
        "mlp_bias": True,
        "parallel_block": c.flag("use_parallel_residual", True),
        "rope_fraction": fraction,
    }


def _opt(c: HfConfig) -> dict[str, Any]:
    f = {**_core(c), "position": PositionKind.LEARNED, "position_offset": 2, **_tie(c, True)}
    f["kv_heads"] = f["heads"]
    c.require("do_layer_norm_before", True, True, "post-norm OPT (350m) is not priced")
    c.require("_remove_final_layer_norm", False, False, "OPT without a final norm is not priced")
    c.require("layer_norm_elementwise_affine", True, True, "norms without weights are not priced")
    c.require(
        "word_embed_proj_dim",
        f["hidden"],
        f["hidden"],
        "an embedding projection (project_in/out) is not priced",
    )
    c.ignore("layerdrop", "init_std")
    act = c.activation(
        "activation_function", "relu", (Activation.RELU, Activation.GELU_ERF, Activation.GELU_TANH)
    )
    return {
        **f,
        "ffn_hidden": c.size("ffn_hidden", "ffn_dim"),
        "activation": None if act is Activation.GELU_TANH else act,
        "bias": c.flag("enable_bias", True),
    }


def _falcon(c: HfConfig) -> dict[str, Any]:
    heads = c.size("heads", "num_attention_heads", "n_head")
    hidden = c.size("hidden", "hidden_size", "n_embed")
    c.require("alibi", False, False, "ALiBi Falcon (falcon-rw) is not priced")
    c.require(
        "apply_residual_connection_post_layernorm", False, False,
        "residuals taken after the norm are not built by meshplan",
    )  # fmt: skip
    new_arch = c.flag("new_decoder_architecture", False)
    parallel = c.flag("parallel_attn", True)
    if new_arch and not parallel:
        raise c.error("new_decoder_architecture=true with parallel_attn=false is not priced")
    if new_arch:
        kv = c.size("kv_heads", "num_kv_heads", default=heads)
        c.ignore("multi_query")
    else:
        kv = 1 if c.flag("multi_query", True) else heads
        c.ignore("num_kv_heads")
    norms = c.value("num_ln_in_parallel_attn", default=2 if new_arch else None)
    act = c.activation(
        "activation", "gelu", (Activation.GELU_ERF, Activation.GELU_TANH, Activation.RELU)
    )
    ffn = c.value("ffn_hidden_size", default=None)
    return {
        "layers": c.size("layers", "num_hidden_layers", "n_layer"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv,
        "ffn_hidden": 4 * hidden if ffn is None else c.size("ffn_hidden", "ffn_hidden_size"),
        "vocab": c.size("vocab", "vocab_size"),
        "max_seq_len": c.size("max_seq_len", "max_position_embeddings", default=2048),
        "position": PositionKind.ROPE,
        "activation": None if act is Activation.GELU_TANH else act,
        "bias": c.flag("bias", False),
        "parallel_block": parallel,
        "shared_block_norm": parallel and norms != 2,
        **_tie(c, True),
    }


def _bloom(c: HfConfig) -> dict[str, Any]:
    hidden = c.size("hidden", "hidden_size", "n_embed")
    heads = c.size("heads", "n_head", "num_attention_heads")
    c.require(
        "apply_residual_connection_post_layernorm", False, False,
        "residuals taken after the norm are not built by meshplan",
    )  # fmt: skip
    c.ignore(
        "slow_but_exact", "attention_softmax_in_fp32", "bias_dropout_fusion",
        "masked_softmax_fusion", "offset_alibi", "skip_bias_add", "skip_bias_add_qkv",
        "n_inner", "seq_length",
    )  # fmt: skip
    return {
        "layers": c.size("layers", "n_layer", "num_hidden_layers"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": heads,
        "ffn_hidden": 4 * hidden,  # BloomMLP: 4 * hidden_size, no config key
        "vocab": c.size("vocab", "vocab_size"),
        # BLOOM has no position table (ALiBi); 2,048 is its training length (Le Scao et al. 2022).
        "max_seq_len": 2048,
        "position": PositionKind.ALIBI,
        "bias": True,
        "embedding_norm": True,
        **_tie(c, True),
    }


def _moe_layers(c: HfConfig, layers: int) -> tuple[int, int]:
    """Qwen2/3-MoE `decoder_sparse_step` and `mlp_only_layers` as MoeSpec's dense-first +
    interval; other layouts cannot be represented and are refused."""
    step = c.positive("decoder_sparse_step", default=1)
    dense = c.value("mlp_only_layers", default=[])
    if not isinstance(dense, list) or any(
        isinstance(i, bool) or not isinstance(i, int) for i in dense
    ):
        raise c.error(f"mlp_only_layers={dense!r} must be a list of layer indices")
    k = len(dense)
    if sorted(dense) != list(range(k)) or (k and step != 1) or k >= layers:
        raise c.error(
            f"mlp_only_layers={dense!r} is not supported with decoder_sparse_step={step}: "
            "only the first k layers may be dense (MoeSpec.dense_layers)"
        )
    return k, step


def _mixtral(c: HfConfig) -> dict[str, Any]:
    f = {**_LLAMA_STYLE, **_core(c), **_gated_mlp(c), **_tie(c, False), "bias": False}
    experts = c.positive("num_local_experts", "num_experts", default=8)
    moe = MoeSpec(
        experts=experts,
        top_k=c.positive("num_experts_per_tok", default=2),
        expert_ffn_hidden=f["ffn_hidden"],
    )
    rule = (lambda i: True) if c.has("sliding_window") else None
    return {**f, "moe": moe, **_sliding(c, f["layers"], rule)}


def _qwen2_moe(c: HfConfig) -> dict[str, Any]:
    # Qwen2MoeSparseMoeBlock: routed experts of moe_intermediate_size, one shared expert of
    # shared_expert_intermediate_size with a sigmoid gate; dense layers use intermediate_size.
    f = {**_LLAMA_STYLE, **_core(c), **_gated_mlp(c), **_tie(c, False), "bias": False}
    shared = c.count("shared_expert_intermediate_size", 5632)
    dense, step = _moe_layers(c, f["layers"])
    moe = MoeSpec(
        experts=c.positive("num_experts", default=60),
        top_k=c.positive("num_experts_per_tok", default=4),
        expert_ffn_hidden=c.size("ffn_hidden", "moe_intermediate_size", default=1408),
        shared_experts=1 if shared else 0,
        shared_ffn_hidden=shared,
        shared_expert_gate=bool(shared),
        dense_layers=dense,
        layer_interval=step,
    )
    if not c.flag("use_sliding_window", False):
        c.ignore("sliding_window", "max_window_layers", "layer_types")
        sliding: dict[str, Any] = {}
    else:
        end = c.count("max_window_layers", 28)
        sliding = _sliding(c, f["layers"], lambda i: i % 2 == 0 and i < end, default=4096)
    return {**f, "qkv_bias": c.flag("qkv_bias", True), "moe": moe, **sliding}


def _qwen3_moe(c: HfConfig) -> dict[str, Any]:
    f = {**_LLAMA_STYLE, **_core(c), **_gated_mlp(c), **_tie(c, False), "bias": False}
    f.setdefault("head_dim", f["hidden"] // f["heads"])
    dense, step = _moe_layers(c, f["layers"])
    moe = MoeSpec(
        experts=c.positive("num_experts", "num_local_experts", default=128),
        top_k=c.positive("num_experts_per_tok", default=8),
        expert_ffn_hidden=c.size("ffn_hidden", "moe_intermediate_size", default=768),
        dense_layers=dense,
        layer_interval=step,
    )
    bias = c.flag("attention_bias", False)
    if c.flag("use_sliding_window", False):
        # Qwen3MoeAttention: every layer
        sliding = _sliding(c, f["layers"], lambda i: True, default=4096)
    else:
        c.ignore("sliding_window", "max_window_layers", "layer_types")
        sliding = {}
    return {**f, "qkv_bias": bias, "out_bias": bias, "qk_norm": True, "moe": moe, **sliding}


def _deepseek_v3(c: HfConfig) -> dict[str, Any]:
    f = {**_LLAMA_STYLE, **_core(c), **_gated_mlp(c), **_tie(c, False), "bias": False}
    f.pop("head_dim", None)  # DeepseekV3Config sets head_dim = qk_rope_head_dim; MLA has its own
    q_rank = c.value("q_lora_rank", default=None)
    mla = MlaSpec(
        q_lora_rank=0 if q_rank is None else c.size("hidden", "q_lora_rank"),
        kv_lora_rank=c.size("hidden", "kv_lora_rank", default=512),
        qk_nope_head_dim=c.size("head_dim", "qk_nope_head_dim", default=128),
        qk_rope_head_dim=c.size("head_dim", "qk_rope_head_dim", default=64),
        v_head_dim=c.size("head_dim", "v_head_dim", default=128),
    )
    c.ignore(
        "qk_head_dim",
        "routed_scaling_factor",
        "n_group",
        "topk_group",
        "topk_method",
        "scoring_func",
        "ep_size",
        "aux_loss_alpha",
        "seq_aux",
    )
    c.require("moe_layer_freq", 1, 1, "MoE layers at another interval are not read")
    shared = c.count("n_shared_experts", 1)
    expert_ffn = c.size("ffn_hidden", "moe_intermediate_size", default=2048)
    moe = MoeSpec(
        experts=c.positive("n_routed_experts", default=256),
        top_k=c.positive("num_experts_per_tok", default=8),
        expert_ffn_hidden=expert_ffn,
        # DeepseekV3MoE builds one shared MLP of moe_intermediate_size * n_shared_experts:
        # the same elements as n_shared_experts MLPs of moe_intermediate_size.
        shared_experts=shared,
        shared_ffn_hidden=expert_ffn,
        dense_layers=c.count("first_k_dense_replace", 3),
    )
    mtp = c.count("num_nextn_predict_layers", 1)
    if mtp:
        c.note(
            f"num_nextn_predict_layers={mtp}: the multi-token-prediction module is not counted "
            "(transformers does not build it either)"
        )
    # The router's e_score_correction_bias is a buffer, not a parameter.
    return {
        **f,
        "head_dim": mla.qk_head_dim,
        "kv_heads": f["heads"],
        "qkv_bias": c.flag("attention_bias", False),
        "mla": mla,
        "moe": moe,
    }


def _gpt_oss(c: HfConfig) -> dict[str, Any]:
    # GptOssAttention: q/k/v/o biases = attention_bias, one sink logit per head; GptOssExperts:
    # gate_up/down with biases, clamped SwiGLU; GptOssTopKRouter with a bias; no dense MLP.
    f = {**_LLAMA_STYLE, **_core(c), **_tie(c, False), "bias": False}
    f.setdefault("head_dim", f["hidden"] // f["heads"])
    c.ignore("swiglu_alpha", "swiglu_limit", "hidden_act", "initial_context_length")
    ffn = c.size("ffn_hidden", "intermediate_size")
    moe = MoeSpec(
        experts=c.positive("num_local_experts", "num_experts", default=128),
        top_k=c.positive("num_experts_per_tok", "experts_per_token", default=4),
        expert_ffn_hidden=ffn,
        router_bias=True,
    )
    bias = c.flag("attention_bias", True)
    return {
        **f,
        "ffn_hidden": ffn,
        "activation": Activation.SWIGLU_CLAMP,
        "qkv_bias": bias,
        "out_bias": bias,
        "mlp_bias": True,
        "attention_sinks": True,
        "moe": moe,
        **_sliding(c, f["layers"], lambda i: i % 2 == 0, default=128),
    }


# model_type -> (what it is, reader). The descriptions are what `model show` prints.
REGISTRY: dict[str, tuple[str, Reader]] = {
    "llama": ("Llama 2/3/3.1", _llama),
    "mistral": ("Mistral", _mistral),
    "qwen2": ("Qwen2/Qwen2.5", _qwen2),
    "qwen3": ("Qwen3", _qwen3),
    "gemma": ("Gemma", _gemma),
    "gemma2": ("Gemma 2", _gemma2),
    "phi3": ("Phi-3", _phi3),
    "gpt2": ("GPT-2", _gpt2),
    "gpt_neox": ("GPT-NeoX / Pythia", _gpt_neox),
    "opt": ("OPT", _opt),
    "falcon": ("Falcon", _falcon),
    "bloom": ("BLOOM", _bloom),
    "mixtral": ("Mixtral (MoE)", _mixtral),
    "qwen2_moe": ("Qwen2-MoE / Qwen1.5-MoE", _qwen2_moe),
    "qwen3_moe": ("Qwen3-MoE", _qwen3_moe),
    "deepseek_v3": ("DeepSeek-V3 (MLA, MoE)", _deepseek_v3),
    "gpt_oss": ("gpt-oss (MoE)", _gpt_oss),
}


def read_hf_config(cfg: Any, name: str, origin: str) -> ReadModel:
    """The ModelSpec of a config.json, or one SpecError naming the key it cannot price."""
    if not isinstance(cfg, dict):
        raise SpecError(f"{origin}: expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in REGISTRY:
        raise SpecError(
            f"{origin}: model_type={model_type!r} is not supported; use one of {'|'.join(REGISTRY)}"
        )
    c = HfConfig(cfg, origin, model_type)
    c.ignore(*NUMERIC_IGNORED)
    fields = REGISTRY[model_type][1](c)
    fields = {k: v for k, v in fields.items() if v is not None or k in ("moe", "mla")}
    ignored = c.finish()
    try:
        spec = ModelSpec(name=name, **fields)
    except SpecError as e:
        raise SpecError(f"{origin}: {e}") from None
    return ReadModel(spec=spec, family=model_type, ignored=ignored, notes=tuple(c.notes))
