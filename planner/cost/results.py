"""The cost model's result types: one step's time by part, memory by kind per pipeline rank,
throughput, and the `meshplan estimate --json` object they serialise to.

Owns: `Estimate`, `TimeBreakdown`, `MemoryBreakdown`, `StageEstimate` and their JSON. Does not
own: how they are computed (estimate.py) or corrected (corrections.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TimeBreakdown:
    """Seconds of one step on the critical rank; the fields sum to the step time."""

    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    bubble_s: float
    optimizer_s: float
    # MoE dispatch + combine all-to-all on the EP group (in the JSON only when non-zero, so
    # dense estimates and plans keep their bytes; calibration corrections leave it unscaled)
    ep_comm_s: float = 0.0
    # context-parallel collectives (planner/cost/cp.py); in the JSON only when cp > 1
    cp_comm_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Bytes on one GPU by kind; `other` = framework reserve, allocator fragmentation,
    transient buffers (recompute working set, ZeRO-3 gathers, p2p buffers)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    other: float


@dataclass(frozen=True, kw_only=True)
class StageEstimate:
    pp_rank: int
    layers: int
    time_s: float
    memory_bytes: float
    capacity_bytes: float
    memory: MemoryBreakdown


@dataclass(frozen=True, kw_only=True)
class Estimate:
    step_time_s: float
    tokens_per_s: float
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float
    peak_memory_bytes: float
    memory_capacity_bytes: float
    fits: bool
    source: str
    breakdown: TimeBreakdown
    memory_breakdown: MemoryBreakdown
    stages: tuple[StageEstimate, ...]
    notes: tuple[str, ...]
    # Set when the profile carries calibration corrections (planner/cost/corrections.py).
    uncorrected_step_time_s: float | None = None
    corrections: dict[str, Any] | None = None
    # Analytic path only (None when measured): inside the calibration's envelope, and why not
    # (planner/cost/regime.py).
    calibrated_regime: bool | None = None
    regime_reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        def mem(b: MemoryBreakdown) -> dict[str, float]:
            return {
                k: getattr(b, k) for k in ("weights", "grads", "optimizer", "activations", "other")
            }

        return {
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "model_tflops_per_gpu": self.model_tflops_per_gpu,
            "hardware_tflops_per_gpu": self.hardware_tflops_per_gpu,
            "mfu": self.mfu,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_capacity_bytes": self.memory_capacity_bytes,
            "fits": self.fits,
            "source": self.source,
            "breakdown": {
                k: getattr(self.breakdown, k)
                for k in (
                    "compute_s",
                    "tp_comm_s",
                    "pp_comm_s",
                    "dp_comm_s",
                    "bubble_s",
                    "optimizer_s",
                )
            }
            | ({"ep_comm_s": self.breakdown.ep_comm_s} if self.breakdown.ep_comm_s else {})
            | ({"cp_comm_s": self.breakdown.cp_comm_s} if self.breakdown.cp_comm_s else {}),
            "memory_breakdown": mem(self.memory_breakdown),
            "stages": [
                {
                    "pp_rank": s.pp_rank,
                    "layers": s.layers,
                    "time_s": s.time_s,
                    "memory_bytes": s.memory_bytes,
                    "capacity_bytes": s.capacity_bytes,
                    "memory": mem(s.memory),
                }
                for s in self.stages
            ],
            "notes": list(self.notes),
            "calibrated_regime": self.calibrated_regime,
            "calibrated_regime_reasons": list(self.regime_reasons),
            **(
                {
                    "uncorrected_step_time_s": self.uncorrected_step_time_s,
                    "corrections": self.corrections,
                }
                if self.corrections is not None
                else {}
            ),
        }
