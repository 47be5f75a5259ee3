"""The PTD-P Table 1 calibration set as specs, and the error of the analytic model on it.

Owns: turning a row of ../shared/calibration/ptdp_table1.json (Narayanan et al. 2021, Table 1)
into (ModelSpec, TrainingSpec, ClusterSpec, ParallelConfig), and the per-row prediction of
hardware TFLOP/s per GPU (Eq. 3 convention, counts the recompute forward) for given constants.
Does not own: reading the file (callers pass the parsed JSON) or the fit
(benchmarks/calibrate_analytic.py).

How the rows are modelled (the system that produced them, Megatron-LM in 2021): GPT shape
(learned positions, LayerNorm, GELU MLP with ffn = 4h, biases, tied embeddings, dropout),
vocab and seq from the file, fp16 mixed precision with fp32 gradients, full activation
recompute, materialised softmax attention (no flash attention in 2021), no sequence parallelism
(introduced in 2022), ZeRO 0, interleaved 1F1B when virtual_stages > 1, on dgx-a100-80gb nodes;
the data-parallel all-reduce after the pipeline flush, not overlapped (`runtime.MEGATRON_2021`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planner.cost.analytic import DEFAULT_CONSTANTS, AnalyticConstants
from planner.cost.estimate import estimate
from planner.hf import model_from_fields
from planner.parallel import ParallelConfig, Recompute, Schedule
from planner.runtime import MEGATRON_2021
from planner.specs import ClusterSpec, Dtype, ModelSpec, TrainingSpec

NODE_TYPE = "dgx-a100-80gb"
GPUS_PER_NODE = 8


@dataclass(frozen=True, kw_only=True)
class CalibrationCase:
    label: str
    model: ModelSpec
    training: TrainingSpec
    cluster: ClusterSpec
    config: ParallelConfig
    measured_tflops_per_gpu: float


def cases(table: dict[str, Any]) -> tuple[CalibrationCase, ...]:
    from presets import load_cluster

    seq, vocab = int(table["training"]["seq"]), int(table["training"]["vocab"])
    out = []
    for row in table["rows"]:
        label = f"{row['params_b']}B"
        model = model_from_fields(
            f"ptdp-{label}",
            {
                "family": "gpt",
                "layers": row["layers"],
                "hidden": row["hidden"],
                "heads": row["heads"],
                "ffn_hidden": 4 * row["hidden"],
                "vocab": vocab,
                "max_seq_len": seq,
            },
            "ptdp_table1.json",
        )
        training = TrainingSpec(
            global_batch=row["global_batch"], seq_len=seq, dtype=Dtype.FP16, flash_attention=False
        )
        v = int(row["virtual_stages"])
        config = ParallelConfig(
            tp=row["tp"],
            pp=row["pp"],
            dp=row["dp"],
            micro_batch=row["micro_batch"],
            schedule=Schedule.INTERLEAVED if v > 1 else Schedule.ONE_F_ONE_B,
            virtual_stages=v,
            recompute=Recompute.FULL,
        )
        cluster = load_cluster(NODE_TYPE, row["gpus"] // GPUS_PER_NODE)
        out.append(
            CalibrationCase(
                label=label,
                model=model,
                training=training,
                cluster=cluster,
                config=config,
                measured_tflops_per_gpu=float(row["tflops_per_gpu"]),
            )
        )
    return tuple(out)


def predicted_tflops(
    case: CalibrationCase, constants: AnalyticConstants = DEFAULT_CONSTANTS
) -> float:
    """Hardware TFLOP/s per GPU the analytic model predicts for a row."""
    est = estimate(
        case.model,
        case.training,
        case.cluster,
        case.config,
        constants=constants,
        runtime=MEGATRON_2021,
    )
    return est.hardware_tflops_per_gpu


def percentage_errors(
    all_cases: tuple[CalibrationCase, ...], constants: AnalyticConstants = DEFAULT_CONSTANTS
) -> list[float]:
    """Signed error per row in percent: 100 * (predicted - measured) / measured."""
    return [
        100.0
        * (predicted_tflops(c, constants) - c.measured_tflops_per_gpu)
        / c.measured_tflops_per_gpu
        for c in all_cases
    ]
