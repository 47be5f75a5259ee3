"""meshplan's parameter counts against transformers' own models, built on the meta device.

Every family of planner/model_registry.py is built with `AutoModelForCausalLM.from_config` on
the meta device (no memory, milliseconds per block) from small configs that use the real
config.json field names and the real models' structure (feature variants included), and the
count must be exact. The headline models' real config.json values are checked at full size:
transformers builds them with one and two (MoE) blocks, the per-block count extrapolates
linearly to the real depth, and meshplan's full-size count must equal it and the published
size. Skipped without transformers (`pip install -e '.[parity]'`).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest

from planner.errors import SpecError
from planner.model_registry import REGISTRY, read_hf_config

transformers = pytest.importorskip(
    "transformers", reason="the parity tests need transformers: pip install -e '.[parity]'"
)
torch = pytest.importorskip("torch")


def _layer_key(cfg: dict[str, Any]) -> str:
    return "n_layer" if "n_layer" in cfg else "num_hidden_layers"


def with_layers(cfg: dict[str, Any], layers: int) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    out[_layer_key(cfg)] = layers
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][:layers]
    return out


def hf_params(cfg: dict[str, Any]) -> int:
    """Parameters of transformers' causal-LM model of `cfg` (tied weights counted once)."""
    kwargs = {k: v for k, v in cfg.items() if k not in ("quantization_config", "auto_map")}
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(**kwargs)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def ours(cfg: dict[str, Any]) -> int:
    return read_hf_config(cfg, "m", "config.json").spec.param_count().total


def _small(model_type: str, **kw: Any) -> dict[str, Any]:
    """A small Llama-shaped config of `model_type` (real key names), with overrides."""
    base = {
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "max_position_embeddings": 128,
    }
    return {**base, **kw}


