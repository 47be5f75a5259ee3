"""Build a ModelSpec from a Hugging Face `config.json` or from meshplan's own model fields.

Owns: the entry point for Hugging Face configs (`model_from_hf_config`, which reads them
through the strict registry of planner/model_registry.py), and the `family` shorthand used by
model presets and model YAML files (whose unknown keys are refused).
"""

from __future__ import annotations

from typing import Any

from planner.errors import SpecError, did_you_mean
from planner.model_registry import read_hf_config
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


def model_from_hf_config(cfg: Any, name: str, origin: str) -> ModelSpec:
    """ModelSpec from a Hugging Face config.json, through the strict registry keyed by
    `model_type` (planner/model_registry.py): an unknown family, an unknown key or a feature
    meshplan cannot price is one SpecError naming it. Sizes must be JSON integers within
    ModelSpec's bounds (`MODEL_LIMITS`)."""
    return read_hf_config(cfg, name, origin).spec
