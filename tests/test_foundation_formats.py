"""ParallelConfig rules, the plan and profile formats, and the CLI's error conventions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import presets
from planner.errors import ConfigError, FormatError
from planner.parallel import MeshAxis, ParallelConfig, balanced_split
from planner.plan import build_plan, load_plan, plan_to_json, save_plan
from planner.profile import (
    SCHEMA_VERSION,
    LinkSample,
    Profile,
    ProfileGpu,
    ProfileMeta,
    fit_alpha_beta,
    load_profile,
    save_profile,
)
from planner.specs import Dtype, TrainingSpec

MODEL = presets.load_model("tiny-llama")
CPU8 = presets.load_cluster("cpu-8")
TRAIN = TrainingSpec(global_batch=8, seq_len=16, dtype=Dtype.FP32)


def test_degrees_must_multiply_to_world_size_with_arithmetic():
    cfg = ParallelConfig(tp=2, pp=2, dp=3, micro_batch=1)
    with pytest.raises(ConfigError, match=r"2\*2\*3 = 12 != 8"):
        cfg.validate(MODEL, TRAIN, CPU8)


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        (dict(tp=8, pp=1, dp=1, micro_batch=1), "tp=8 must divide heads=4"),
        (dict(tp=1, pp=8, dp=1, micro_batch=1), r"layers >= pp\*virtual_stages"),
        (
            dict(tp=1, pp=1, dp=8, micro_batch=2),
            "global_batch must be a multiple of dp\\*micro_batch",
        ),
        (dict(tp=1, pp=4, dp=2, micro_batch=2), "1f1b needs micro-batches >= pp"),
        (dict(tp=2, pp=2, dp=2, micro_batch=1, stage_layers=(1, 1)), "stage_layers sum to 2"),
        (
            dict(tp=1, pp=1, dp=8, micro_batch=1, rank_to_gpu=(0,) * 8),
            "rank_to_gpu must use every GPU id",
        ),
    ],
)
def test_each_rule_is_named(kwargs, rule):
    with pytest.raises(ConfigError, match=rule):
        ParallelConfig(**kwargs).validate(MODEL, TRAIN, CPU8)


def test_construction_rules():
    with pytest.raises(ConfigError, match="virtual_stages=2 needs schedule=interleaved"):
        ParallelConfig(tp=1, pp=2, dp=1, micro_batch=1, virtual_stages=2)
    with pytest.raises(ConfigError, match="sequence_parallel needs tp >= 2"):
        ParallelConfig(tp=1, pp=1, dp=1, micro_batch=1, sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"zero=4 is not allowed; use one of 0\|1\|2\|3"):
        ParallelConfig(tp=1, pp=1, dp=1, micro_batch=1, zero=4)
    with pytest.raises(ConfigError, match=r"recompute='some' is not allowed"):
        ParallelConfig(tp=1, pp=1, dp=1, micro_batch=1, recompute="some")


@given(st.integers(1, 200), st.integers(1, 50))
def test_balanced_split_is_contiguous_and_even(layers, chunks):
    if chunks > layers:
        return
    split = balanced_split(layers, chunks)
    assert sum(split) == layers and max(split) - min(split) <= 1 and len(split) == chunks


def test_mesh_coordinates_and_groups_follow_the_rank_map():
    cfg = ParallelConfig(tp=2, pp=2, dp=2, micro_batch=1, rank_to_gpu=(7, 6, 5, 4, 3, 2, 1, 0))
    assert cfg.mesh_coord(5) == (1, 0, 1)
    assert cfg.mesh_rank(1, 0, 1) == 5
    assert cfg.group_gpus(MeshAxis.TP, 0) == (7, 6)
    assert cfg.group_gpus(MeshAxis.DP, 0) == (7, 5)
    assert cfg.group_gpus(MeshAxis.PP, 0) == (7, 3)


def _plan():
    cfg = ParallelConfig(tp=2, pp=2, dp=2, micro_batch=1, schedule="interleaved", virtual_stages=2)
    return build_plan(
        model=MODEL,
        training=TRAIN,
        cluster=CPU8,
        config=cfg,
        prediction={"step_time_s": 1.0},
        source="analytic",
    )


def test_plan_round_trip_is_byte_identical(tmp_path):
    plan = _plan()
    assert [s.pp_rank for s in plan.stages] == [0, 1, 0, 1]
    assert plan.stages[0].has_embedding and plan.stages[-1].has_head
    assert plan.config.stage_layers == (1, 1, 1, 1)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    again = load_plan(path)
    assert again == plan
    assert plan_to_json(again) == path.read_text()
    assert not (tmp_path / "plan.json.tmp").exists()


def test_plan_loader_rejects_unknown_version_and_garbage(tmp_path):
    path = tmp_path / "plan.json"
    data = json.loads(plan_to_json(_plan()))
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match="schema_version=99 is not supported"):
        load_plan(path)
    path.write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_plan(path)


def _profile():
    meta = ProfileMeta(
        hosts=("h",),
        device_kind="cpu",
        torch_version="x",
        dtype=Dtype.FP32,
        date="2026-01-01",
        method="test",
    )
    gpus = tuple(
        ProfileGpu(gpu_id=i, host="h", local_index=i, device_name="cpu", memory_bytes=1)
        for i in range(2)
    )
    return Profile(schema_version=SCHEMA_VERSION, meta=meta, gpus=gpus)


def test_profile_round_trip_and_version(tmp_path):
    path = tmp_path / "p.json"
    save_profile(_profile(), path)
    assert load_profile(path) == _profile()
    data = json.loads(path.read_text())
    data["schema_version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match="schema_version=2"):
        load_profile(path)


def test_alpha_beta_fit_recovers_known_line():
    alpha, beta = 20e-6, 5e9
    samples = [
        LinkSample(bytes=b, seconds=alpha + b / beta) for b in (1 << 10, 1 << 16, 1 << 20, 1 << 24)
    ]
    a, bw = fit_alpha_beta(samples)
    assert a == pytest.approx(alpha, rel=1e-6) and bw == pytest.approx(beta, rel=1e-6)
    with pytest.raises(FormatError, match="two distinct"):
        fit_alpha_beta([LinkSample(bytes=8, seconds=1.0), LinkSample(bytes=8, seconds=2.0)])


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("presets", "show", "llama3-7b"), "did you mean 'llama3-70b'"),
        (("presets", "chips"), "unknown preset kind 'chips'"),
        (("nosuchcommand",), "No such command"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, message):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_presets_json_is_one_document():
    r = _cli("presets", "models", "--json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert {m["name"] for m in data["models"]} >= {"gpt3-175b", "llama3-405b", "qwen2.5-72b"}


def test_cli_env_json():
    r = _cli("env", "--json")
    assert r.returncode == 0 and "solvers" in json.loads(r.stdout)
