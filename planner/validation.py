"""Predicted versus measured: error metrics, the top-choice check and the calibration fit.

Owns: the validation records and report (`validation.json`), MAPE, Spearman rank correlation,
"was the planner's top choice the measured best, and by how much did it lose", the median step
time after warm-up, and `calibrate` (fit `Corrections` on one subset of configurations, check
them on a held-out subset), and reading the legacy `P.corrections.json` sidecar.
Does not own: the factors and how they act on a prediction (planner/cost/corrections.py, whose
names this module re-exports for its callers), running the executor (cli/validate_cmd.py), the
cost model (planner/cost/) or the profile format (planner/profile.py). Pure: no torch, no I/O
except the JSON helpers at the end.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from planner.cost.corrections import (
    BREAKDOWN_KEYS,
    CORRECTIONS_SCHEMA,
    IDENTITY,
    Corrections,
    apply_corrections,
    breakdown_of,
    corrected_step_time_s,
    micro_batch_slots,
)
from planner.cost.corrections import feature_row as _feature_row
from planner.errors import FormatError, SpecError
from planner.fileio import read_json_file

__all__ = [
    "BREAKDOWN_KEYS",
    "CORRECTIONS_SCHEMA",
    "IDENTITY",
    "Corrections",
    "apply_corrections",
    "breakdown_of",
    "corrected_step_time_s",
    "micro_batch_slots",
]

VALIDATION_SCHEMA = "meshplan-validation/1"
# Ridge strength of the calibration fit, in squared relative step-time error per squared unit
# change of a factor (a scale moving by 1, an overhead by one median step): a factor moves only
# where that buys about 10 % of relative error on one configuration, so a factor whose term is
# tiny on the fit subset (the optimizer step) stays near its default instead of absorbing noise.
DEFAULT_RIDGE = 1e-2
# Factors are clamped to this range after the fit: a correction outside it means the cost model
# is wrong in kind, not in degree, and should be fixed rather than scaled (dimensionless).
SCALE_RANGE = (0.05, 20.0)
# Sweeps of the coordinate-descent fit; 7 variables converge in far fewer (dimensionless).
COORDINATE_SWEEPS = 10000
# The fitted variables, in the column order of corrections.feature_row; dp_comm_effective is
# dp_comm_scale * (1 - overlap_fraction), the product step times identify.
_FACTORS = (
    "compute_scale",
    "tp_comm_scale",
    "pp_comm_scale",
    "dp_comm_effective",
    "optimizer_scale",
    "step_overhead_s",
    "micro_batch_overhead_s",
    "dp_overhead_s",
)
_SCALES = 5  # the first five factors are scales, the rest overheads


# ---------------------------------------------------------------- records and metrics


@dataclass(frozen=True, kw_only=True)
class ValidationRecord:
    """One configuration, predicted and (if its run succeeded) measured.

    `planner_rank` is the position in the planner's ranking (0 = its top choice) by predicted
    step time among the validated configurations; `micro_batch_slots` is m * v + pp - 1. `measured_step_time_s` is the median over the
    steps left after dropping `warmup_steps_dropped` (the median over runs of each run's median
    when a configuration ran several times: `run_medians_s`); None when every run failed.
    Measured memory on CPU is the process's peak resident set (interpreter and torch included).
    """

    label: str
    config: dict[str, Any]
    predicted_step_time_s: float
    predicted_peak_memory_bytes: float | None = None
    breakdown: dict[str, float] = field(default_factory=dict)
    planner_rank: int = 0
    micro_batch_slots: int = 0
    measured_step_time_s: float | None = None
    measured_step_times_s: tuple[float, ...] = ()
    run_medians_s: tuple[float, ...] = ()
    warmup_steps_dropped: int = 0
    measured_peak_memory_bytes: float | None = None
    error: str | None = None

    @property
    def measured(self) -> bool:
        return self.measured_step_time_s is not None


def median_after_warmup(step_times_s: Sequence[float], warmup: int) -> tuple[float, int]:
    """Median of the step times after dropping the first `warmup` (fewer if too few remain).

    Returns (median_s, steps_dropped). At least one step is always kept.
    """
    if not step_times_s:
        raise SpecError("no step times were measured")
    dropped = max(0, min(warmup, len(step_times_s) - 1))
    return float(statistics.median(step_times_s[dropped:])), dropped


def percentage_error(predicted: float, measured: float) -> float:
    """Signed error of the prediction relative to the measurement: (p - m) / m."""
    if measured <= 0:
        raise SpecError(f"measured value {measured!r} must be > 0")
    return (predicted - measured) / measured


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Mean absolute percentage error, as a fraction: mean |p - m| / m."""
    if len(predicted) != len(measured) or not measured:
        raise SpecError("mape needs two non-empty sequences of equal length")
    return sum(abs(percentage_error(p, m)) for p, m in zip(predicted, measured, strict=True)) / len(
        measured
    )


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks with ties given their average rank (the usual Spearman convention)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson correlation of the (tie-averaged) ranks
    (Spearman 1904). None when fewer than 2 points or a variable is constant."""
    if len(xs) != len(ys):
        raise SpecError("spearman needs two sequences of equal length")
    if len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


@dataclass(frozen=True, kw_only=True)
class TopChoice:
    """The planner's top choice (lowest predicted step time among the measured ones) against
    the measured best. `loss_fraction` = (measured top - measured best) / measured best."""

    top_label: str
    best_label: str
    top_is_best: bool
    top_measured_step_time_s: float
    best_measured_step_time_s: float
    loss_fraction: float


def top_choice(records: Sequence[ValidationRecord]) -> TopChoice | None:
    done = [r for r in records if r.measured_step_time_s is not None]
    if not done:
        return None
    top = min(done, key=lambda r: (r.predicted_step_time_s, r.planner_rank))
    best = min(done, key=lambda r: (r.measured_step_time_s or 0.0, r.planner_rank))
    t, b = float(top.measured_step_time_s or 0.0), float(best.measured_step_time_s or 0.0)
    return TopChoice(
        top_label=top.label,
        best_label=best.label,
        top_is_best=top.label == best.label,
        top_measured_step_time_s=t,
        best_measured_step_time_s=b,
        loss_fraction=(t - b) / b,
    )


def run_to_run_mape(records: Sequence[ValidationRecord]) -> float | None:
    """The measurement's own noise floor: mean |run median - measured| / measured over every
    run of every configuration that ran more than once — the MAPE a perfect predictor would
    score against single runs. None when no configuration ran twice."""
    errs = [
        abs(percentage_error(x, float(r.measured_step_time_s or 0.0)))
        for r in records
        if r.measured_step_time_s and len(r.run_medians_s) > 1
        for x in r.run_medians_s
    ]
    return sum(errs) / len(errs) if errs else None


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Headline numbers of a validation run (fractions, not percent)."""

    configurations: int
    measured: int
    mape: float | None
    max_abs_error: float | None
    spearman: float | None
    top_choice: TopChoice | None
    memory_mape: float | None
    run_to_run_mape: float | None


