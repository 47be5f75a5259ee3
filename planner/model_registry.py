"""The strict registry from a Hugging Face `model_type` to the reader of its config.json.

Owns: `REGISTRY` (model_type -> description and reader), `read_hf_config`, and the keys every
family ignores (`NUMERIC_IGNORED`). The readers (planner/hf_dense.py, planner/hf_moe.py) map
every config key that changes parameters, compute or memory onto ModelSpec fields exactly as
transformers' modeling code builds the model (transformers 5.x
`models/<family>/modeling_<family>.py`; tests/test_hf_parity.py builds each family on the meta
device and compares parameter counts), name the keys they ignore as irrelevant to cost, and
refuse (one SpecError naming the key) what meshplan cannot price.
Does not own: the key bookkeeping (planner/hf_config.py), which features the cost model prices
or the executor builds (planner/model_support.py), or meshplan's own model YAML (planner/hf.py).

Defaults of absent keys are those of transformers' config classes (`LlamaConfig` etc.), since
that is what `from_pretrained` would build; the core sizes (layers, hidden, heads, FFN, vocab,
positions) are required.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from planner import hf_dense, hf_moe
from planner.errors import SpecError
from planner.hf_config import HfConfig, Reader
from planner.specs import ModelSpec

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


# model_type -> (what it is, reader). The descriptions are what `model show` prints.
REGISTRY: Mapping[str, tuple[str, Reader]] = MappingProxyType(
    {**hf_dense.FAMILIES, **hf_moe.FAMILIES}
)


def read_hf_config(cfg: Any, name: str, origin: str) -> ReadModel:
    """The ModelSpec of a config.json, or one SpecError naming the key it cannot price."""
    if not isinstance(cfg, dict):
        raise SpecError(f"{origin}: expected a JSON object")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in REGISTRY:
        raise SpecError(
            f"{origin}: model_type={model_type!r} is not supported; use one of {'|'.join(REGISTRY)}"
        )
    c = HfConfig(cfg, origin, model_type)
    c.ignore(*NUMERIC_IGNORED)
    fields = REGISTRY[model_type][1](c)
    ignored = c.finish()
    try:
        spec = ModelSpec(name=name, **fields)
    except SpecError as e:
        raise SpecError(f"{origin}: {e}") from None
    return ReadModel(spec=spec, family=model_type, ignored=ignored, notes=tuple(c.notes))
