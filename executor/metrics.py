"""Per-step training metrics: throughput, model FLOPs utilisation, memory; JSONL + console line.

Owns: `model_flops_per_token`, `StepMetrics` and `MetricsLog`. Does not own: timing (train.py
measures the step) or what the planner predicted (the plan's `prediction`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from planner.plan import Plan
from planner.specs import ModelSpec


def model_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_matmul + 12 * L * heads * head_dim * seq_len.

    PaLM (Chowdhery et al. 2022, Appendix B), as in nanoGPT's `estimate_mfu`: 6 FLOPs per
    matmul parameter per token (forward 2, backward 4) plus the attention score/value matmuls.
    N_matmul counts the blocks (of an MoE block the router, shared and top_k routed experts) and the LM head matrix (a tied head still multiplies) and leaves
    out the embedding and position tables, which are lookups. Recomputation is not counted
    (MFU, not hardware FLOPs utilisation).
    """
    pc = spec.param_count()
    # MoE: a token multiplies its top_k routed experts only (ParamCount.routed_active).
    n_matmul = pc.blocks - pc.routed_experts + pc.routed_active + spec.vocab * spec.hidden
    return 6.0 * n_matmul + 12.0 * spec.layers * spec.heads * spec.head_dim * seq_len


def cluster_peak_flops(plan: Plan) -> float:
    """Sum of the datasheet peaks of every GPU in the plan at the training dtype
    (nominal figures for CPU workers, so CPU MFU is an estimate)."""
    return sum(plan.cluster.gpu_of(e.gpu_id).peak_flops(plan.training.dtype) for e in plan.ranks)


@dataclass(frozen=True, kw_only=True)
class StepMetrics:
    """One optimizer step. `peak_memory_bytes` is the maximum over ranks (GPU: allocated device
    memory; CPU: peak resident set size of the process)."""

    step: int
    loss: float
    step_time_s: float
    tokens_per_s: float
    mfu: float
    peak_memory_bytes: int
    tokens: int
    lr: float
    # MoE: the load-balancing losses summed over layers, mean over micro-batches and dp ranks
    # (executor/moe.py); already part of the gradient, not of `loss`. None for dense models.
    aux_loss: float | None = None


class MetricsLog:
    """Appends one JSON line per step to `path` (when given) and prints a rich line to stderr;
    only where `enabled` (rank 0)."""

    def __init__(self, path: str | Path | None, *, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(path) if path else None
        self.console = Console(stderr=True)
        if self.enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, m: StepMetrics) -> None:
        if not self.enabled:
            return
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(asdict(m)) + "\n")
        self.console.print(
            f"[bold]step {m.step}[/]  loss [cyan]{m.loss:.5f}[/]  {m.step_time_s:.3f} s  "
            f"{m.tokens_per_s:,.0f} tok/s  mfu {100 * m.mfu:.2f}%  "
            f"peak mem {m.peak_memory_bytes / 2**20:,.1f} MiB"
            + ("" if m.aux_loss is None else f"  aux {m.aux_loss:.5f}"),
            highlight=False,
        )
