"""Pure tests of planner/validation.py: metrics by hand, the calibration fit, the JSON files."""

from __future__ import annotations

import json
import random

import pytest

from planner.errors import FormatError, SpecError
from planner.validation import (
    IDENTITY,
    Corrections,
    ValidationRecord,
    apply_corrections,
    calibrate,
    corrections_path,
    corrections_to_json,
    fit_corrections,
    load_corrections,
    load_report,
    mape,
    median_after_warmup,
    ranks,
    report_to_json,
    spearman,
    summarize,
    top_choice,
)


def rec(
    label: str, pred: float, meas: float | None, rank: int = 0, **terms: float
) -> ValidationRecord:
    return ValidationRecord(
        label=label,
        config={},
        predicted_step_time_s=pred,
        measured_step_time_s=meas,
        planner_rank=rank,
        breakdown=terms,
    )


def test_mape_by_hand() -> None:
    # |1.1-1|/1 = 0.1, |1.5-2|/2 = 0.25, |3-3|/3 = 0 -> mean 0.35/3
    assert mape([1.1, 1.5, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(0.35 / 3)
    with pytest.raises(SpecError):
        mape([1.0], [0.0])
    with pytest.raises(SpecError):
        mape([], [])


def test_ranks_average_ties() -> None:
    assert ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]


def test_spearman_by_hand() -> None:
    # ranks x = 1..5, y ranks = 2,1,4,3,5: d = (1,1,1,1,0), sum d^2 = 4,
    # rho = 1 - 6*4/(5*(25-1)) = 1 - 24/120 = 0.8 (no ties, so the d^2 formula holds).
    assert spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [9, 9, 9]) is None
    assert spearman([1.0], [2.0]) is None


def test_spearman_monotone_invariance() -> None:
    rng = random.Random(0)
    xs = [rng.random() for _ in range(12)]
    ys = [x + 0.3 * rng.random() for x in xs]
    assert spearman(xs, ys) == pytest.approx(spearman([x**3 for x in xs], [2 * y + 1 for y in ys]))


def test_median_after_warmup() -> None:
    assert median_after_warmup([9.0, 5.0, 1.0, 2.0, 3.0], 2) == (2.0, 2)
    # Never drop every step.
    assert median_after_warmup([9.0, 4.0], 5) == (4.0, 1)
    with pytest.raises(SpecError):
        median_after_warmup([], 1)


def test_top_choice_loss() -> None:
    records = [
        rec("a", pred=1.0, meas=1.2, rank=0),
        rec("b", pred=1.1, meas=1.0, rank=1),
        rec("c", pred=1.3, meas=None, rank=2),
    ]
    t = top_choice(records)
    assert t is not None
    assert (t.top_label, t.best_label, t.top_is_best) == ("a", "b", False)
    assert t.loss_fraction == pytest.approx(0.2)
    s = summarize(records)
    assert s.configurations == 3 and s.measured == 2
    assert s.mape == pytest.approx((0.2 / 1.2 + 0.1) / 2)
    assert top_choice([rec("x", 1.0, None)]) is None


