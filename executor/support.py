"""What the executor builds: the one check that it never trains a different model than planned.

Owns: `EXECUTOR_FEATURES` (the ModelSpec architecture features executor/model.py implements)
and `check_buildable(spec)`, called by `TransformerBlock.__init__` (the model and the
profiler's timed blocks are built from it), which refuses (SpecError naming
the fields) a spec using any other feature of planner/model_support.py, so that a Gemma 2 or
DeepSeek-V3 spec is never silently built as a Llama.
Does not own: MoE (`ModelSpec.moe` is built by the MoE executor), or what the cost model
prices (planner/model_support.py).
"""

from __future__ import annotations

from planner.errors import SpecError
from planner.model_support import features_set
from planner.specs import ModelSpec, PositionKind

# Features of planner/model_support.FEATURES that executor/model.py builds. None yet: it
# builds GPT (learned positions, LayerNorm, GELU-tanh MLP, biases) and Llama (RoPE, RMSNorm,
# SwiGLU, optional q/k/v biases) blocks, tied or untied, with grouped-query attention.
EXECUTOR_FEATURES: frozenset[str] = frozenset()


def check_buildable(spec: ModelSpec) -> None:
    """SpecError when `spec` uses a feature executor/model.py does not implement."""
    missing = [f for f in features_set(spec) if f not in EXECUTOR_FEATURES]
    if spec.position is PositionKind.ALIBI:
        missing.insert(0, "position=alibi")
    if spec.moe is not None and spec.moe.router_bias:
        missing.append("moe.router_bias")  # executor/moe.py's router is bias-free
    if missing:
        raise SpecError(
            f"model '{spec.name}': the executor does not build {', '.join(missing)}; it builds "
            "GPT and Llama blocks (learned or rotary positions, LayerNorm or RMSNorm, GELU or "
            "SwiGLU MLP, biases, grouped-query attention)"
        )
