"""One `error:` line, the right exit status and nothing written for `validate`, `calibrate`,
`report` and `plan --report`'s pictures: unwritable outputs, outputs that are inputs, missing
torch or matplotlib, impossible numbers, and runs that all failed. Measuring is replaced by
fakes, so no test here starts torchrun."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from cli_helpers import one_error, tiny_cpu_profile

from cli import report_render as rr
from cli.main import main
from cli.plan_report import write_plan_report
from planner.errors import SpecError
from planner.plan import build_plan, save_plan
from planner.profile import load_profile, profile_sha256, save_profile
from planner.specs import Dtype
from planner.validation import (
    Corrections,
    ValidationRecord,
    apply_corrections,
    corrections_path,
    report_to_json,
)

CONFIGS = "- {tp: 1, pp: 1, dp: 2, micro_batch: 2}\n- {tp: 1, pp: 2, dp: 1, micro_batch: 2}\n"


def unwritable(tmp_path: Path, kind: str) -> Path:
    """Paths no output can be created at (as files or as directories)."""
    (tmp_path / "afile").write_text("keep me\n")
    return {
        "dev-null": Path("/dev/null/x"),
        "parent-is-file": tmp_path / "afile" / "x",
        "missing-parent": tmp_path / "missing" / "x",
    }[kind]


UNWRITABLE = ["dev-null", "parent-is-file", "missing-parent"]


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if validate gets as far as planning and measuring."""

    def refuse(**_: object) -> None:
        raise AssertionError("validate started work before checking its options")

    monkeypatch.setattr("cli.validate_cmd.run_validation", refuse)


# ---------------------------------------------------------------- validate


@pytest.mark.parametrize("kind", UNWRITABLE)
def test_validate_refuses_unwritable_out(kind, tmp_path, capsys, no_run) -> None:
    out = unwritable(tmp_path, kind)
    assert main(["validate", "--out", str(out)]) == 2
    one_error(capsys, "--out", str(out))
    assert not (tmp_path / "missing").exists()


def test_validate_refuses_out_that_is_a_file(tmp_path, capsys, no_run) -> None:
    f = tmp_path / "report"
    f.write_text("keep me\n")
    assert main(["validate", "--out", str(f)]) == 2
    one_error(capsys, "--out", "is a file")
    assert f.read_text() == "keep me\n"


@pytest.mark.parametrize(
    "args,words",
    [
        (["--warmup", "8", "--steps", "8"], ["--warmup 8", "less than --steps 8"]),
        (["--warmup", "3", "--steps", "2"], ["--warmup 3", "--steps 2"]),
        (["--warmup", "-1"], ["--warmup -1", ">= 0"]),
        (["--steps", "0"], ["--steps 0", "positive"]),
        (["--repeats", "0"], ["--repeats 0", "positive"]),
        (["--top", "0"], ["--top 0", "positive"]),
        (["--timeout-s", "0"], ["--timeout-s 0.0", "positive"]),
        (["--timeout-s", "-5"], ["--timeout-s -5.0", "positive"]),
        (["--timeout-s", "nan"], ["--timeout-s nan", "finite"]),
        (["--timeout-s", "inf"], ["--timeout-s inf", "finite"]),
    ],
)
def test_validate_refuses_impossible_numbers(args, words, tmp_path, capsys, no_run) -> None:
    assert main(["validate", *args, "--out", str(tmp_path / "r")]) == 2
    one_error(capsys, *words)
    assert not (tmp_path / "r").exists()