# (id, config): each family, and each feature variant its reader distinguishes.
SMALL: list[tuple[str, dict[str, Any]]] = [
    ("llama", _small("llama", hidden_act="silu", rope_theta=500000.0)),
    (
        "llama-biases-tied",
        _small("llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=8),
    ),
    ("mistral-sliding", _small("mistral", sliding_window=32, head_dim=32)),
    ("qwen2", _small("qwen2", tie_word_embeddings=True)),
    (
        "qwen2-sliding",
        _small("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1),
    ),
    ("qwen3", _small("qwen3", head_dim=32)),
    ("qwen3-bias", _small("qwen3", head_dim=16, attention_bias=True)),
    ("gemma", _small("gemma", head_dim=32, hidden_act="gelu")),
    (
        "gemma2",
        _small(
            "gemma2",
            head_dim=32,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=16,
            query_pre_attn_scalar=32,
        ),
    ),
    (
        "phi3",
        _small(
            "phi3",
            pad_token_id=0,
            sliding_window=47,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
            },
        ),
    ),
    (
        "gpt2",
        {
            "model_type": "gpt2",
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_inner": None,
            "vocab_size": 300,
            "n_positions": 128,
            "n_ctx": 128,
        },
    ),
    (
        "gpt2-n_inner",
        {
            "model_type": "gpt2",
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_inner": 100,
            "vocab_size": 300,
            "n_positions": 64,
        },
    ),
    ("gpt_neox", _small("gpt_neox", num_key_value_heads=None, rotary_pct=0.25, hidden_act="gelu")),
    (
        "gpt_neox-no-attention-bias",
        _small(
            "gpt_neox", num_key_value_heads=None, attention_bias=False, use_parallel_residual=False
        ),
    ),
    (
        "opt",
        {
            "model_type": "opt",
            "hidden_size": 64,
            "ffn_dim": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 300,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": 64,
            "do_layer_norm_before": True,
            "activation_function": "relu",
        },
    ),  # fmt: skip
    (
        "falcon-7b-style",
        {
            "model_type": "falcon",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 300,
            "multi_query": True,
            "parallel_attn": True,
            "bias": False,
            "new_decoder_architecture": False,
        },
    ),  # fmt: skip
    (
        "falcon-40b-style",
        {
            "model_type": "falcon",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "num_kv_heads": 2,
            "vocab_size": 300,
            "new_decoder_architecture": True,
            "parallel_attn": True,
            "bias": False,
            "ffn_hidden_size": 200,
        },
    ),  # fmt: skip
    (
        "falcon-sequential-bias",
        {
            "model_type": "falcon",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 300,
            "multi_query": False,
            "parallel_attn": False,
            "bias": True,
        },
    ),  # fmt: skip
    ("bloom", {"model_type": "bloom", "n_embed": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300}),
    ("mixtral", _small("mixtral", num_local_experts=4, num_experts_per_tok=2)),
    (
        "qwen2_moe",
        _small(
            "qwen2_moe",
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_hidden_layers=4,
            decoder_sparse_step=2,
        ),
    ),  # fmt: skip
    (
        "qwen2_moe-dense-first",
        _small(
            "qwen2_moe",
            num_experts=4,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=40,
            num_hidden_layers=3,
            mlp_only_layers=[0],
        ),
    ),
    (
        "qwen3_moe",
        _small(
            "qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=16
        ),
    ),
    (
        "deepseek_v3",
        _small(
            "deepseek_v3",
            num_hidden_layers=3,
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=1,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=12,
            n_group=2,
            topk_group=1,
        ),
    ),  # fmt: skip
    (
        "deepseek_v3-no-q-lora-bias",
        _small(
            "deepseek_v3",
            num_hidden_layers=2,
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=12,
            n_group=1,
            topk_group=1,
            attention_bias=True,
        ),
    ),  # fmt: skip
    (
        "deepseek_v3-default-q-lora",
        _small(
            "deepseek_v3",
            num_hidden_layers=2,
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=12,
            n_group=1,
            topk_group=1,
        ),
    ),  # fmt: skip
    (
        "gpt_oss",
        _small(
            "gpt_oss", num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8
        ),
    ),
]


def test_every_registered_family_has_a_small_config():
    assert {cfg["model_type"] for _, cfg in SMALL} == set(REGISTRY)


@pytest.mark.parametrize("cfg", [c for _, c in SMALL], ids=[i for i, _ in SMALL])
def test_small_configs_count_exactly_what_transformers_builds(cfg):
    assert ours(cfg) == hf_params(cfg)


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_transformers_default_config_is_read_and_counted_exactly(model_type):
    """Every key of transformers' own default config of the family is known to the reader
    (read or ignored by name), and the count at the default width is exact (2 or 3 blocks:
    counts are linear in depth beyond the dense-first layers)."""
    cfg = transformers.AutoConfig.for_model(model_type).to_dict()
    small = with_layers(cfg, 4 if model_type == "deepseek_v3" else 2)
    assert ours(small) == hf_params(small)


def _layer_types(layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


# Real config.json values (Hugging Face Hub) and the published sizes: (total B, active B, source).
HEADLINE: dict[str, tuple[dict[str, Any], float, float, str]] = {
    "Mixtral-8x7B": (
        {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
         "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
         "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
         "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000},
        46.7, 12.9, "Jiang et al. 2024 (Mixtral of Experts), Sec. 2.1",
    ),
    "Qwen3-30B-A3B": (
        {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
         "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
         "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
         "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
         "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
         "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
         "use_sliding_window": False, "vocab_size": 151936},
        30.5, 3.3, "Qwen/Qwen3-30B-A3B model card (30.5 B total, 3.3 B activated)",
    ),
    "DeepSeek-V3": (
        {"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001, "bos_token_id": 0,
         "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
         "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
         "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
         "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
         "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
         "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
         "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
         "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
         "use_cache": True, "v_head_dim": 128, "vocab_size": 129280},
        671, 37, "DeepSeek-AI 2024 (DeepSeek-V3 Technical Report), Sec. 1: 671 B total, 37 B activated",
    ),
    "Gemma-7B": (
        {"architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 1,
         "head_dim": 256, "hidden_act": "gelu", "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 24576,
         "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 16,
         "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
         "transformers_version": "4.38.0.dev0", "use_cache": True, "vocab_size": 256000},
        8.54, 8.54, "Gemma Team 2024, Table 2: 786 M embedding + 7,751 M non-embedding parameters",
    ),
    "Llama-3.1-8B": (
        {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
         "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
         "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
         "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
         "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
         "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
         "use_cache": True, "vocab_size": 128256},
        8.03, 8.03, "meta-llama/Llama-3.1-8B (8.03 B, safetensors metadata)",
    ),
    "gpt-oss-20b": (
        {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
         "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
         "initializer_range": 0.02, "intermediate_size": 2880, "layer_types": _layer_types(24), "max_position_embeddings": 131072,
         "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
         "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
         "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn"], "quant_method": "mxfp4"}, "rms_norm_eps": 1e-05,
         "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
         "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
         "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088},
        20.91, 3.61, "OpenAI 2025, gpt-oss model card, Table 1: 20.91 B total, 3.61 B active",
    ),
    "Mistral-7B-v0.1": (
        {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
         "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
         "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
         "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0",
         "use_cache": True, "vocab_size": 32000},
        7.24, 7.24, "mistralai/Mistral-7B-v0.1 (7.24 B, safetensors metadata)",
    ),
    "Qwen2.5-7B": (
        {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
         "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072,
         "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
         "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "use_mrope": False, "vocab_size": 152064},
        7.62, 7.62, "Qwen/Qwen2.5-7B model card (7.61 B; 7.62 B in safetensors metadata)",
    ),
    "Phi-3-mini-4k": (
        {"architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0,
         "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
         "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
         "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None,
         "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "transformers_version": "4.40.2", "use_cache": True, "vocab_size": 32064},
        3.82, 3.82, "Abdin et al. 2024 (Phi-3 report): 3.8 B; 3.82 B in safetensors metadata",
    ),
    "gemma-2-9b": (
        {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": 50.0,
         "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
         "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
         "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 16,
         "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
         "rope_theta": 10000.0, "sliding_window": 4096, "sliding_window_size": 4096, "torch_dtype": "float32",
         "transformers_version": "4.42.0.dev0", "use_cache": True, "vocab_size": 256000},
        9.24, 9.24, "google/gemma-2-9b (9.24 B, safetensors metadata)",
    ),
    "falcon-7b": (
        {"alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0,
         "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 4544, "initializer_range": 0.02,
         "layer_norm_epsilon": 1e-05, "model_type": "falcon", "multi_query": True, "new_decoder_architecture": False,
         "num_attention_heads": 71, "num_hidden_layers": 32, "parallel_attn": True, "torch_dtype": "bfloat16",
         "transformers_version": "4.27.4", "use_cache": True, "vocab_size": 65024},
        6.92, 6.92, "tiiuae/falcon-7b (6.92 B, safetensors metadata)",
    ),
    "pythia-70m": (
        {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": 512,
         "initializer_range": 0.02, "intermediate_size": 2048, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
         "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 6, "rotary_emb_base": 10000, "rotary_pct": 0.25,
         "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
         "use_parallel_residual": True, "vocab_size": 50304},
        0.0704, 0.0704, "Biderman et al. 2023 (Pythia), Table 1: 70,426,624 parameters",
    ),
    "opt-125m": (
        {"_name_or_path": "facebook/opt-125m", "_remove_final_layer_norm": False, "activation_dropout": 0.0, "activation_function": "relu",
         "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2, "do_layer_norm_before": True, "dropout": 0.1,
         "eos_token_id": 2, "ffn_dim": 3072, "hidden_size": 768, "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048,
         "model_type": "opt", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "prefix": "</s>",
         "torch_dtype": "float16", "transformers_version": "4.21.0.dev0", "use_cache": True, "vocab_size": 50272, "word_embed_proj_dim": 768},
        0.125, 0.125, "facebook/opt-125m (125 M; Zhang et al. 2022, Table 1)",
    ),
    "bloom-560m": (
        {"apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "architectures": ["BloomForCausalLM"],
         "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0,
         "hidden_size": 1024, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True, "model_type": "bloom",
         "n_head": 16, "n_inner": None, "n_layer": 24, "offset_alibi": 100, "pad_token_id": 3, "pretraining_tp": 1, "skip_bias_add": True,
         "skip_bias_add_qkv": False, "slow_but_exact": False, "unk_token_id": 0, "use_cache": True, "vocab_size": 250880},
        0.559, 0.559, "bigscience/bloom-560m (559 M, Le Scao et al. 2022, Table 3)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HEADLINE))
def test_real_models_at_full_size(name):
    cfg, total_b, active_b, _source = HEADLINE[name]
    read = read_hf_config(cfg, name, "config.json")
    pc = read.spec.param_count()
    moe = read.spec.moe
    first = 1 + (moe.dense_layers if moe is not None else 0)
    one, two = hf_params(with_layers(cfg, first)), hf_params(with_layers(cfg, first + 1))
    layers = cfg[_layer_key(cfg)]
    assert pc.total == one + (layers - first) * (two - one)
    # The published total, to the digits it is published with.
    digits = len(repr(total_b).split(".")[1]) if isinstance(total_b, float) else 0
    assert round(pc.total / 1e9, digits) == total_b, pc.total
    # Active counts are published under differing conventions (gpt-oss leaves the embedding
    # table out, a lookup); within 2 %.
    active = pc.active - (pc.embedding if name == "gpt-oss-20b" else 0)
    assert abs(active / 1e9 - active_b) / active_b < 0.02


def test_moe_configs_are_read_into_moe_spec():
    mixtral = read_hf_config(HEADLINE["Mixtral-8x7B"][0], "m", "config.json").spec.moe
    assert (mixtral.experts, mixtral.top_k, mixtral.expert_ffn_hidden) == (8, 2, 14336)
    ds = read_hf_config(HEADLINE["DeepSeek-V3"][0], "m", "config.json").spec
    assert (ds.moe.experts, ds.moe.shared_experts, ds.moe.dense_layers, ds.ffn_hidden) == (
        256,
        1,
        3,
        18432,
    )
    assert ds.mla.kv_lora_rank == 512 and ds.mla.q_lora_rank == 1536
    qwen = read_hf_config(SMALL[[i for i, _ in SMALL].index("qwen2_moe")][1], "m", "c").spec.moe
    assert (qwen.layer_interval, qwen.shared_expert_gate, qwen.shared_ffn_hidden) == (2, True, 48)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "alibi": True},
         "alibi=True is not supported for model_type 'falcon'"),
        ({**SMALL[14][1], "do_layer_norm_before": False}, "do_layer_norm_before=False is not supported"),
        ({**SMALL[14][1], "word_embed_proj_dim": 32}, "word_embed_proj_dim=32 is not supported"),
        ({**SMALL[18][1], "apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm=True"),
        (_small("qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[0]), "mlp_only_layers=[0] is not supported with decoder_sparse_step=2"),
        (_small("llama", my_new_feature=1), "field 'my_new_feature' is not known for model_type 'llama'"),
        ({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "vocab_size": 300, "n_positions": 64}, "missing required field 'n_embd'"),
        (_small("t5"), "model_type='t5' is not supported; use one of llama|mistral|"),
        (_small("llama", is_encoder_decoder=True), "is_encoder_decoder=True is not supported"),
    ],
)  # fmt: skip
def test_what_cannot_be_priced_is_refused_naming_the_field(cfg, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_hf_config(cfg, "m", "config.json")