def summarize(records: Sequence[ValidationRecord]) -> Summary:
    done = [r for r in records if r.measured_step_time_s is not None]
    pred = [r.predicted_step_time_s for r in done]
    meas = [float(r.measured_step_time_s or 0.0) for r in done]
    mem = [
        r
        for r in done
        if r.measured_peak_memory_bytes and r.predicted_peak_memory_bytes is not None
    ]
    return Summary(
        configurations=len(records),
        measured=len(done),
        mape=mape(pred, meas) if done else None,
        max_abs_error=max(abs(percentage_error(p, m)) for p, m in zip(pred, meas, strict=True))
        if done
        else None,
        spearman=spearman(pred, meas),
        top_choice=top_choice(records),
        run_to_run_mape=run_to_run_mape(done),
        memory_mape=mape(
            [float(r.predicted_peak_memory_bytes or 0.0) for r in mem],
            [float(r.measured_peak_memory_bytes or 0.0) for r in mem],
        )
        if mem
        else None,
    )


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True, kw_only=True)
class CalibrationResult:
    """Corrections fitted on `fit_labels`, checked on `holdout_labels` (MAPE as fractions).

    `loo_mape_after` is leave-one-out over all measured configurations (each predicted by
    corrections fitted on the others), a second held-out check that uses every point once.
    `identified` lists the factors whose term was non-zero on the fit subset; the others stay
    at their defaults.
    """

    corrections: Corrections
    fit_labels: tuple[str, ...]
    holdout_labels: tuple[str, ...]
    fit_mape_before: float
    fit_mape_after: float
    holdout_mape_before: float | None
    holdout_mape_after: float | None
    loo_mape_before: float | None
    loo_mape_after: float | None
    identified: tuple[str, ...]
    adjusted_step_time_s: dict[str, float]


