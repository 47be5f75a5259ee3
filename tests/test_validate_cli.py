"""`meshplan calibrate` and the configs file of `meshplan validate`, without running torch."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from cli_helpers import tiny_cpu_profile

from cli.main import main
from cli.validate_cmd import load_configs_file
from planner.errors import ConfigError, FormatError
from planner.profile import Profile, load_profile, profile_sha256, save_profile
from planner.validation import (
    Corrections,
    ValidationRecord,
    apply_corrections,
    corrections_path,
    report_to_json,
)


def _profile(path) -> Profile:
    p = tiny_cpu_profile(2)
    save_profile(p, path)
    return p


def test_calibrate_writes_profile_copy_and_corrections(tmp_path) -> None:
    prof = _profile(tmp_path / "profile.json")
    truth = Corrections(compute_scale=1.5, step_overhead_s=0.01)
    records = []
    for i in range(9):
        terms = {"compute_s": 0.05 * (i + 1), "tp_comm_s": 0.01 * (i % 3), "optimizer_s": 0.001}
        pred = sum(terms.values())
        meas = apply_corrections({"step_time_s": pred, "breakdown": terms}, truth)["step_time_s"]
        records.append(
            ValidationRecord(
                label=f"c{i}",
                config={},
                predicted_step_time_s=pred,
                breakdown=terms,
                planner_rank=i,
                measured_step_time_s=meas,
            )
        )
    report = tmp_path / "validation.json"
    meta = {"profile_sha256": profile_sha256(prof)}
    report.write_text(json.dumps(report_to_json(records, meta)))
    out = tmp_path / "profile2.json"
    rc = main(
        ["calibrate", str(report), "--profile", str(tmp_path / "profile.json"), "--out", str(out)]
    )
    assert rc == 0
    # the corrections live in the new profile (the input is never touched) with the same
    # measurements; no sidecar is written any more
    written = load_profile(out)
    assert replace(written, corrections=None) == prof
    assert not corrections_path(out).exists()
    fitted = written.corrections
    assert fitted is not None
    assert fitted.factors.compute_scale == pytest.approx(1.5, rel=0.05)
    assert set(fitted.holdout_labels) == {"c1", "c4", "c7"}
    assert fitted.base_profile_sha256 == profile_sha256(prof)
    cal = json.loads((tmp_path / "calibration.json").read_text())
    assert cal["holdout_mape_after"] < cal["holdout_mape_before"]

    # a report measured with another profile is refused
    other = tmp_path / "other.json"
    report.write_text(json.dumps(report_to_json(records, {"profile_sha256": "0" * 64})))
    assert main(["calibrate", str(report), "--profile", str(tmp_path / "profile.json"), "--out", str(other)]) == 2  # fmt: skip
    assert not other.exists()


def test_configs_file(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("- {tp: 1, pp: 2, dp: 1, micro_batch: 2, recompute: full}\n")
    (c,) = load_configs_file(str(f))
    assert (c.pp, c.recompute.value) == (2, "full")
    f.write_text("- {tp: 1, pp: 2, dp: 1, micro_batch: 2, bogus: 1}\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_configs_file(str(f))
    f.write_text("tp: 1\n")
    with pytest.raises(FormatError):
        load_configs_file(str(f))
    f.write_text("- {tp: 1, pp: 2, dp: 1, micro_batch: 2, recompute: sometimes}\n")
    with pytest.raises(ConfigError, match="recompute"):
        load_configs_file(str(f))


def test_validate_rejects_bad_input_with_one_line(tmp_path, capsys) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("- {tp: 2, pp: 2, dp: 2, micro_batch: 1}\n")
    assert main(["validate", "--configs", str(f), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "tp*pp*dp" in err and len(err.strip().splitlines()) == 1
    assert main(["validate", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2


def test_validate_refuses_duplicate_configurations(tmp_path, capsys) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "- {tp: 1, pp: 1, dp: 2, micro_batch: 2}\n- {tp: 1, pp: 1, dp: 2, micro_batch: 2}\n"
    )
    assert main(["validate", "--configs", str(f), "--out", str(tmp_path / "r")]) == 2
    assert "more than once" in capsys.readouterr().err
