"""The calibration sources as specs, their predictions, and the fit of the analytic constants.

Owns: turning the rows of ../shared/calibration/ (ptdp_table1.json: Narayanan et al. 2021,
Table 1; llm_foundry.json: MosaicML llm-foundry MPT benchmarks) into (ModelSpec, TrainingSpec,
ClusterSpec, ParallelConfig, runtime) cases; the prediction of each row in the quantity its
source measured, through `estimate` (the code `meshplan estimate` runs); the fit of the
constants of planner/cost/analytic.py (bounded Nelder-Mead on the mean squared log ratio, every
source weighted equally) and leave-one-source-out errors.
Does not own: reading files (callers pass parsed JSON), writing the report
(benchmarks/calibrate_analytic.py).

How each source's system is modelled (never per row):
- PTD-P (Megatron-LM 2021): GPT shape (learned positions, LayerNorm, GELU, ffn 4h, biases, tied
  embeddings, dropout), fp16 with fp32 gradients, full recompute, materialised softmax (no flash
  attention in 2021), no SP, ZeRO 0, interleaved 1F1B when virtual_stages > 1, DGX A100 nodes,
  the DP all-reduce after the flush (`runtime.MEGATRON_2021`). Quantity: hardware TFLOP/s per
  GPU (Eq. 3 convention).
- llm-foundry (Composer + PyTorch FSDP1): MPT shape (ALiBi: no position parameters, LayerNorm,
  GELU, no biases, tied embeddings, no dropout), bf16 autocast, FULL_SHARD as ZeRO-3 (SHARD_GRAD_OP
  as ZeRO-2), gradients reduced in fp32 (mixed_precision DEFAULT) or bf16 (PURE), FP8 linears for
  the amp_fp8 rows, flash attention, dp = GPUs, `runtime.LLM_FOUNDRY_FSDP1`; A100 rows on DGX
  A100-style nodes (8 x 200 Gb/s RoCE = the 1600 Gb/s the source states), H100 rows on DGX H100
  nodes (the source does not state the network: an assumption). Quantity: tokens/s per GPU
  (independent of FLOP conventions, as the source's README asks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from planner.cost.analytic import DEFAULT_CONSTANTS, AnalyticConstants
from planner.cost.estimate import estimate
from planner.cost.memory import ALLOCATOR_FRAGMENTATION
from planner.hf import model_from_fields
from planner.parallel import ParallelConfig, Recompute, Schedule
from planner.runtime import LLM_FOUNDRY_FSDP1, MEGATRON_2021, RuntimeSemantics
from planner.specs import ClusterSpec, Dtype, ModelSpec, PositionKind, TrainingSpec

PTDP = "ptdp_table1"
LLM_FOUNDRY = "llm_foundry"
GPUS_PER_NODE = 8
# llm-foundry's GPU names -> (meshplan GPU preset, node type whose links it sits on)
FOUNDRY_HARDWARE = {
    "A100-SXM-40GB": ("A100-40GB", "dgx-a100-80gb"),
    "A100-SXM-80GB": ("A100-80GB", "dgx-a100-80gb"),
    "H100-SXM-80GB": ("H100-SXM-80GB", "dgx-h100"),
}


@dataclass(frozen=True, kw_only=True)
class CalibrationCase:
    label: str
    source: str
    model: ModelSpec
    training: TrainingSpec
    cluster: ClusterSpec
    config: ParallelConfig
    runtime: RuntimeSemantics
    # what the source measured: hardware TFLOP/s per GPU (PTD-P) or tokens/s per GPU
    measured: float
    quantity: str


def _physical(cluster: ClusterSpec) -> ClusterSpec:
    """The cluster planning against each GPU's whole memory: a row ran, so its peak was at most
    the device's memory; the planner's 5 % headroom is a safety policy, not a prediction."""
    nodes = tuple(replace(n, gpu=n.gpu.with_memory_headroom(0.0)) for n in cluster.nodes)
    return replace(cluster, nodes=nodes)


def ptdp_cases(table: dict[str, Any]) -> tuple[CalibrationCase, ...]:
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
        # examples/sc21/CONFIG.sh runs --fp16 without --accumulate-allreduce-grads-in-fp32:
        # LocalDDP's main_grad buffer, and so the gradients' accumulation and all-reduce,
        # are fp16 (megatron/model/distributed.py `_get_buffer_type`)
        training = TrainingSpec(
            global_batch=row["global_batch"],
            seq_len=seq,
            dtype=Dtype.FP16,
            grad_dtype=Dtype.FP16,
            flash_attention=False,
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
        out.append(
            CalibrationCase(
                label=label,
                source=PTDP,
                model=model,
                training=training,
                cluster=_physical(load_cluster("dgx-a100-80gb", row["gpus"] // GPUS_PER_NODE)),
                config=config,
                runtime=MEGATRON_2021,
                measured=float(row["tflops_per_gpu"]),
                quantity="hardware_tflops_per_gpu",
            )
        )
    return tuple(out)


def _foundry_cluster(gpu_name: str, gpus: int) -> ClusterSpec:
    from presets import load_gpu, load_node_type

    preset, node_type = FOUNDRY_HARDWARE[gpu_name]
    node = replace(load_node_type(node_type), gpu=load_gpu(preset))
    nodes = max(1, gpus // GPUS_PER_NODE)
    if gpus < GPUS_PER_NODE:
        node = replace(node, gpus=gpus)
    return _physical(ClusterSpec(name=f"{node_type}-{preset}x{nodes}", nodes=(node,) * nodes))


def llm_foundry_cases(table: dict[str, Any]) -> tuple[CalibrationCase, ...]:
    out = []
    for row in table["rows"]:
        m, seq, gpus = row["model"], int(row["seq_len"]), int(row["num_gpus"])
        model = ModelSpec(
            name=m["name"],
            layers=m["layers"],
            hidden=m["hidden"],
            heads=m["heads"],
            kv_heads=m["kv_heads"],
            ffn_hidden=m["ffn"],
            vocab=m["vocab"],
            max_seq_len=seq,
            tied_embeddings=True,
            position=PositionKind.ALIBI,
            bias=False,
        )
        pure = "PURE" in row["zero_fsdp"]
        training = TrainingSpec(
            global_batch=int(row["global_batch"]),
            seq_len=seq,
            dtype=Dtype.BF16,
            grad_dtype=Dtype.BF16 if pure else Dtype.FP32,
            flash_attention=True,
            fp8_linears=row["precision"] == "amp_fp8",
        )
        config = ParallelConfig(
            tp=1,
            pp=1,
            dp=gpus,
            micro_batch=int(row["micro_batch"]),
            recompute=Recompute.FULL if row["recompute"] == "full" else Recompute.NONE,
            zero=2 if "SHARD_GRAD_OP" in row["zero_fsdp"] else 3,
        )
        out.append(
            CalibrationCase(
                label=row["id"],
                source=LLM_FOUNDRY,
                model=model,
                training=training,
                cluster=_foundry_cluster(row["hardware"]["gpu"], gpus),
                config=config,
                runtime=LLM_FOUNDRY_FSDP1,
                measured=float(row["measured"]["tokens_per_s_per_gpu"]),
                quantity="tokens_per_s_per_gpu",
            )
        )
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Prediction:
    value: float
    fits: bool

    def error_pct(self, case: CalibrationCase) -> float:
        return 100.0 * (self.value - case.measured) / case.measured


def predict(case: CalibrationCase, constants: AnalyticConstants = DEFAULT_CONSTANTS) -> Prediction:
    """The row's measured quantity as `estimate` predicts it (analytic path, the row's runtime)."""
    est = estimate(
        case.model,
        case.training,
        case.cluster,
        case.config,
        constants=constants,
        runtime=case.runtime,
    )
    if case.quantity == "hardware_tflops_per_gpu":
        value = est.hardware_tflops_per_gpu
    else:
        value = est.tokens_per_s / case.cluster.num_gpus
    # A row ran, so its live tensors plus the framework's reserve fit the device; the
    # fragmentation allowance on activations is, like the 5 % headroom, a planning margin.
    live = est.peak_memory_bytes - ALLOCATOR_FRAGMENTATION * est.memory_breakdown.activations
    return Prediction(value=value, fits=live <= est.memory_capacity_bytes)


def percentage_errors(
    all_cases: tuple[CalibrationCase, ...], constants: AnalyticConstants = DEFAULT_CONSTANTS
) -> list[float]:
    """Signed error per row in percent: 100 * (predicted - measured) / measured."""
    return [predict(c, constants).error_pct(c) for c in all_cases]


# --- the fit

# Fitted constants and their search box (physical ranges): eff_max [-], log10 gemm_overhead_s
# [s], attention_efficiency [-], hbm_efficiency [-], hopper_eff_max [-],
# hopper_attention_efficiency [-].
FITTED = (
    "eff_max",
    "gemm_overhead_s",
    "attention_efficiency",
    "hbm_efficiency",
    "hopper_eff_max",
    "hopper_attention_efficiency",
)
LOWER = np.array([0.30, -7.0, 0.10, 0.30, 0.30, 0.10])
UPPER = np.array([1.00, -3.0, 1.00, 1.00, 1.00, 1.00])


def to_constants(x: np.ndarray, base: AnalyticConstants = DEFAULT_CONSTANTS) -> AnalyticConstants:
    x = np.clip(x, LOWER, UPPER)
    return replace(
        base,
        eff_max=float(x[0]),
        gemm_overhead_s=float(10 ** x[1]),
        attention_efficiency=float(x[2]),
        hbm_efficiency=float(x[3]),
        hopper_eff_max=float(x[4]),
        hopper_attention_efficiency=float(x[5]),
    )


def from_constants(c: AnalyticConstants) -> np.ndarray:
    return np.array(
        [
            c.eff_max,
            np.log10(c.gemm_overhead_s),
            c.attention_efficiency,
            c.hbm_efficiency,
            c.hopper_eff_max,
            c.hopper_attention_efficiency,
        ]
    )


def loss(x: np.ndarray, rows: tuple[CalibrationCase, ...]) -> float:
    """Mean over sources of the mean squared log ratio predicted / measured."""
    c = to_constants(x)
    by_source: dict[str, list[float]] = {}
    for k in rows:
        r = float(np.log(predict(k, c).value / k.measured))
        by_source.setdefault(k.source, []).append(r * r)
    return float(np.mean([np.mean(v) for v in by_source.values()]))


def nelder_mead(
    f: Callable[[np.ndarray], float], x0: np.ndarray, iters: int, step: np.ndarray
) -> np.ndarray:
    """Bounded Nelder-Mead (Nelder & Mead 1965; standard coefficients 1, 2, 0.5, 0.5)."""
    n = len(x0)
    simplex = [np.clip(x0, LOWER, UPPER)]
    for i in range(n):
        p = x0.copy()
        p[i] += step[i]
        simplex.append(np.clip(p, LOWER, UPPER))
    vals = [f(p) for p in simplex]
    for _ in range(iters):
        order = np.argsort(vals)
        simplex = [simplex[i] for i in order]
        vals = [vals[i] for i in order]
        centroid = np.mean(simplex[:-1], axis=0)
        xr = np.clip(centroid + (centroid - simplex[-1]), LOWER, UPPER)
        fr = f(xr)
        if fr < vals[0]:
            xe = np.clip(centroid + 2 * (centroid - simplex[-1]), LOWER, UPPER)
            fe = f(xe)
            simplex[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            simplex[-1], vals[-1] = xr, fr
        else:
            xc = np.clip(centroid + 0.5 * (simplex[-1] - centroid), LOWER, UPPER)
            fc = f(xc)
            if fc < vals[-1]:
                simplex[-1], vals[-1] = xc, fc
            else:
                for i in range(1, n + 1):
                    simplex[i] = simplex[0] + 0.5 * (simplex[i] - simplex[0])
                    vals[i] = f(simplex[i])
        if max(vals) - min(vals) < 1e-10:
            break
    return simplex[int(np.argmin(vals))]


def fit(
    rows: tuple[CalibrationCase, ...],
    start: AnalyticConstants = DEFAULT_CONSTANTS,
    iters: int = 120,
) -> AnalyticConstants:
    step = np.array([0.1, 0.7, 0.15, 0.15, 0.1, 0.1])
    x0 = from_constants(start)
    best = nelder_mead(lambda x: loss(x, rows), x0, iters, step)
    # restart once from the optimum (Nelder-Mead can stall on a degenerate simplex)
    best = nelder_mead(lambda x: loss(x, rows), best, iters // 2, step / 4)
    return to_constants(best, start)


# Starting points from the literature, used where the rows of a fit do not identify a
# constant (leave-one-source-out: PTD-P has no flash attention and no H100): cuBLAS reaches
# ~80 % of the A100's dense peak on large GEMMs (NVIDIA Matrix Multiplication Background
# guide's A100 figures), FlashAttention-2 50-73 % forward on A100 (Dao 2023, Fig. 5: 0.5 taken),
# STREAM-like kernels ~85 % of HBM bandwidth, a few microseconds per kernel launch; Hopper
# without its own data takes the Ampere values.
PRIORS = AnalyticConstants(
    eff_max=0.80,
    gemm_overhead_s=5e-6,
    attention_efficiency=0.50,
    hbm_efficiency=0.85,
    hopper_eff_max=0.80,
    hopper_attention_efficiency=0.50,
)


def _unidentified(rows: tuple[CalibrationCase, ...], c: AnalyticConstants) -> AnalyticConstants:
    """`c` with the constants no row of `rows` exercises put back to what a prediction without
    that data would use: the flash-attention efficiency at its prior, Hopper at Ampere's."""
    if not any(r.training.flash_attention for r in rows):
        c = replace(c, attention_efficiency=PRIORS.attention_efficiency)
    if not any(n.gpu.arch == "hopper" for r in rows for n in r.cluster.nodes[:1]):
        c = replace(c, hopper_eff_max=c.eff_max, hopper_attention_efficiency=c.attention_efficiency)
    return c


def leave_one_source_out(
    rows: tuple[CalibrationCase, ...], iters: int = 120
) -> dict[str, tuple[AnalyticConstants, list[float]]]:
    """Per source: the constants fitted on the other sources only (from PRIORS, constants
    they do not identify left at what a prediction without that data would use), and this
    source's errors with them."""
    out = {}
    for source in sorted({r.source for r in rows}):
        rest = tuple(r for r in rows if r.source != source)
        held = tuple(r for r in rows if r.source == source)
        c = _unidentified(rest, fit(rest, _unidentified(rest, PRIORS), iters))
        out[source] = (c, percentage_errors(held, c))
    return out
