"""Readers of the Mixture-of-Experts Hugging Face families: Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V3 (multi-head latent attention, shared experts, dense first layers) and gpt-oss.

Owns: each family's mapping onto ModelSpec and its `moe` (MoeSpec) and `mla` (MlaSpec), as
transformers 5.x builds them (fused expert tensors `gate_up_proj`/`down_proj` per layer), the
keys ignored and what is refused (layouts of dense layers MoeSpec cannot express).
Does not own: the registry (planner/model_registry.py) or the MoE cost model.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from planner.hf_config import LLAMA_STYLE, HfConfig, Reader, core, gated_mlp, sliding_fields, tie
from planner.specs import Activation, MlaSpec, MoeSpec


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
    f = {**LLAMA_STYLE, **core(c), **gated_mlp(c), **tie(c, False), "bias": False}
    experts = c.positive("num_local_experts", "num_experts", default=8)
    moe = MoeSpec(
        experts=experts,
        top_k=c.positive("num_experts_per_tok", default=2),
        expert_ffn_hidden=f["ffn_hidden"],
    )
    rule = (lambda i: True) if c.has("sliding_window") else None
    return {**f, "moe": moe, **sliding_fields(c, f["layers"], rule)}


def _qwen2_moe(c: HfConfig) -> dict[str, Any]:
    # Qwen2MoeSparseMoeBlock: routed experts of moe_intermediate_size, one shared expert of
    # shared_expert_intermediate_size with a sigmoid gate; dense layers use intermediate_size.
    f = {**LLAMA_STYLE, **core(c), **gated_mlp(c), **tie(c, False), "bias": False}
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
        sliding = sliding_fields(c, f["layers"], lambda i: i % 2 == 0 and i < end, default=4096)
    return {**f, "qkv_bias": c.flag("qkv_bias", True), "moe": moe, **sliding}


def _qwen3_moe(c: HfConfig) -> dict[str, Any]:
    f = {**LLAMA_STYLE, **core(c), **gated_mlp(c), **tie(c, False), "bias": False}
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
        sliding = sliding_fields(c, f["layers"], lambda i: True, default=4096)
    else:
        c.ignore("sliding_window", "max_window_layers", "layer_types")
        sliding = {}
    return {**f, "qkv_bias": bias, "out_bias": bias, "qk_norm": True, "moe": moe, **sliding}


def _deepseek_v3(c: HfConfig) -> dict[str, Any]:
    f = {**LLAMA_STYLE, **core(c), **gated_mlp(c), **tie(c, False), "bias": False}
    f.pop("head_dim", None)  # DeepseekV3Config sets head_dim = qk_rope_head_dim; MLA has its own
    q_rank = c.nullable("q_lora_rank", 1536)  # DeepseekV3Config default; null: no q bottleneck
    mla = MlaSpec(
        q_lora_rank=0 if q_rank is None else c.size("hidden", "q_lora_rank", default=q_rank),
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
    f = {**LLAMA_STYLE, **core(c), **tie(c, False), "bias": False}
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
        **sliding_fields(c, f["layers"], lambda i: i % 2 == 0, default=128),
    }


# model_type -> (what it is, reader). The descriptions are what `model show` prints.

FAMILIES: Mapping[str, tuple[str, Reader]] = MappingProxyType(
    {
        "mixtral": ("Mixtral (MoE)", _mixtral),
        "qwen2_moe": ("Qwen2-MoE / Qwen1.5-MoE", _qwen2_moe),
        "qwen3_moe": ("Qwen3-MoE", _qwen3_moe),
        "deepseek_v3": ("DeepSeek-V3 (MLA, MoE)", _deepseek_v3),
        "gpt_oss": ("gpt-oss (MoE)", _gpt_oss),
    }
)
