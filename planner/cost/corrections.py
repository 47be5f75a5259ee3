"""Calibration corrections: the factors `meshplan calibrate` fits and how they act on a prediction.

Owns: `Corrections` (the factors), `ProfileCorrections` (the factors as stored in a profile's
optional `corrections` field, with where and when they were fitted), the one formula that
applies them (`corrected_step_time_s`), and its two users: `correct_estimate` (the hook at the
end of planner/cost/estimate.py, so `plan`, `estimate` and `validate` apply a profile's
corrections alike) and `apply_corrections` (an estimate's JSON, for the legacy
`P.corrections.json` sidecar that `validate` still reads).
Does not own: the fit (planner/validation.py), the profile format around the field
(planner/profile.py) or the cost model itself. Pure: no torch, no I/O.

How corrections act on a prediction (the cost model's breakdown terms, all seconds per step):
  adjusted = predicted_step_time_s
             + (compute_scale - 1) * (compute_s + bubble_s)
             + (tp_comm_scale - 1) * tp_comm_s + (pp_comm_scale - 1) * pp_comm_s
             + (dp_comm_scale * (1 - overlap_fraction) - 1) * dp_comm_s
             + (optimizer_scale - 1) * optimizer_s
             + step_overhead_s + micro_batch_overhead_s * micro_batch_slots
             + dp_overhead_s * [dp > 1]
with micro_batch_slots = m * v + pp - 1, the forward/backward op pairs on a 1F1B (or interleaved)
critical path (m micro-batches, v virtual stages, pp pipeline ranks; Narayanan et al. 2021
Sec. 2.2): an overhead paid per op pair is paid that many times per step.
It is written as a change to the predicted step time, not as a re-summed breakdown, so identity
corrections return the prediction exactly even when the cost model's step time is not the plain
sum of its terms (it may already overlap DP communication with backward). The bubble scales with
compute because a 1F1B bubble is (p - 1) stage compute times (Narayanan et al. 2021 Sec. 2.2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from planner.errors import FormatError, SpecError

if TYPE_CHECKING:
    from planner.cost.results import Estimate

CORRECTIONS_SCHEMA = "meshplan-corrections/1"
# Breakdown keys of `meshplan estimate --json` (issue 3 contract), seconds per step.
BREAKDOWN_KEYS = ("compute_s", "tp_comm_s", "pp_comm_s", "dp_comm_s", "bubble_s", "optimizer_s")


@dataclass(frozen=True, kw_only=True)
class Corrections:
    """Correction factors fitted from measurements on one machine (defaults: no correction).

    compute_scale: measured / predicted block compute (profile timings in isolation vs inside
        the training loop: caches, threads, allocator); also scales the pipeline bubble.
    tp_comm_scale: measured / predicted time of the tensor-parallel collectives.
    pp_comm_scale: measured / predicted time of the pipeline p2p transfers.
    dp_comm_scale: measured / predicted time of the data-parallel gradient collectives.
    overlap_fraction: extra fraction of the (scaled) DP communication hidden behind backward.
        Step times only identify dp_comm_scale * (1 - overlap_fraction); the fit reports a
        product below 1 as overlap with scale 1, and a product above 1 as scale with no overlap.
    optimizer_scale: measured / predicted optimizer step.
    step_overhead_s: fixed time per step the model does not price (Python, launch, scheduler).
    micro_batch_overhead_s: time per micro-batch slot (see `micro_batch_slots`) the model does
        not price: Python dispatch, autograd and hook work of each forward/backward pair.
    dp_overhead_s: exposed data-parallel time per step (dp > 1 only) that the model prices as
        hidden behind backward: gradient synchronisation that cannot overlap (on a CPU host the
        collective competes for the same cores) and the data-parallel wrapper's hooks.
    """

    compute_scale: float = 1.0
    tp_comm_scale: float = 1.0
    pp_comm_scale: float = 1.0
    dp_comm_scale: float = 1.0
    overlap_fraction: float = 0.0
    optimizer_scale: float = 1.0
    step_overhead_s: float = 0.0
    micro_batch_overhead_s: float = 0.0
    dp_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"corrections.{f.name}={value!r} must be a number")
            if not math.isfinite(value):
                raise SpecError(f"corrections.{f.name}={value!r} must be finite")
            if f.name.endswith("_scale") and value <= 0:
                raise SpecError(f"corrections.{f.name}={value!r} must be > 0")
            if f.name.endswith("overhead_s") and value < 0:
                raise SpecError(f"corrections.{f.name}={value!r} must be >= 0")
        if not 0.0 <= self.overlap_fraction <= 1.0:
            raise SpecError(
                f"corrections.overlap_fraction={self.overlap_fraction!r} must be in [0, 1]"
            )


IDENTITY = Corrections()


@dataclass(frozen=True, kw_only=True)
class ProfileCorrections:
    """A profile's `corrections` field: the factors and where they come from.

    `schema` versions this object on its own (a profile without the field is schema 1 as
    before); `fitted_on_host` / `fitted_on_date` are the validation run's host and date;
    `base_profile_sha256` is the hash of the profile the validation predicted with, without
    corrections; the labels say which configurations the fit saw and which it held out, and
    `holdout_mape` / `loo_mape` are the fit's held-out and leave-one-out MAPE (fractions).
    """

    schema: str = CORRECTIONS_SCHEMA
    factors: Corrections
    fitted_on_host: str
    fitted_on_date: str
    validation_report: str = ""
    base_profile_sha256: str = ""
    fit_labels: tuple[str, ...] = ()
    holdout_labels: tuple[str, ...] = ()
    identified: tuple[str, ...] = ()
    holdout_mape: float | None = None
    loo_mape: float | None = None

    def __post_init__(self) -> None:
        if self.schema != CORRECTIONS_SCHEMA:
            raise FormatError(
                f"corrections.schema={self.schema!r} is not supported; this meshplan reads "
                f"{CORRECTIONS_SCHEMA}"
            )

    @property
    def note(self) -> str:
        return (
            f"corrected by calibration fitted on {self.fitted_on_host} {self.fitted_on_date} "
            f"(factors {', '.join(self.identified) or 'none'})"
        )


def micro_batch_slots(num_micro_batches: int, pp: int, virtual_stages: int = 1) -> int:
    """Forward/backward op pairs on the critical path of a step: m * v + pp - 1."""
    return num_micro_batches * virtual_stages + pp - 1


def feature_row(terms: dict[str, float], slots: int, dp: int = 1) -> list[float]:
    """The terms each factor multiplies, in the order of `deltas` (the overheads' columns are
    1 s, `slots` s and [dp > 1] s); the calibration fit uses the same columns."""
    return [
        terms["compute_s"] + terms["bubble_s"],
        terms["tp_comm_s"],
        terms["pp_comm_s"],
        terms["dp_comm_s"],
        terms["optimizer_s"],
        1.0,
        float(slots),
        1.0 if dp > 1 else 0.0,
    ]


def deltas(c: Corrections) -> list[float]:
    """The change each factor makes per unit of its `feature_row` column."""
    return [
        c.compute_scale - 1.0,
        c.tp_comm_scale - 1.0,
        c.pp_comm_scale - 1.0,
        c.dp_comm_scale * (1.0 - c.overlap_fraction) - 1.0,
        c.optimizer_scale - 1.0,
        c.step_overhead_s,
        c.micro_batch_overhead_s,
        c.dp_overhead_s,
    ]


def corrected_step_time_s(
    predicted_step_time_s: float,
    terms: dict[str, float],
    c: Corrections,
    slots: int = 0,
    dp: int = 1,
) -> float:
    """The module docstring's formula on plain numbers."""
    row = feature_row(terms, slots, dp)
    return predicted_step_time_s + sum(x * d for x, d in zip(row, deltas(c), strict=True))


