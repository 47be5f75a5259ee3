"""Readers of the dense Hugging Face families: Llama, Mistral, Qwen2/2.5, Qwen3, Gemma, Gemma 2,
Phi-3, GPT-2, GPT-NeoX, OPT, Falcon, BLOOM.

Owns: each family's mapping of config.json keys onto ModelSpec fields, exactly as transformers
5.x `models/<family>/modeling_<family>.py` builds the model (tests/test_hf_parity.py checks the
parameter counts on the meta device), the keys it ignores, and what it refuses.
Does not own: the registry (planner/model_registry.py) or the key bookkeeping
(planner/hf_config.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from planner.hf_config import LLAMA_STYLE, HfConfig, Reader, core, gated_mlp, sliding_fields, tie
from planner.specs import Activation, PositionKind


def _llama(c: HfConfig) -> dict[str, Any]:
    # LlamaAttention: q/k/v/o biases = attention_bias; LlamaMLP biases = mlp_bias.
    f = {**LLAMA_STYLE, **core(c), **gated_mlp(c), **tie(c, False), "bias": False}
    bias = c.flag("attention_bias", False)
    f.update(qkv_bias=bias, out_bias=bias, mlp_bias=c.flag("mlp_bias", False))
    return f


def _mistral(c: HfConfig) -> dict[str, Any]:
    f = {**LLAMA_STYLE, **core(c), **gated_mlp(c), **tie(c, False), "bias": False}
    # MistralConfig.sliding_window defaults to 4096; a null key turns it off.
    rule = None if "sliding_window" in c.cfg and not c.has("sliding_window") else lambda i: True
    return {**f, **sliding_fields(c, f["layers"], rule, default=4096)}


def _qwen_sliding(c: HfConfig, layers: int) -> dict[str, Any]:
    """Qwen2/Qwen3(-MoE): sliding only with use_sliding_window, in blocks >= max_window_layers."""
    if not c.flag("use_sliding_window", False):
        c.ignore("sliding_window", "max_window_layers", "layer_types")
        return {}
    start = c.count("max_window_layers", 28)
    return sliding_fields(c, layers, lambda i: i >= start, default=4096)


def _qwen2(c: HfConfig) -> dict[str, Any]:
    # Qwen2Attention: q/k/v with bias, o without; MLP without.
    f = {**LLAMA_STYLE, **core(c), **gated_mlp(c), **tie(c, False), "bias": False}
    c.ignore("use_mrope")  # multimodal RoPE sections (Qwen2-VL): no parameters
    return {**f, "qkv_bias": True, **_qwen_sliding(c, f["layers"])}


def _qwen3(c: HfConfig) -> dict[str, Any]:
    # Qwen3Attention: q/k/v/o biases = attention_bias; q_norm/k_norm RMSNorm(head_dim).
    f = {**LLAMA_STYLE, **core(c), **gated_mlp(c), **tie(c, False), "bias": False}
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
    f = {**LLAMA_STYLE, **core(c), **gated_mlp(c, act_key, "gelu_pytorch_tanh")}
    f.setdefault("head_dim", 256)  # GemmaConfig/Gemma2Config.head_dim default
    bias = c.flag("attention_bias", False)
    c.require(
        "use_bidirectional_attention", lambda v: not v, None, "only causal attention is priced"
    )
    # Gemma's RMSNorm scales by (1 + weight): the same parameters as weight alone.
    return {
        **f,
        **tie(c, True),
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
    f.update(post_norms=True, **sliding_fields(c, f["layers"], lambda i: i % 2 == 0, default=4096))
    # Gemma2Config defaults 50 and 30; a null key turns the capping off.
    for key, field_name, default in (
        ("attn_logit_softcapping", "attn_logit_softcap", 50.0),
        ("final_logit_softcapping", "final_logit_softcap", 30.0),
    ):
        cap = c.nullable(key, default)
        f[field_name] = 0.0 if cap is None else c.number(key, default)
    return f


def _phi3(c: HfConfig) -> dict[str, Any]:
    # Phi3: fused qkv_proj and gate_up_proj without biases: the same elements as Llama's.
    # Phi3Attention never reads attention_bias (Phi-3 config.json files carry it as false).
    c.ignore("attention_bias")
    f = {**LLAMA_STYLE, **core(c), **gated_mlp(c), **tie(c, False), "bias": False}
    fraction = c.rope_fraction("partial_rotary_factor", 1.0)
    rule = (lambda i: True) if c.has("sliding_window") else None
    return {**f, "rope_fraction": fraction, **sliding_fields(c, f["layers"], rule)}


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
        **tie(c, True),
    }


def _gpt_neox(c: HfConfig) -> dict[str, Any]:
    # GPTNeoXAttention: query_key_value/dense biases = attention_bias; GPTNeoXMLP always biased.
    f = {**core(c), "position": PositionKind.ROPE, **tie(c, False)}
    f["kv_heads"] = f["heads"]
    act = c.activation(
        "hidden_act", "gelu", (Activation.GELU_ERF, Activation.GELU_TANH, Activation.RELU)
    )
    c.ignore("rotary_emb_base")
    fraction = c.rope_fraction("rotary_pct", 0.25)
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
    f = {**core(c), "position": PositionKind.LEARNED, "position_offset": 2, **tie(c, True)}
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
        **tie(c, True),
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
        **tie(c, True),
    }


FAMILIES: Mapping[str, tuple[str, Reader]] = MappingProxyType(
    {
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
    }
)
