"""Which ModelSpec architecture features the cost model prices, and how.

Owns: `FEATURES` (every ModelSpec field beyond the GPT/Llama core, with its cost treatment
and the reason), `features_set(model)` (the ones a spec uses), and `check_priceable(model)`,
which `plan`, `estimate`, `profile` and `validate` call on the model they load: it refuses
(SpecError naming the field) a feature whose cost the model would get wrong, and returns one
note per feature priced conservatively or approximately.
Does not own: what the executor builds (executor/support.py reads `features_set` and refuses
what it does not implement), or MoE (`ModelSpec.moe` is priced by the MoE cost model).

Treatments:
- `conservative`: priced as the plain architecture, which costs at least as much (a sliding
  window priced as full causal attention; a parallel block as a sequential one);
- `params`: only parameters change; the memory model's own count misses them, so the feature
  is accepted when the missed elements are under PARAMS_TOLERANCE of the model and said so;
- `refused`: saved activations or the attention kernel differ from what is priced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from types import MappingProxyType
from typing import Any

from planner.errors import SpecError
from planner.specs import Activation, ModelSpec, PositionKind

# Largest fraction of the model's parameters a `params` feature may leave out of the memory
# model (planner/cost/memory.py counts q/k/v/o/MLP/norm elements itself): 0.1 %, the parity
# tolerance of issue #15 and below the memory model's measured error (1 % mean, memcheck grid).
PARAMS_TOLERANCE = 1e-3

CONSERVATIVE = "conservative"
PARAMS = "params"
REFUSED = "refused"


@dataclass(frozen=True, kw_only=True)
class Feature:
    field: str
    treatment: str
    why: str


FEATURES: tuple[Feature, ...] = (
    Feature(
        field="activation",
        treatment=CONSERVATIVE,
        why="an elementwise nonlinearity priced as the MLP's own; it saves the same "
        "f-wide input for backward (ReLU could save less)",
    ),
    Feature(field="out_bias", treatment=PARAMS, why="bias elements only"),
    Feature(field="mlp_bias", treatment=PARAMS, why="bias elements only"),
    Feature(field="position_offset", treatment=PARAMS, why="extra rows of the position table"),
    Feature(
        field="scaled_embedding",
        treatment=CONSERVATIVE,
        why="one multiplication by a constant, which saves nothing for backward",
    ),
    Feature(
        field="rope_fraction",
        treatment=CONSERVATIVE,
        why="priced as rotating every dimension of a head",
    ),
    Feature(
        field="parallel_block",
        treatment=CONSERVATIVE,
        why="priced as a sequential block: the same matrices, one norm more or as many",
    ),
    Feature(field="shared_block_norm", treatment=CONSERVATIVE, why="priced as two norms"),
    Feature(
        field="sliding_window",
        treatment=CONSERVATIVE,
        why="flash attention priced over the window in the blocks that have it (their mean "
        "over all blocks); memory as full flash attention (the same); context parallelism and "
        "materialised attention priced over the full causal square",
    ),
    Feature(field="sliding_layers", treatment=CONSERVATIVE, why="see sliding_window"),
    Feature(
        field="qk_norm",
        treatment=REFUSED,
        why="the q/k norms' saved activations are not priced",
    ),
    Feature(
        field="post_norms",
        treatment=REFUSED,
        why="the two extra norms per block and their saved activations are not priced",
    ),
    Feature(
        field="embedding_norm",
        treatment=REFUSED,
        why="the embedding norm's saved activations are not priced",
    ),
    Feature(
        field="attn_logit_softcap",
        treatment=REFUSED,
        why="soft-capped scores need an attention kernel other than the flash attention priced",
    ),
    Feature(
        field="final_logit_softcap",
        treatment=REFUSED,
        why="soft-capping the logits keeps another vocabulary-wide tensor for backward",
    ),
    Feature(
        field="attention_sinks",
        treatment=REFUSED,
        why="attention with sink logits needs a kernel other than the flash attention priced",
    ),
    Feature(
        field="mla",
        treatment=REFUSED,
        why="multi-head latent attention's projections and saved latents are not priced",
    ),
)
_BY_FIELD: Mapping[str, Feature] = MappingProxyType({f.field: f for f in FEATURES})
# Values that are refused although the field itself is priced.
_REFUSED_VALUES: Mapping[tuple[str, Enum], str] = MappingProxyType(
    {
        ("activation", Activation.SWIGLU_CLAMP): "gpt-oss's clamped SwiGLU saves other tensors "
        "than the SwiGLU priced",
    }
)


def features_set(model: ModelSpec) -> tuple[str, ...]:
    """The FEATURES fields `model` sets to something other than their defaults."""
    out = []
    for f in fields(ModelSpec):
        if f.name in _BY_FIELD and getattr(model, f.name) != f.default:
            out.append(f.name)
    return tuple(out)


def _plain(model: ModelSpec, names: tuple[str, ...]) -> ModelSpec:
    defaults: dict[str, Any] = {f.name: f.default for f in fields(ModelSpec) if f.name in names}
    return replace(model, **defaults)


def check_priceable(model: ModelSpec) -> tuple[str, ...]:
    """Notes on features priced conservatively or approximately; SpecError for the first
    feature the cost model would get wrong (naming the field and why)."""
    owner = f"model '{model.name}'"
    for (name, value), why in _REFUSED_VALUES.items():
        if getattr(model, name) == value:
            raise SpecError(f"{owner}: {name}={value.value} cannot be priced yet: {why}")
    used = features_set(model)
    for name in used:
        feature = _BY_FIELD[name]
        if feature.treatment == REFUSED:
            raise SpecError(f"{owner}: {name} cannot be priced yet: {feature.why}")
    notes = [
        f"{name}: {_BY_FIELD[name].why}"
        for name in used
        if _BY_FIELD[name].treatment == CONSERVATIVE and name != "sliding_layers"
    ]
    if model.position is PositionKind.ALIBI:
        # the calibration's llm-foundry MPT rows ran ALiBi inside Triton flash attention
        notes.append(
            "position=alibi: priced as parameter-free positions with the bias added inside "
            "the flash-attention kernel (as llm-foundry's calibration rows ran it)"
        )
    param_only = tuple(n for n in used if _BY_FIELD[n].treatment == PARAMS)
    if param_only:
        total = model.param_count().total
        missed = total - _plain(model, param_only).param_count().total
        share = missed / total
        if share > PARAMS_TOLERANCE:
            raise SpecError(
                f"{owner}: {', '.join(param_only)} add {missed:,} parameters "
                f"({share:.3%}) that the memory model does not count (tolerance "
                f"{PARAMS_TOLERANCE:.1%})"
            )
        notes.append(
            f"{', '.join(param_only)}: {missed:,} parameters ({share:.4%}) not in the memory "
            "model's count"
        )
    return tuple(notes)