def term_scales(c: Corrections) -> dict[str, float]:
    """What each breakdown term is multiplied by (the bubble scales with compute)."""
    return {
        "compute_s": c.compute_scale,
        "bubble_s": c.compute_scale,
        "tp_comm_s": c.tp_comm_scale,
        "pp_comm_s": c.pp_comm_scale,
        "dp_comm_s": c.dp_comm_scale * (1.0 - c.overlap_fraction),
        "optimizer_s": c.optimizer_scale,
    }


def overheads_s(c: Corrections, slots: int, dp: int) -> dict[str, float]:
    """The two overhead terms a corrected breakdown gains."""
    return {
        "step_overhead_s": c.step_overhead_s + c.micro_batch_overhead_s * slots,
        "dp_overhead_s": c.dp_overhead_s if dp > 1 else 0.0,
    }


def breakdown_of(estimate: dict[str, Any]) -> dict[str, float]:
    """The six breakdown terms of an estimate's JSON (missing terms are 0)."""
    raw = estimate.get("breakdown") or {}
    if not isinstance(raw, dict):
        raise FormatError("estimate.breakdown: expected an object")
    return {k: float(raw.get(k, 0.0) or 0.0) for k in BREAKDOWN_KEYS}


def apply_corrections(
    estimate: dict[str, Any],
    corrections: Corrections,
    *,
    slots: int | None = None,
    dp: int | None = None,
) -> dict[str, Any]:
    """A copy of an estimate's JSON with its step time and breakdown corrected.

    `slots` is `micro_batch_slots(...)` of the estimate's configuration; it is required when
    `micro_batch_overhead_s` is not 0, and `dp` the data-parallel degree when `dp_overhead_s`
    is not 0 (the estimate's JSON carries neither m, pp, v nor dp).
    `step_time_s` and `tokens_per_s` are adjusted; the breakdown terms are scaled and the
    overheads added; the original step time is kept as `uncorrected_step_time_s` and the
    factors under `corrections`, so the output says it was corrected.
    """
    terms = breakdown_of(estimate)
    if "step_time_s" not in estimate:
        raise FormatError("estimate: missing step_time_s")
    c = corrections
    if c.micro_batch_overhead_s and slots is None:
        raise SpecError("apply_corrections: micro_batch_overhead_s needs the micro-batch slots")
    if c.dp_overhead_s and dp is None:
        raise SpecError("apply_corrections: dp_overhead_s needs the data-parallel degree")
    before = float(estimate["step_time_s"])
    after = corrected_step_time_s(before, terms, c, slots or 0, dp or 1)
    scale = term_scales(c)
    out = dict(estimate)
    out["breakdown"] = {
        **(estimate.get("breakdown") or {}),
        **{k: terms[k] * scale[k] for k in BREAKDOWN_KEYS},
        **overheads_s(c, slots or 0, dp or 1),
    }
    out["uncorrected_step_time_s"] = before
    out["step_time_s"] = after
    if estimate.get("tokens_per_s") and after > 0:
        out["tokens_per_s"] = float(estimate["tokens_per_s"]) * before / after
    out["corrections"] = asdict(c)
    return out


