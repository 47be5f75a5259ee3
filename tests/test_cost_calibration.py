"""The committed analytic constants reproduce PTD-P Table 1 (issue 3: MAPE <= 10 %)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.cost.calibration import cases, percentage_errors

TABLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "calibration" / "ptdp_table1.json"


@pytest.mark.skipif(
    not TABLE.is_file(), reason="../shared/calibration/ptdp_table1.json not present"
)
def test_ptdp_table1_mape_within_10_percent() -> None:
    errors = percentage_errors(cases(json.loads(TABLE.read_text())))
    assert len(errors) == 10
    mape = sum(abs(e) for e in errors) / len(errors)
    assert mape <= 10.0, f"MAPE {mape:.1f} % (per row: {[round(e, 1) for e in errors]})"