def _box_least_squares(
    a: np.ndarray, y: np.ndarray, ridge: float, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """argmin |a x - y|^2 + ridge |x|^2 subject to lo <= x <= hi, by cyclic coordinate descent
    (exact for this strictly convex box-constrained quadratic; Bertsekas, Nonlinear
    Programming, 2nd ed., Prop. 2.7.1)."""
    h = a.T @ a + ridge * np.eye(a.shape[1])
    g = a.T @ y
    x = np.clip(np.zeros(a.shape[1]), lo, hi)
    for _ in range(COORDINATE_SWEEPS):
        before = x.copy()
        for j in range(len(x)):
            x[j] = np.clip((g[j] - h[j] @ x + h[j, j] * x[j]) / h[j, j], lo[j], hi[j])
        if np.max(np.abs(x - before)) < 1e-12:
            break
    return x


FACTOR_NAMES = tuple("dp_comm_scale" if f == "dp_comm_effective" else f for f in _FACTORS)


def _factor_indices(factors: Sequence[str] | None) -> set[int]:
    if factors is None:
        return set(range(len(_FACTORS)))
    unknown = sorted(set(factors) - set(FACTOR_NAMES))
    if unknown:
        raise SpecError(
            f"unknown correction factor(s) {', '.join(unknown)}; use any of {', '.join(FACTOR_NAMES)}"
        )
    return {FACTOR_NAMES.index(f) for f in factors}


def fit_corrections(
    records: Sequence[ValidationRecord],
    *,
    ridge: float = DEFAULT_RIDGE,
    factors: Sequence[str] | None = None,
) -> tuple[Corrections, tuple[str, ...]]:
    """Least squares on relative error, with a ridge pull towards "no correction".

    Model (module docstring): measured_i - predicted_i = sum_j x_j * F_ij, F = (compute+bubble,
    tp, pp, dp, optimizer, 1 s, slots s, [dp > 1] s), x_j = factor_j - 1 for the scales and the overhead
    itself for the last three columns; scales kept in SCALE_RANGE and overheads >= 0 (a box-
    constrained fit, not a clip afterwards, so the bounds cost the fit as little as possible).
    Rows are divided by measured_i so the fit minimises squared *relative* error, the quantity
    MAPE reports. The ridge penalises (scale - 1)^2 and (overhead / median measured step)^2;
    columns that are zero on every row are left out (their factors stay at the default), and so
    are factors not named in `factors` (None: all of FACTOR_NAMES).
    """
    done = [r for r in records if r.measured_step_time_s]
    if not done:
        raise SpecError("calibration needs at least one measured configuration")
    meas = np.array([float(r.measured_step_time_s or 0.0) for r in done])
    pred = np.array([r.predicted_step_time_s for r in done])
    rows = [_feature_row(_terms(r), r.micro_batch_slots, _dp(r)) for r in done]
    feats = np.array(rows) / meas[:, None]
    target = (meas - pred) / meas
    # Scales are penalised in their own units ((s - 1)^2); overheads in units of the median
    # measured step, so "1" means alike for both kinds.
    units = np.array([1.0] * _SCALES + [1.0 / float(np.median(meas))] * (len(_FACTORS) - _SCALES))
    norms = units
    chosen = _factor_indices(factors)
    active = [j for j in range(len(_FACTORS)) if j in chosen and np.any(feats[:, j] != 0)]
    if not active:
        raise SpecError("none of the chosen correction factors has a non-zero term to fit")
    lo_s, hi_s = SCALE_RANGE
    lo = np.array([lo_s - 1.0 if j < _SCALES else 0.0 for j in active]) * norms[active]
    hi = np.array([hi_s - 1.0 if j < _SCALES else np.inf for j in active]) * norms[active]
    x_scaled = _box_least_squares(feats[:, active] / norms[active], target, ridge, lo, hi)
    x = np.zeros(len(_FACTORS))
    x[active] = x_scaled / norms[active]
    scale = {name: float(1.0 + x[j]) for j, name in enumerate(_FACTORS[:_SCALES])}
    dp_eff = scale.pop("dp_comm_effective")
    corr = Corrections(
        **scale,
        dp_comm_scale=max(dp_eff, 1.0),
        overlap_fraction=max(0.0, 1.0 - dp_eff),
        step_overhead_s=float(x[_SCALES]),
        micro_batch_overhead_s=float(x[_SCALES + 1]),
        dp_overhead_s=float(x[_SCALES + 2]),
    )
    identified = tuple(FACTOR_NAMES[j] for j in active)
    return corr, identified


def _terms(r: ValidationRecord) -> dict[str, float]:
    return {k: float(r.breakdown.get(k, 0.0) or 0.0) for k in BREAKDOWN_KEYS}


def _dp(r: ValidationRecord) -> int:
    return int(r.config.get("dp", 1) or 1)


def _adjusted(r: ValidationRecord, c: Corrections) -> float:
    return corrected_step_time_s(r.predicted_step_time_s, _terms(r), c, r.micro_batch_slots, _dp(r))


def _mape_with(records: Sequence[ValidationRecord], c: Corrections) -> float | None:
    if not records:
        return None
    return mape(
        [_adjusted(r, c) for r in records], [float(r.measured_step_time_s or 0.0) for r in records]
    )


def default_holdout(labels: Sequence[str], every: int = 3) -> tuple[str, ...]:
    """Every `every`-th configuration (2nd, 5th, 8th, ... in the given order) is held out."""
    return tuple(label for i, label in enumerate(labels) if i % every == 1)


def calibrate(
    records: Sequence[ValidationRecord],
    *,
    holdout: Sequence[str] | None = None,
    ridge: float = DEFAULT_RIDGE,
    factors: Sequence[str] | None = None,
) -> CalibrationResult:
    """Fit corrections on the measured records not in `holdout`, report errors on both subsets."""
    done = [r for r in records if r.measured_step_time_s]
    if len(done) < 2:
        raise SpecError(
            f"calibration needs at least 2 measured configurations (fit + held-out); got {len(done)}"
        )
    labels = [r.label for r in done]
    held = tuple(default_holdout(labels) if holdout is None else holdout)
    unknown = sorted(set(held) - set(labels))
    if unknown:
        raise SpecError(f"held-out label(s) {', '.join(unknown)} are not measured configurations")
    fit_set = [r for r in done if r.label not in held]
    hold_set = [r for r in done if r.label in held]
    if not fit_set:
        raise SpecError("every measured configuration is held out; nothing is left to fit on")
    corr, identified = fit_corrections(fit_set, ridge=ridge, factors=factors)
    loo_after: float | None = None
    if len(done) >= 3:
        errs = []
        for i, r in enumerate(done):
            c_i, _ = fit_corrections(done[:i] + done[i + 1 :], ridge=ridge, factors=factors)
            errs.append(
                abs(percentage_error(_adjusted(r, c_i), float(r.measured_step_time_s or 0.0)))
            )
        loo_after = sum(errs) / len(errs)
    return CalibrationResult(
        corrections=corr,
        fit_labels=tuple(r.label for r in fit_set),
        holdout_labels=tuple(r.label for r in hold_set),
        fit_mape_before=float(_mape_with(fit_set, IDENTITY) or 0.0),
        fit_mape_after=float(_mape_with(fit_set, corr) or 0.0),
        holdout_mape_before=_mape_with(hold_set, IDENTITY),
        holdout_mape_after=_mape_with(hold_set, corr),
        loo_mape_before=_mape_with(done, IDENTITY) if loo_after is not None else None,
        loo_mape_after=loo_after,
        identified=identified,
        adjusted_step_time_s={r.label: _adjusted(r, corr) for r in done},
    )


# ---------------------------------------------------------------- JSON files


def record_to_json(r: ValidationRecord) -> dict[str, Any]:
    out = asdict(r)
    out["measured_step_times_s"] = list(r.measured_step_times_s)
    out["run_medians_s"] = list(r.run_medians_s)
    if r.measured_step_time_s is not None:
        out["error_fraction"] = percentage_error(r.predicted_step_time_s, r.measured_step_time_s)
    return out


def record_from_json(data: dict[str, Any]) -> ValidationRecord:
    names = {f.name for f in fields(ValidationRecord)}
    try:
        kwargs = {k: v for k, v in data.items() if k in names}
        for k in ("measured_step_times_s", "run_medians_s"):
            kwargs[k] = tuple(kwargs.get(k, ()))
        return ValidationRecord(**kwargs)
    except TypeError as e:
        raise FormatError(f"validation record: {e}") from None


def report_to_json(records: Sequence[ValidationRecord], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": VALIDATION_SCHEMA,
        "meta": meta,
        "records": [record_to_json(r) for r in records],
        "summary": asdict(summarize(records)),
    }


def _read_json(path: str | Path, schema: str, what: str) -> dict[str, Any]:
    p = Path(path)
    data = read_json_file(p, what)
    if not isinstance(data, dict) or data.get("schema") != schema:
        raise FormatError(f"{p}: not a meshplan {what} (schema {schema})")
    return data


def load_report(path: str | Path) -> tuple[list[ValidationRecord], dict[str, Any]]:
    data = _read_json(path, VALIDATION_SCHEMA, "validation report")
    return [record_from_json(r) for r in data.get("records", [])], dict(data.get("meta") or {})


def corrections_path(profile_path: str | Path) -> Path:
    """Where a profile's corrections live: `<profile stem>.corrections.json` beside it."""
    p = Path(profile_path)
    return p.with_name(p.stem + ".corrections.json")


def corrections_to_json(c: Corrections, provenance: dict[str, Any]) -> dict[str, Any]:
    return {"schema": CORRECTIONS_SCHEMA, "corrections": asdict(c), "provenance": provenance}


def load_corrections(path: str | Path) -> Corrections:
    raw = _read_json(path, CORRECTIONS_SCHEMA, "corrections file").get("corrections")
    allowed = {f.name for f in fields(Corrections)}
    if not isinstance(raw, dict) or set(raw) - allowed:
        raise FormatError(
            f"{path}: corrections must be an object with keys among {sorted(allowed)}"
        )
    return replace(IDENTITY, **raw)