def correct_estimate(est: Estimate, pc: ProfileCorrections, *, slots: int, dp: int) -> Estimate:
    """`est` with a profile's corrections applied: step time by the formula above, the
    breakdown terms scaled, the throughput figures rescaled to the new step time, the factors
    and their provenance under `corrections`, and the note saying so."""
    c = pc.factors
    terms = {k: getattr(est.breakdown, k) for k in BREAKDOWN_KEYS}
    before = est.step_time_s
    after = corrected_step_time_s(before, terms, c, slots, dp)
    scale = term_scales(c)
    ratio = before / after if after > 0 else 1.0
    return replace(
        est,
        step_time_s=after,
        tokens_per_s=est.tokens_per_s * ratio,
        model_tflops_per_gpu=est.model_tflops_per_gpu * ratio,
        hardware_tflops_per_gpu=est.hardware_tflops_per_gpu * ratio,
        mfu=est.mfu * ratio,
        breakdown=replace(est.breakdown, **{k: terms[k] * scale[k] for k in BREAKDOWN_KEYS}),
        uncorrected_step_time_s=before,
        corrections={
            "factors": asdict(c),
            "overheads_s": overheads_s(c, slots, dp),
            "fitted_on_host": pc.fitted_on_host,
            "fitted_on_date": pc.fitted_on_date,
            "base_profile_sha256": pc.base_profile_sha256,
            "note": pc.note,
        },
        notes=(pc.note, *est.notes),
    )


def lower_bound_scale(c: Corrections) -> float:
    """A factor s <= 1 with corrected >= s * predicted for every estimate: the breakdown
    terms sum to the step time (results.TimeBreakdown), every term is multiplied by its scale
    and the overheads only add, so the smallest scale (or 1) bounds the change from below.
    The search multiplies its uncorrected step-time lower bounds by it, so pruning stays sound
    when a correction makes estimates faster."""
    return min(1.0, *term_scales(c).values())
