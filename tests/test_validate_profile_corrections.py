"""Corrections in the profile format: round trip, old profiles, the estimate hook, the outputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from cli_helpers import tiny_cpu_profile

import cli.main
import presets
from cli.calibrate_cmd import load_profile_arg
from cli.main import main
from planner.cost.corrections import (
    BREAKDOWN_KEYS,
    Corrections,
    ProfileCorrections,
    corrected_step_time_s,
    micro_batch_slots,
)
from planner.cost.estimate import estimate
from planner.errors import FormatError
from planner.parallel import ParallelConfig
from planner.profile import load_profile, profile_from_dict, save_profile
from planner.serialize import to_jsonable
from planner.specs import Dtype, ModelSpec, TrainingSpec
from planner.validation import corrections_path, corrections_to_json

SMALL = "{family: gpt, layers: 4, hidden: 128, heads: 4, ffn_hidden: 512, vocab: 1024, max_seq_len: 128}\n"
FACTORS = Corrections(
    compute_scale=1.3,
    tp_comm_scale=2.0,
    optimizer_scale=4.0,
    step_overhead_s=0.002,
    micro_batch_overhead_s=0.001,
    dp_overhead_s=0.01,
)
FITTED = ProfileCorrections(
    factors=FACTORS,
    fitted_on_host="vm",
    fitted_on_date="2026-12-02T00:00:00Z",
    identified=("compute_scale", "tp_comm_scale"),
    fit_labels=("a", "b"),
    holdout_labels=("c",),
)


def _model(tmp_path: Path) -> tuple[Path, ModelSpec]:
    path = tmp_path / "small-gpt.yaml"
    path.write_text(SMALL)
    return path, presets.load_model(str(path))


def test_profile_with_corrections_round_trips(tmp_path: Path) -> None:
    prof = replace(tiny_cpu_profile(2), corrections=FITTED)
    save_profile(prof, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == prof
    assert json.loads((tmp_path / "p.json").read_text())["corrections"]["schema"] == (
        "meshplan-corrections/1"
    )


def test_old_profile_without_corrections_loads_and_keeps_its_bytes(tmp_path: Path) -> None:
    raw = tiny_cpu_profile(2)
    doc = to_jsonable(raw)
    assert "corrections" not in doc  # a raw profile's JSON is what it was before the field
    assert profile_from_dict(doc).corrections is None


def test_unknown_corrections_schema_is_refused() -> None:
    doc = to_jsonable(replace(tiny_cpu_profile(2), corrections=FITTED))
    doc["corrections"]["schema"] = "meshplan-corrections/9"
    with pytest.raises(FormatError, match="corrections-9|corrections/9"):
        profile_from_dict(doc)


@pytest.mark.parametrize(("tp", "pp", "dp", "mb"), [(1, 1, 2, 1), (2, 1, 1, 4), (1, 2, 1, 1)])
def test_estimate_applies_profile_corrections_exactly(tmp_path, tp, pp, dp, mb) -> None:
    _, model = _model(tmp_path)
    cluster = presets.load_cluster("cpu-2", None)
    training = TrainingSpec(global_batch=8, seq_len=128, dtype=Dtype.FP32)
    config = ParallelConfig(tp=tp, pp=pp, dp=dp, micro_batch=mb)
    raw_profile = tiny_cpu_profile(2)
    raw = estimate(model, training, cluster, config, raw_profile)
    fixed = estimate(model, training, cluster, config, replace(raw_profile, corrections=FITTED))
    terms = {k: getattr(raw.breakdown, k) for k in BREAKDOWN_KEYS}
    slots = micro_batch_slots(config.num_micro_batches(training), pp)
    want = corrected_step_time_s(raw.step_time_s, terms, FACTORS, slots, dp)
    assert fixed.step_time_s == pytest.approx(want, rel=1e-12)
    assert fixed.step_time_s != pytest.approx(raw.step_time_s)
    assert fixed.uncorrected_step_time_s == raw.step_time_s
    assert fixed.breakdown.compute_s == pytest.approx(1.3 * raw.breakdown.compute_s)
    assert fixed.breakdown.tp_comm_s == pytest.approx(2.0 * raw.breakdown.tp_comm_s)
    assert fixed.breakdown.optimizer_s == pytest.approx(4.0 * raw.breakdown.optimizer_s)
    assert fixed.tokens_per_s == pytest.approx(raw.tokens_per_s * raw.step_time_s / want)
    assert fixed.mfu == pytest.approx(raw.mfu * raw.step_time_s / want)
    overheads = fixed.corrections["overheads_s"] if fixed.corrections else {}
    assert overheads["step_overhead_s"] == pytest.approx(0.002 + 0.001 * slots)
    assert overheads["dp_overhead_s"] == (0.01 if dp > 1 else 0.0)
    assert fixed.notes[0].startswith("corrected by calibration fitted on vm 2026-12-02")
    doc = fixed.to_json()
    assert doc["corrections"]["factors"]["compute_scale"] == 1.3
    assert doc["uncorrected_step_time_s"] == raw.step_time_s
    assert "corrections" not in raw.to_json() and raw.corrections is None


def _estimate_args(model: Path, profile: Path) -> list[str]:
    return [
        "estimate",
        "--model",
        str(model),
        "--cluster",
        "cpu-2",
        "--global-batch",
        "8",
        "--seq-len",
        "128",
        "--tp",
        "1",
        "--pp",
        "1",
        "--micro-batch",
        "1",
        "--profile",
        str(profile),
    ]


def test_estimate_command_says_it_is_corrected(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli.main, "COMMAND_MODULES", ("cli.presets_cmd", "cli.estimate_cmd"))
    model, _ = _model(tmp_path)
    save_profile(replace(tiny_cpu_profile(2), corrections=FITTED), tmp_path / "p2.json")
    save_profile(tiny_cpu_profile(2), tmp_path / "p.json")
    assert main([*_estimate_args(model, tmp_path / "p2.json"), "--json"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert main([*_estimate_args(model, tmp_path / "p.json"), "--json"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert "corrections" not in raw
    assert fixed["uncorrected_step_time_s"] == pytest.approx(raw["step_time_s"])
    assert fixed["corrections"]["fitted_on_host"] == "vm"
    assert any(n.startswith("corrected by calibration fitted on vm") for n in fixed["notes"])
    assert main(_estimate_args(model, tmp_path / "p2.json")) == 0
    captured = capsys.readouterr()
    assert "corrected by calibration fitted on vm" in captured.out.replace("\n", " ")
    assert "uncorrected step time" in captured.out


def test_legacy_sidecar_is_read_with_a_note(tmp_path, capsys) -> None:
    save_profile(tiny_cpu_profile(2), tmp_path / "p.json")
    side = corrections_path(tmp_path / "p.json")
    side.write_text(json.dumps(corrections_to_json(FACTORS, {"fit_labels": ["a"]})))
    profile, factors, _ = load_profile_arg(str(tmp_path / "p.json"))
    assert factors == FACTORS
    assert profile.corrections.fit_labels == ("a",)
    assert "legacy" in capsys.readouterr().err


def test_search_bounds_stay_below_corrected_estimates(tmp_path) -> None:
    """A correction that speeds estimates up (scale < 1) scales the SplitProblem the search
    bounds from by corrections.lower_bound_scale, so no bound exceeds its corrected estimate."""
    from planner.cost.corrections import lower_bound_scale
    from planner.cost.estimate import split_problem
    from planner.search import step_lower_bound_s

    _, model = _model(tmp_path)
    cluster = presets.load_cluster("cpu-2", None)
    training = TrainingSpec(global_batch=8, seq_len=128, dtype=Dtype.FP32)
    fast = replace(FITTED, factors=replace(FACTORS, compute_scale=0.5, tp_comm_scale=0.7))
    raw_p = tiny_cpu_profile(2)
    fixed_p = replace(raw_p, corrections=fast)
    assert lower_bound_scale(fast.factors) == 0.5
    for tp, pp, dp, mb in [(1, 1, 2, 1), (2, 1, 1, 4), (1, 2, 1, 1)]:
        config = ParallelConfig(tp=tp, pp=pp, dp=dp, micro_batch=mb)
        raw = split_problem(model, training, cluster, config, raw_p)
        fixed = split_problem(model, training, cluster, config, fixed_p)
        assert fixed.block_time_s == tuple(0.5 * t for t in raw.block_time_s)
        est = estimate(model, training, cluster, config, fixed_p)
        assert step_lower_bound_s(fixed) <= est.step_time_s
