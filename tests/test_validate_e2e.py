"""End to end on CPU: `meshplan validate` runs two configurations of tiny-gpt for 3 steps each
under torchrun (2 gloo ranks), then `calibrate` and `report` work on its output."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from cli.main import main  # noqa: E402


@pytest.mark.slow
def test_validate_calibrate_report(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    configs = tmp_path / "configs.yaml"
    configs.write_text(
        "- {tp: 1, pp: 1, dp: 2, micro_batch: 2}\n- {tp: 1, pp: 2, dp: 1, micro_batch: 2}\n"
    )
    out = tmp_path / "report"
    rc = main(
        ["validate", "--cluster", "cpu-2", "--device", "cpu", "--configs", str(configs),
         "--steps", "3", "--warmup", "1", "--timeout-s", "80", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "validation.json").read_text())
    records = report["records"]
    assert [r["label"] for r in records] == ["tp1pp1dp2-mb2-none", "tp1pp2dp1-mb2-none"]
    for r in records:
        assert r["error"] is None, r["error"]
        assert len(r["measured_step_times_s"]) == 2 and r["warmup_steps_dropped"] == 1
        assert r["measured_step_time_s"] > 0 and r["predicted_step_time_s"] > 0
        assert r["measured_peak_memory_bytes"] > 0
    s = report["summary"]
    assert s["measured"] == 2 and s["mape"] is not None and s["top_choice"] is not None
    for name in ("scatter", "timeline", "memory"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.svg").is_file()
    page = (out / "report.html").read_text()
    assert not re.search(r"https?://", page)

    # calibrate needs the profile the report was made with; without one it refuses to guess
    assert main(["calibrate", str(out / "validation.json"), "--profile", str(tmp_path / "nope.json"), "--out", str(tmp_path / "p2.json")]) == 2  # fmt: skip

    plan = out / "plans" / "tp1pp2dp1-mb2-none.json"
    assert main(["report", str(plan), "--out", str(tmp_path / "html"), "--validation", str(out / "validation.json")]) == 0  # fmt: skip
    page = (tmp_path / "html" / "report.html").read_text()
    assert page.count("<svg") == 3 and not re.search(r"https?://", page)
