"""Whether an analytic prediction lies inside what the constants were calibrated on.

Owns: the calibrated envelope of the analytic path (the union of the two calibration sources,
planner/cost/calibration.py) and the reasons a prediction falls outside it.
Does not own: the fit, or measured predictions (a profile measures its own hardware).

Envelope, from the rows of ../shared/calibration/: GPUs A100-40GB, A100-80GB, H100-SXM-80GB
(other GPUs of a calibrated architecture, e.g. H200, reuse its constants: said); bf16 / fp16,
FP8 linears on Hopper only (7 llm-foundry rows); sequence length 512-65,536; tp <= 8 and
pp <= 64 (PTD-P); ZeRO 0 (PTD-P), 2 and 3 (FSDP1); recompute none or full (neither source ran
selective); 1F1B or interleaved schedules; no sequence parallelism (neither source used it).
The runtimes differ from the executor's (Megatron-LM 2021, FSDP1): that is a note on every
analytic prediction, not a reason to leave the regime.
"""

from __future__ import annotations

from planner.cost.kernels import CALIBRATED_ARCHS
from planner.parallel import ParallelConfig
from planner.specs import ClusterSpec, TrainingSpec

CALIBRATED_GPUS = ("A100-40GB", "A100-80GB", "H100-SXM-80GB")
SEQ_RANGE = (512, 65_536)
MAX_TP, MAX_PP = 8, 64


def regime_reasons(
    training: TrainingSpec, cluster: ClusterSpec, config: ParallelConfig
) -> tuple[str, ...]:
    """Why this analytic prediction is outside the calibrated regime (empty: inside)."""
    out: list[str] = []
    for gpu in sorted({n.gpu.name: n.gpu for n in cluster.nodes}.values(), key=lambda g: g.name):
        if gpu.name in CALIBRATED_GPUS:
            continue
        if gpu.arch in CALIBRATED_ARCHS:
            out.append(f"gpu {gpu.name} not calibrated: uses the {gpu.arch} constants")
        else:
            out.append(
                f"gpu {gpu.name} ({gpu.arch or 'unknown architecture'}) not calibrated: "
                "uses the Ampere constants"
            )
    if training.fp8_linears and any(n.gpu.arch != "hopper" for n in cluster.nodes):
        out.append("fp8 calibrated on H100 only")
    lo, hi = SEQ_RANGE
    if not lo <= training.seq_len <= hi:
        out.append(f"seq_len {training.seq_len} outside the calibrated {lo}-{hi}")
    if config.tp > MAX_TP or config.pp > MAX_PP:
        out.append(
            f"tp {config.tp} / pp {config.pp} beyond the calibrated tp <= {MAX_TP}, pp <= {MAX_PP}"
        )
    if config.zero == 1:
        out.append("ZeRO-1 not calibrated (rows ran ZeRO 0, 2, 3)")
    if config.recompute.value == "selective":
        out.append("selective recompute not calibrated (rows ran none or full)")
    if config.schedule.value == "gpipe":
        out.append("gpipe schedule not calibrated")
    if config.sequence_parallel:
        out.append("sequence parallelism not calibrated")
    return tuple(out)
