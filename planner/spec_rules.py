"""What every spec checks its fields against: input bounds, the shared enums and the checks.

Owns: the bounds that refuse a typo at once (`MODEL_LIMITS`, the batch and cluster limits),
the enums specs use (MLP, norm, position, activation, dtype, device kind), the field checks
that raise `SpecError` naming the field, the value and what is allowed, and the memory
headroom rule. Does not own: the specs themselves (planner/model_spec.py, planner/specs.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType

from planner.errors import SpecError

# Input bounds, far above any real model or cluster, so that a typo (`num_hidden_layers:
# 1000000`) is refused at once instead of making the search run for minutes. Largest published
# dense decoders: PaLM-540B 118 layers, FFN 73,728 (Chowdhery et al. 2022, Table 1); MT-NLG-530B
# hidden 20,480, 128 heads, FFN 81,920 (Smith et al. 2022, Table 1); Llama-3.1-405B 126 layers
# (Dubey et al. 2024, Table 3). Field -> (limit, what the largest real model has).
MODEL_LIMITS: Mapping[str, tuple[int, str]] = MappingProxyType(
    {
        # 2,000, not more: the search's memory floor is O(layers * pp) per candidate, and a
        # 2,000-layer model on 128 GPUs already takes ~30 s to plan (10,000: ~3 minutes).
        # The deepest published research model, DeepNet, has 1,000 layers (Wang et al. 2022).
        "layers": (2_000, "PaLM-540B has 118 layers"),
        "hidden": (1_000_000, "MT-NLG-530B has hidden 20,480"),
        "heads": (10_000, "Llama-3.1-405B has 128 heads"),
        "kv_heads": (10_000, "MT-NLG-530B has 128 KV heads"),
        # Gemma Team 2024, Table 1.
        "head_dim": (10_000, "Gemma 7B has head_dim 256"),
        "ffn_hidden": (10_000_000, "MT-NLG-530B has ffn_hidden 81,920"),
        # Gemma Team 2025 (Gemma 3); PaLM has 256k.
        "vocab": (10_000_000, "Gemma 3 has a vocabulary of 262,144"),
        # meta-llama/Llama-4-Scout-17B-16E config.json, max_position_embeddings.
        "max_seq_len": (1_000_000_000, "Llama 4 Scout has 10,485,760 positions"),
    }
)
# Sequences per optimizer step. DeepSeek-V3 ramps to 15,360 (DeepSeek-AI 2024, Sec. 4.2),
# Llama 3 405B uses 2,048 of 8,192 tokens (Dubey et al. 2024, Sec. 3.4.1); the search
# enumerates the divisors of global_batch / dp, one Python loop over that range per (tp, pp).
MAX_GLOBAL_BATCH = 1_000_000
# GPUs in one cluster: the largest training runs published used 16,384 H100s (Llama 3,
# Dubey et al. 2024, Sec. 3.3.1) of Meta's 24,576-GPU clusters (Meta engineering blog, 2024).
MAX_CLUSTER_GPUS = 1_000_000
# GPUs in one node (one intra-node link class): an NVL72 rack is 72 GPUs in one NVLink
# domain (NVIDIA GB200 NVL72 datasheet, 2024), NVL576 the largest announced (NVIDIA GTC 2025).
# With a measured p2p profile, placement builds each node's complete link graph, O(gpus^2):
# ~10 s for a 1,024-GPU node.
MAX_GPUS_PER_NODE = 1_024
# Fraction of memory_bytes a plan leaves free when a GPU does not give usable_memory_bytes.
# A device exposes less than nominal (H100 80GB: 81,559 of 81,920 MiB, per NVML/nvidia-smi,
# Modal "GPU memory capacity" table, 2024), the CUDA caching allocator rounds and splits
# blocks out of 2 MiB / 20 MiB segments so reserved exceeds allocated (PyTorch "CUDA
# semantics: memory management"), and the memory model's own terms (framework reserve,
# activation fragmentation, in planner/cost/memory.py) are estimates. 5 % of 80 GiB = 4 GiB
# covers the 0.35 GiB exposure gap and a few GiB of allocator slack. The same default holds for
# CPU workers: glibc malloc keeps freed chunks in per-thread arenas (mallopt(3), M_ARENA_MAX),
# so resident memory also exceeds live tensors, and the host's other processes share it.
DEFAULT_MEMORY_HEADROOM = 0.05


class MlpKind(str, Enum):
    """`gelu`: 2-matrix MLP (GPT); `swiglu`: gated 3-matrix MLP (Llama)."""

    GELU = "gelu"
    SWIGLU = "swiglu"


class NormKind(str, Enum):
    """`layernorm` has weight and bias; `rmsnorm` has a weight only."""

    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"


class PositionKind(str, Enum):
    """`learned`: a (max_seq_len x hidden) table (GPT); `rope`: rotary, no parameters (Llama);
    `alibi`: linear biases on the attention scores, no parameters (Press et al. 2022; MPT,
    BLOOM). The executor builds learned and rope only."""

    LEARNED = "learned"
    ROPE = "rope"
    ALIBI = "alibi"


class Activation(str, Enum):
    """The MLP nonlinearity, given where it is not the MlpKind's own (`gelu`: GELU with the tanh
    approximation; `swiglu`: SiLU gate). The structure (gated or 2-matrix) stays `mlp`'s.

    `gelu_erf`: exact GELU (Falcon, GPT-NeoX); `gelu_tanh`; `silu`; `relu` (OPT);
    `swiglu_clamp`: gpt-oss's clamped gate `x * sigmoid(1.702 x)` with (up + 1), limit 7.
    """

    GELU_ERF = "gelu_erf"
    GELU_TANH = "gelu_tanh"
    SILU = "silu"
    RELU = "relu"
    SWIGLU_CLAMP = "swiglu_clamp"


class Dtype(str, Enum):
    """Element types. FP8 (E4M3/E5M2) is a GEMM input type only: a training runs its linears in
    it (`TrainingSpec.fp8_linears`) with bf16 everywhere else, never as its dtype."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    FP8 = "fp8"

    @property
    def nbytes(self) -> int:
        return {Dtype.FP32: 4, Dtype.FP8: 1}.get(self, 2)