def _synthetic(truth: Corrections, n: int, seed: int, noise: float) -> list[ValidationRecord]:
    """Configurations whose 'measured' time follows the correction formula with known factors."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        terms = {
            "compute_s": rng.uniform(0.05, 0.3),
            "bubble_s": rng.choice([0.0, rng.uniform(0.01, 0.1)]),
            "tp_comm_s": rng.choice([0.0, rng.uniform(0.01, 0.08)]),
            "pp_comm_s": rng.choice([0.0, rng.uniform(0.001, 0.02)]),
            "dp_comm_s": rng.choice([0.0, rng.uniform(0.01, 0.06)]),
            "optimizer_s": rng.uniform(0.002, 0.01),
        }
        pred = sum(terms.values())
        r = rec(f"c{i}", pred, None, rank=i, **terms)
        true_time = apply_corrections({"step_time_s": pred, "breakdown": terms}, truth)[
            "step_time_s"
        ]
        out.append(
            ValidationRecord(
                **{**r.__dict__, "measured_step_time_s": true_time * (1 + rng.gauss(0, noise))}
            )
        )
    return out


def test_fit_recovers_known_factors() -> None:
    truth = Corrections(
        compute_scale=1.3,
        tp_comm_scale=2.0,
        pp_comm_scale=1.0,
        dp_comm_scale=1.5,
        step_overhead_s=0.02,
    )
    records = _synthetic(truth, 40, seed=1, noise=0.0)
    fitted, identified = fit_corrections(records, ridge=1e-9)
    assert fitted.compute_scale == pytest.approx(1.3, rel=1e-3)
    assert fitted.tp_comm_scale == pytest.approx(2.0, rel=1e-3)
    assert fitted.dp_comm_scale == pytest.approx(1.5, rel=1e-3)
    assert fitted.step_overhead_s == pytest.approx(0.02, rel=1e-2)
    assert "tp_comm_scale" in identified


def test_fit_reports_overlap_when_dp_is_overpriced() -> None:
    truth = Corrections(dp_comm_scale=1.0, overlap_fraction=0.6)
    fitted, _ = fit_corrections(_synthetic(truth, 30, seed=2, noise=0.0), ridge=1e-9)
    assert fitted.dp_comm_scale == pytest.approx(1.0)
    assert fitted.overlap_fraction == pytest.approx(0.6, abs=1e-3)


def test_unseen_term_stays_at_default() -> None:
    records = [
        rec(f"c{i}", 0.1 * (i + 1), 0.12 * (i + 1), compute_s=0.1 * (i + 1)) for i in range(5)
    ]
    fitted, identified = fit_corrections(records)
    assert fitted.tp_comm_scale == 1.0 and "tp_comm_scale" not in identified


def test_calibrate_lowers_held_out_error() -> None:
    truth = Corrections(
        compute_scale=1.25, tp_comm_scale=1.8, dp_comm_scale=1.4, step_overhead_s=0.01
    )
    records = _synthetic(truth, 15, seed=3, noise=0.02)
    result = calibrate(records)
    assert result.holdout_labels and result.fit_labels
    assert set(result.holdout_labels).isdisjoint(result.fit_labels)
    assert result.holdout_mape_before is not None and result.holdout_mape_after is not None
    assert result.holdout_mape_after < 0.5 * result.holdout_mape_before
    assert result.fit_mape_after < result.fit_mape_before
    assert result.loo_mape_after is not None and result.loo_mape_after < result.loo_mape_before


def test_calibrate_rejects_bad_input() -> None:
    with pytest.raises(SpecError):
        calibrate([rec("a", 1.0, 1.0, compute_s=1.0)])
    records = [rec(f"c{i}", 1.0, 1.1, compute_s=1.0) for i in range(3)]
    with pytest.raises(SpecError, match="nope"):
        calibrate(records, holdout=["nope"])


def test_apply_corrections_identity_and_formula() -> None:
    est = {
        "step_time_s": 1.0,
        "tokens_per_s": 100.0,
        "breakdown": {
            "compute_s": 0.5,
            "bubble_s": 0.1,
            "tp_comm_s": 0.2,
            "dp_comm_s": 0.1,
            "optimizer_s": 0.05,
        },
    }
    assert apply_corrections(est, IDENTITY)["step_time_s"] == pytest.approx(1.0)
    c = Corrections(compute_scale=2.0, dp_comm_scale=1.0, overlap_fraction=0.5, step_overhead_s=0.1)
    out = apply_corrections(est, c)
    # +0.6 (compute+bubble doubled) -0.05 (half of dp hidden) +0.1 overhead
    assert out["step_time_s"] == pytest.approx(1.65)
    assert out["uncorrected_step_time_s"] == 1.0
    assert out["tokens_per_s"] == pytest.approx(100.0 / 1.65)
    assert out["breakdown"]["dp_comm_s"] == pytest.approx(0.05)
    assert est["step_time_s"] == 1.0  # input untouched


def test_corrections_validate() -> None:
    with pytest.raises(SpecError):
        Corrections(compute_scale=0.0)
    with pytest.raises(SpecError):
        Corrections(overlap_fraction=1.5)


def test_report_and_corrections_round_trip(tmp_path) -> None:
    records = [rec("a", 1.0, 1.1, compute_s=1.0), rec("b", 2.0, None, rank=1)]
    path = tmp_path / "validation.json"
    path.write_text(json.dumps(report_to_json(records, {"host": "x"})))
    back, meta = load_report(path)
    assert back == records and meta == {"host": "x"}
    cpath = corrections_path(tmp_path / "profile2.json")
    assert cpath.name == "profile2.corrections.json"
    c = Corrections(compute_scale=1.2, step_overhead_s=0.01)
    cpath.write_text(json.dumps(corrections_to_json(c, {})))
    assert load_corrections(cpath) == c
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "other"}')
    with pytest.raises(FormatError):
        load_report(bad)
    with pytest.raises(FormatError):
        load_corrections(bad)


def test_fit_recovers_micro_batch_overhead_within_bounds() -> None:
    truth = Corrections(compute_scale=1.1, micro_batch_overhead_s=0.004, step_overhead_s=0.0)
    rng = random.Random(5)
    records = []
    for i in range(12):
        slots = rng.choice([1, 2, 4, 5, 8, 9])
        terms = {"compute_s": rng.uniform(0.05, 0.3), "optimizer_s": 0.002}
        pred = sum(terms.values())
        meas = apply_corrections({"step_time_s": pred, "breakdown": terms}, truth, slots=slots)
        records.append(
            ValidationRecord(
                label=f"c{i}",
                config={},
                predicted_step_time_s=pred,
                breakdown=terms,
                micro_batch_slots=slots,
                measured_step_time_s=meas["step_time_s"],
            )
        )
    fitted, _ = fit_corrections(records, ridge=1e-10)
    assert fitted.micro_batch_overhead_s == pytest.approx(0.004, rel=1e-3)
    assert fitted.compute_scale == pytest.approx(1.1, rel=1e-3)
    # overheads are never fitted negative, scales never leave SCALE_RANGE
    fast = [
        ValidationRecord(**{**r.__dict__, "measured_step_time_s": 0.01 * r.predicted_step_time_s})
        for r in records
    ]
    clamped, _ = fit_corrections(fast)
    assert clamped.micro_batch_overhead_s >= 0 and clamped.step_overhead_s >= 0
    assert clamped.compute_scale >= 0.05 - 1e-12


def test_apply_corrections_needs_slots_for_micro_batch_overhead() -> None:
    est = {"step_time_s": 1.0, "breakdown": {"compute_s": 1.0}}
    c = Corrections(micro_batch_overhead_s=0.01)
    with pytest.raises(SpecError):
        apply_corrections(est, c)
    assert apply_corrections(est, c, slots=5)["step_time_s"] == pytest.approx(1.05)


def test_run_to_run_mape_is_the_noise_floor() -> None:
    r = ValidationRecord(
        label="a",
        config={},
        predicted_step_time_s=1.0,
        measured_step_time_s=1.0,
        run_medians_s=(0.8, 1.0, 1.3),
    )
    single = ValidationRecord(
        label="b", config={}, predicted_step_time_s=1.0, measured_step_time_s=2.0
    )
    s = summarize([r, single])
    assert s.run_to_run_mape == pytest.approx((0.2 + 0.0 + 0.3) / 3)
    assert summarize([single]).run_to_run_mape is None


def test_fit_only_chosen_factors() -> None:
    truth = Corrections(compute_scale=1.4, tp_comm_scale=3.0)
    records = _synthetic(truth, 20, seed=7, noise=0.0)
    fitted, identified = fit_corrections(records, ridge=1e-9, factors=["compute_scale"])
    assert identified == ("compute_scale",)
    assert fitted.tp_comm_scale == 1.0 and fitted.step_overhead_s == 0.0
    with pytest.raises(SpecError, match="bogus"):
        fit_corrections(records, factors=["bogus"])


def test_fit_recovers_dp_overhead_only_where_dp_is_used() -> None:
    truth = Corrections(compute_scale=1.2, dp_overhead_s=0.04)
    records = []
    for i in range(10):
        dp = 2 if i % 2 else 1
        terms = {"compute_s": 0.05 + 0.01 * i, "optimizer_s": 0.002}
        pred = sum(terms.values())
        meas = apply_corrections({"step_time_s": pred, "breakdown": terms}, truth, dp=dp)
        records.append(
            ValidationRecord(
                label=f"c{i}",
                config={"dp": dp},
                predicted_step_time_s=pred,
                breakdown=terms,
                measured_step_time_s=meas["step_time_s"],
            )
        )
    assert records[1].measured_step_time_s - records[0].measured_step_time_s > 0.04
    fitted, _ = fit_corrections(records, ridge=1e-10, factors=["compute_scale", "dp_overhead_s"])
    assert fitted.dp_overhead_s == pytest.approx(0.04, rel=1e-3)
    assert fitted.compute_scale == pytest.approx(1.2, rel=1e-3)
    with pytest.raises(SpecError):
        apply_corrections({"step_time_s": 1.0, "breakdown": {}}, truth)
