"""Build a ModelSpec from a Hugging Face `config.json` or from meshplan's own model fields.

Owns: the mapping of Llama/Mistral/Qwen and GPT-2 config names onto ModelSpec, and the
`family` shorthand used by model presets and model YAML files.
"""

from __future__ import annotations

from typing import Any

from planner.errors import SpecError, did_you_mean
from planner.specs import MlpKind, ModelSpec, NormKind, PositionKind

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # GPT-2/3: learned positions, LayerNorm, 2-matrix GELU MLP, biases, tied embeddings
    # (Radford et al. 2019; Brown et al. 2020).
    "gpt": {
        "mlp": MlpKind.GELU,
        "norm": NormKind.LAYERNORM,
        "position": PositionKind.LEARNED,
        "bias": True,
        "tied_embeddings": True,
    },
    # Llama: RoPE, RMSNorm, SwiGLU, no biases, separate head (Touvron et al. 2023).
    "llama": {
        "mlp": MlpKind.SWIGLU,
        "norm": NormKind.RMSNORM,
        "position": PositionKind.ROPE,
        "bias": False,
        "tied_embeddings": False,
    },
}

_SPEC_FIELDS = set(ModelSpec.__dataclass_fields__)


def model_from_fields(name: str, fields: dict[str, Any], origin: str) -> ModelSpec:
    """ModelSpec from meshplan's own field names, with an optional `family: gpt|llama`."""
    data = dict(fields)
    family = data.pop("family", None)
    if family is not None and family not in FAMILY_DEFAULTS:
        raise SpecError(f"{origin}: family={family!r} is not allowed; use one of gpt|llama")
    unknown = sorted(set(data) - _SPEC_FIELDS)
    if unknown:
        raise SpecError(
            f"{origin}: unknown model field '{unknown[0]}'{did_you_mean(unknown[0], _SPEC_FIELDS)}; "
            f"allowed: {', '.join(sorted(_SPEC_FIELDS - {'name'}))}, family"
        )
    merged: dict[str, Any] = {**FAMILY_DEFAULTS.get(family or "gpt", {}), **data}
    merged.setdefault("name", name)
    merged.setdefault("kv_heads", merged.get("heads"))
    if (
        "hidden" in merged
        and "ffn_hidden" not in merged
        and merged.get("mlp") in (MlpKind.GELU, "gelu")
    ):
        merged["ffn_hidden"] = 4 * merged["hidden"]
    missing = [
        f
        for f in ("layers", "hidden", "heads", "vocab", "max_seq_len", "ffn_hidden")
        if f not in merged
    ]
    if missing:
        raise SpecError(f"{origin}: missing required model field '{missing[0]}'")
    return ModelSpec(**merged)


def _get(cfg: dict[str, Any], origin: str, *names: str, default: Any = ...) -> Any:
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    if default is ...:
        raise SpecError(f"{origin}: missing required field '{names[0]}' in config.json")
    return default


def model_from_hf_config(cfg: dict[str, Any], name: str, origin: str) -> ModelSpec:
    """ModelSpec from a Hugging Face config.json (Llama/Mistral/Qwen or GPT-2 names).

    `hidden_act` gelu* means a 2-matrix MLP, silu/swiglu a gated 3-matrix MLP. A nested
    `text_config` (multimodal wrappers) is used when present. GPT-2's `n_inner: null` means
    4 * hidden.
    """
    if not isinstance(cfg, dict):
        raise SpecError(f"{origin}: expected a JSON object")
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    gpt2 = "n_embd" in cfg or cfg.get("model_type") == "gpt2"
    hidden = _get(cfg, origin, "hidden_size", "n_embd")
    heads = _get(cfg, origin, "num_attention_heads", "n_head")
    act = str(
        _get(
            cfg, origin, "hidden_act", "activation_function", default="gelu_new" if gpt2 else "silu"
        )
    )
    if act.startswith("gelu"):
        mlp = MlpKind.GELU
    elif act in ("silu", "swiglu", "swish"):
        mlp = MlpKind.SWIGLU
    else:
        raise SpecError(f"{origin}: hidden_act={act!r} is not supported; use gelu*, silu or swiglu")
    ffn = _get(cfg, origin, "intermediate_size", "n_inner", default=None)
    if ffn is None:
        if mlp is not MlpKind.GELU:
            raise SpecError(f"{origin}: missing required field 'intermediate_size' in config.json")
        ffn = 4 * hidden
    family = "gpt" if gpt2 else "llama"
    fields: dict[str, Any] = {
        **FAMILY_DEFAULTS[family],
        "name": name,
        "layers": _get(cfg, origin, "num_hidden_layers", "n_layer"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": _get(cfg, origin, "num_key_value_heads", default=heads),
        "ffn_hidden": ffn,
        "vocab": _get(cfg, origin, "vocab_size"),
        "max_seq_len": _get(cfg, origin, "max_position_embeddings", "n_positions", "n_ctx"),
        "mlp": mlp,
        "tied_embeddings": bool(_get(cfg, origin, "tie_word_embeddings", default=gpt2)),
    }
    if cfg.get("head_dim"):
        fields["head_dim"] = cfg["head_dim"]
    if not gpt2:
        fields["qkv_bias"] = bool(cfg.get("attention_bias", False)) or cfg.get("model_type") in (
            "qwen2",
            "qwen2_moe",
        )
    for key in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "max_seq_len"):
        if isinstance(fields[key], bool) or not isinstance(fields[key], int):
            raise SpecError(f"{origin}: {key}={fields[key]!r} must be an integer")
    return ModelSpec(**fields)