def test_validate_without_torch_names_the_local_install(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    monkeypatch.setattr("cli.validate_cmd.run_validation", None)
    assert main(["validate", "--out", str(tmp_path / "r")]) == 2
    one_error(capsys, "torch", "pip install -e '.[torch]'")


def test_validate_without_matplotlib_fails_before_measuring(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("cli.validate_cmd.run_validation", None)
    assert main(["validate", "--out", str(tmp_path / "r")]) == 2
    one_error(capsys, "matplotlib", "pip install -e '.[report]'")


def _fake_measure(fail: set[str]):  # type: ignore[no-untyped-def]
    """A stand-in for `measure`: plans whose stem is in `fail` fail as a missing backend would."""

    def measure(plan_path: Path, *, steps: int, warmup: int, work: Path, timeout_s: float):  # type: ignore[no-untyped-def]
        log = work / "logs" / f"{plan_path.stem}.log"
        if plan_path.stem in fail:
            return {"error": f"executor exit 1: RuntimeError: gloo is not available (log: {log})"}
        times = (0.2,) + (0.1,) * (steps - 1)
        return {
            "step_times_s": times,
            "median_s": 0.1,
            "dropped": warmup,
            "peak_memory_bytes": 1e6,
            "wall_s": 1.0,
            "note": None,
        }

    return measure


def _validate_configs(tmp_path: Path) -> list[str]:
    configs = tmp_path / "configs.yaml"
    configs.write_text(CONFIGS)
    return ["validate", "--configs", str(configs), "--steps", "3", "--warmup", "1"]


def test_validate_exits_1_when_every_configuration_failed(tmp_path, capsys, monkeypatch) -> None:
    both = {"tp1pp1dp2-mb2-none", "tp1pp2dp1-mb2-none"}
    monkeypatch.setattr("cli.validate_run.measure", _fake_measure(both))
    out = tmp_path / "r"
    assert main([*_validate_configs(tmp_path), "--out", str(out)]) == 1
    line = one_error(capsys, "all 2 configuration(s) failed", f"{out}/round*/logs/")
    assert "gloo is not available" in line
    # the report of what was tried is still written, whole
    report = json.loads((out / "validation.json").read_text())
    assert report["summary"]["measured"] == 0
    assert (out / "report.html").is_file()


def test_validate_reports_some_failures_and_exits_0(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("cli.validate_run.measure", _fake_measure({"tp1pp2dp1-mb2-none"}))
    out = tmp_path / "r"
    assert main([*_validate_configs(tmp_path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "error:" not in err and "Traceback" not in err
    warnings = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1
    assert "1 of 2 configurations failed" in warnings[0] and "tp1pp2dp1-mb2-none" in warnings[0]
    assert f"{out}/round*/logs/" in warnings[0]
    # `report` renders from what validate wrote, and includes the validation
    html = tmp_path / "html"
    plan = out / "plans" / "tp1pp1dp2-mb2-none.json"
    assert main(["report", str(plan), "--out", str(html), "--validation", str(out / "validation.json")]) == 0  # fmt: skip
    assert (html / "report.html").read_text().count("<svg") == 3
    assert sorted(p.name for p in html.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------- calibrate


@pytest.fixture
def calibration_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """(validation.json, profile.json) that calibrate accepts."""
    prof = tiny_cpu_profile(2)
    profile = tmp_path / "profile.json"
    save_profile(prof, profile)
    truth = Corrections(compute_scale=1.5)
    records = []
    for i in range(6):
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
    report = tmp_path / "val" / "validation.json"
    report.parent.mkdir()
    report.write_text(json.dumps(report_to_json(records, {"profile_sha256": profile_sha256(prof)})))
    return report, profile


def _calibrate(report: Path, profile: Path, out: Path) -> int:
    return main(["calibrate", str(report), "--profile", str(profile), "--out", str(out)])


@pytest.mark.parametrize("kind", UNWRITABLE)
def test_calibrate_refuses_unwritable_out(kind, tmp_path, capsys, calibration_inputs) -> None:
    report, profile = calibration_inputs
    out = unwritable(tmp_path, kind).with_suffix(".json")
    assert _calibrate(report, profile, out) == 2
    one_error(capsys, "--out", str(out))
    assert not (report.parent / "calibration.json").exists()


def test_calibrate_refuses_out_that_is_a_directory(tmp_path, capsys, calibration_inputs) -> None:
    report, profile = calibration_inputs
    assert _calibrate(report, profile, tmp_path) == 2
    one_error(capsys, "--out", "is a directory")


def test_calibrate_refuses_to_overwrite_its_inputs(tmp_path, capsys, calibration_inputs) -> None:
    report, profile = calibration_inputs
    before = profile.read_bytes(), report.read_bytes()
    assert _calibrate(report, profile, profile) == 2
    one_error(capsys, "--out", "is also an input")
    assert _calibrate(report, profile, report) == 2
    one_error(capsys, "--out", "is also an input")
    assert (profile.read_bytes(), report.read_bytes()) == before
    assert not corrections_path(profile).exists()
    # the summary calibrate writes beside the report may not land on the profile copy
    assert _calibrate(report, profile, report.parent / "calibration.json") == 2
    one_error(capsys, "--out", "calibration.json")
    assert sorted(p.name for p in report.parent.iterdir()) == ["validation.json"]


def test_calibrate_writes_whole_files(tmp_path, capsys, calibration_inputs) -> None:
    report, profile = calibration_inputs
    out = tmp_path / "p2.json"
    assert _calibrate(report, profile, out) == 0
    # a new profile: the input's records plus the fitted corrections; the input is untouched
    calibrated, original = load_profile(out), load_profile(profile)
    assert calibrated.corrections is not None and original.corrections is None
    assert calibrated.corrections.factors.compute_scale > 1
    assert replace(calibrated, corrections=None) == original
    assert not corrections_path(out).exists()  # no sidecar any more
    assert json.loads((report.parent / "calibration.json").read_text())["fit_labels"]
    leftovers = [
        p.name for d in (tmp_path, report.parent) for p in d.iterdir() if p.name.startswith(".")
    ]
    assert leftovers == []


# ---------------------------------------------------------------- report and plan --report


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    from planner.cost.estimate import estimate
    from planner.parallel import ParallelConfig
    from planner.specs import TrainingSpec
    from presets import load_cluster, load_model

    model, cluster = load_model("tiny-gpt"), load_cluster("cpu-2", None)
    training = TrainingSpec(global_batch=8, seq_len=128, dtype=Dtype.FP32)
    config = ParallelConfig(tp=1, pp=2, dp=1, micro_batch=2)
    plan = build_plan(
        model=model,
        training=training,
        cluster=cluster,
        config=config,
        prediction=estimate(model, training, cluster, config).to_json(),
        source="analytic",
    )
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    return path


@pytest.mark.parametrize("kind", UNWRITABLE)
def test_report_refuses_unwritable_out(kind, tmp_path, capsys, plan_file) -> None:
    out = unwritable(tmp_path, kind)
    assert main(["report", str(plan_file), "--out", str(out)]) == 2
    one_error(capsys, "--out", str(out))


def test_report_refuses_out_that_is_a_file(tmp_path, capsys, plan_file) -> None:
    out = tmp_path / "afile"
    out.write_text("keep me\n")
    assert main(["report", str(plan_file), "--out", str(out)]) == 2
    one_error(capsys, "--out", "is a file")
    assert out.read_text() == "keep me\n"


def test_report_refuses_missing_validation_file(tmp_path, capsys, plan_file) -> None:
    missing = tmp_path / "nope.json"
    args = ["report", str(plan_file), "--out", str(tmp_path / "r"), "--validation", str(missing)]
    assert main(args) == 2
    one_error(capsys, str(missing))
    assert not (tmp_path / "r").exists()


def test_report_without_matplotlib_names_the_local_install(
    tmp_path, capsys, monkeypatch, plan_file
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(plan_file), "--out", str(tmp_path / "r")]) == 2
    one_error(capsys, "matplotlib", "pip install -e '.[report]'")
    assert not (tmp_path / "r").exists()


def test_require_matplotlib(monkeypatch) -> None:
    rr.require_matplotlib("--report")  # installed in the test environment: no error
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(
        SpecError, match=r"^--report needs matplotlib.*pip install -e '\.\[report\]'"
    ):
        rr.require_matplotlib("--report")


def test_write_plan_report_checks_its_directory(tmp_path, plan_file) -> None:
    from planner.plan import load_plan

    plan = load_plan(plan_file)
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    for bad in (afile, afile / "x", tmp_path / "missing" / "x"):
        with pytest.raises(SpecError, match=r"^--report "):
            write_plan_report(plan, plan.prediction, bad)
    assert afile.read_text() == "keep me\n" and not (tmp_path / "missing").exists()
    out = tmp_path / "pics"
    paths = write_plan_report(plan, plan.prediction, out)
    assert sorted(p.name for p in paths) == sorted(os.listdir(out))


def test_write_plan_report_without_matplotlib(tmp_path, monkeypatch, plan_file) -> None:
    from planner.plan import load_plan

    plan = load_plan(plan_file)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SpecError, match=r"^--report needs matplotlib"):
        write_plan_report(plan, plan.prediction, tmp_path / "pics")
    assert not (tmp_path / "pics").exists()
