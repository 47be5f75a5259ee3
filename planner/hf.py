"""Build a ModelSpec from a Hugging Face `config.json` or from meshplan's own model fields.

Owns: the mapping of Llama/Mistral/Qwen and GPT-2 config names onto ModelSpec (with errors
that name the config.json key), and the `family` shorthand used by model presets and model
YAML files (whose unknown keys are refused).
"""

from __future__ import annotations

from typing import Any

from planner.errors import SpecError, did_you_mean
from planner.specs import (
    MlpKind,
    ModelSpec,
    NormKind,
    PositionKind,
    check_model_limit,
    int_hint,
)

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


def _build(origin: str, fields: dict[str, Any]) -> ModelSpec:
    """ModelSpec(**fields), its errors prefixed with the file they came from."""
    try:
        return ModelSpec(**fields)
    except SpecError as e:
        raise SpecError(f"{origin}: {e}") from None


def model_from_fields(name: str, fields: dict[str, Any], origin: str) -> ModelSpec:
    """ModelSpec from meshplan's own field names, with an optional `family: gpt|llama`."""
    data = dict(fields)
    family = data.pop("family", None)
    if family is not None and (not isinstance(family, str) or family not in FAMILY_DEFAULTS):
        raise SpecError(f"{origin}: family={family!r} is not allowed; use one of gpt|llama")
    unknown = sorted((str(k) for k in set(data) - _SPEC_FIELDS), key=str)
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
        if isinstance(merged["hidden"], bool) or not isinstance(merged["hidden"], int):
            raise SpecError(f"{origin}: hidden={merged['hidden']!r} must be a positive integer")
        merged["ffn_hidden"] = 4 * merged["hidden"]
    missing = [
        f
        for f in ("layers", "hidden", "heads", "vocab", "max_seq_len", "ffn_hidden")
        if f not in merged
    ]
    if missing:
        raise SpecError(f"{origin}: missing required model field '{missing[0]}'")
    return _build(origin, merged)


def _get(cfg: dict[str, Any], origin: str, *names: str, default: Any = ...) -> Any:
    return _get_named(cfg, origin, *names, default=default)[1]


def _get_named(
    cfg: dict[str, Any], origin: str, *names: str, default: Any = ...
) -> tuple[str, Any]:
    """(the config.json key found, its value): the first of `names` present and not null."""
    for n in names:
        if n in cfg and cfg[n] is not None:
            return n, cfg[n]
    if default is ...:
        raise SpecError(f"{origin}: missing required field '{names[0]}' in config.json")
    return names[0], default


def _size(origin: str, key: str, value: Any, field_name: str) -> int:
    """A config.json size: an integer (not a bool, not 4096.0) within ModelSpec's bound."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{origin}: {key}={value!r} must be a positive integer{int_hint(value)}")
    check_model_limit(f"{origin}: {key}", field_name, value)
    return value


def _flag(origin: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{origin}: {key}={value!r} must be true or false")
    return value


def model_from_hf_config(cfg: dict[str, Any], name: str, origin: str) -> ModelSpec:
    """ModelSpec from a Hugging Face config.json (Llama/Mistral/Qwen or GPT-2 names).

    `hidden_act` gelu* means a 2-matrix MLP, silu/swiglu a gated 3-matrix MLP. A nested
    `text_config` (multimodal wrappers) is used when present. GPT-2's `n_inner: null` means
    4 * hidden. Sizes must be JSON integers within ModelSpec's bounds (`MODEL_LIMITS`);
    errors name the config.json key.
    """
    if not isinstance(cfg, dict):
        raise SpecError(f"{origin}: expected a JSON object")
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    gpt2 = "n_embd" in cfg or cfg.get("model_type") == "gpt2"

    def size(field_name: str, *names: str, default: Any = ...) -> int:
        key, value = _get_named(cfg, origin, *names, default=default)
        return _size(origin, key, value, field_name)

    hidden = size("hidden", "hidden_size", "n_embd")
    heads = size("heads", "num_attention_heads", "n_head")
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
    if _get(cfg, origin, "intermediate_size", "n_inner", default=None) is not None:
        ffn = size("ffn_hidden", "intermediate_size", "n_inner")
    elif mlp is not MlpKind.GELU:
        raise SpecError(f"{origin}: missing required field 'intermediate_size' in config.json")
    else:
        ffn = 4 * hidden
    family = "gpt" if gpt2 else "llama"
    tie_key, tie = _get_named(cfg, origin, "tie_word_embeddings", default=gpt2)
    fields: dict[str, Any] = {
        **FAMILY_DEFAULTS[family],
        "name": name,
        "layers": size("layers", "num_hidden_layers", "n_layer"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": size("kv_heads", "num_key_value_heads", default=heads),
        "ffn_hidden": ffn,
        "vocab": size("vocab", "vocab_size"),
        "max_seq_len": size("max_seq_len", "max_position_embeddings", "n_positions", "n_ctx"),
        "mlp": mlp,
        "tied_embeddings": _flag(origin, tie_key, tie),
    }
    if cfg.get("head_dim"):
        fields["head_dim"] = size("head_dim", "head_dim")
    if not gpt2:
        given = cfg.get("attention_bias")
        bias = given is not None and _flag(origin, "attention_bias", given)
        fields["qkv_bias"] = bias or cfg.get("model_type") in ("qwen2", "qwen2_moe")
    return _build(origin, fields)