class DeviceKind(str, Enum):
    """`cpu` lets a host's CPU processes be planned for and tested end to end without a GPU."""

    GPU = "gpu"
    CPU = "cpu"


def enum_field(cls: type[Enum], field_name: str, value: object) -> Enum:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        allowed = "|".join(str(m.value) for m in cls)
        raise SpecError(f"{field_name}={value!r} is not allowed; use one of {allowed}") from None


def is_number(value: object) -> bool:
    """A real, finite number; bools are not numbers here (YAML reads `yes` as True)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # ints beyond the float range (a 400-digit YAML number) are not usable numbers either
    return abs(value) < 2**1023 if isinstance(value, int) else math.isfinite(value)


def check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not is_number(value) or value <= 0:
            raise SpecError(f"{owner}.{name}={value!r} must be a finite number > 0")


def int_hint(value: object) -> str:
    """A hint for an integral float given where an integer is needed (refused everywhere)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return f"; write {int(value)}, not {value!r}"
    return ""


def check_positive_int(owner: str, **values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SpecError(f"{owner}.{name}={value!r} must be a positive integer{int_hint(value)}")


def check_bools(owner: str, **values: object) -> None:
    for name, value in values.items():
        if not isinstance(value, bool):
            raise SpecError(f"{owner}.{name}={value!r} must be true or false")


def check_at_most(shown_as: str, value: int, limit: int, why: str) -> None:
    if value > limit:
        raise SpecError(f"{shown_as}={value:,} exceeds the limit of {limit:,} ({why})")


def check_model_limit(shown_as: str, field_name: str, value: int) -> None:
    """SpecError when ModelSpec field `field_name` is above its MODEL_LIMITS bound; `shown_as`
    names the value in the message (a ModelSpec field or a config.json key)."""
    limit, largest = MODEL_LIMITS[field_name]
    why = f"among the largest published models, {largest}; more is almost surely a typo"
    check_at_most(shown_as, value, limit, why)


def check_cluster_size(shown_as: str, gpus: int) -> None:
    """SpecError above MAX_CLUSTER_GPUS (loaders call it before building the node list)."""
    why = "the largest published training clusters have ~25,000 GPUs; planning time grows with it"
    check_at_most(f"{shown_as}: GPU count", gpus, MAX_CLUSTER_GPUS, why)


def bytes_after_headroom(memory_bytes: int, fraction: float) -> int:
    """`memory_bytes` less `fraction` of it in whole bytes (>= 1 for fraction < 1)."""
    return memory_bytes - math.floor(memory_bytes * fraction)


def check_headroom(fraction: object) -> float:
    """A memory headroom fraction in [0, 1) as a float; SpecError otherwise."""
    if not is_number(fraction) or not 0 <= fraction < 1:  # type: ignore[operator]
        raise SpecError(
            f"memory_headroom={fraction!r} must be a fraction in [0, 1) of each GPU's "
            "memory_bytes (0.05 keeps 5 % free)"
        )
    return float(fraction)  # type: ignore[arg-type]
