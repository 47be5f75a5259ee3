"""ParallelConfig rules, the plan and profile formats (numbers checked on load, and whether a
profile describes the planned hardware), and the CLI's error conventions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

import presets
from planner.errors import ConfigError, FormatError, SpecError
from planner.parallel import MeshAxis, ParallelConfig, Recompute, balanced_split
from planner.plan import build_plan, load_plan, plan_to_json, save_plan
from planner.profile import (
    SCHEMA_VERSION,
    BlockKind,
    CollectiveOp,
    CollectiveRecord,
    ComputeRecord,
    LinkSample,
    P2PRecord,
    Profile,
    ProfileGpu,
    ProfileMeta,
    fit_alpha_beta,
    load_profile,
    save_profile,
)
from planner.profile_match import check_profile_matches, describes, device_name_for
from planner.serialize import dumps, from_jsonable
from planner.specs import Dtype, TrainingSpec

MODEL = presets.load_model("tiny-llama")
CPU8 = presets.load_cluster("cpu-8")
TRAIN = TrainingSpec(global_batch=8, seq_len=16, dtype=Dtype.FP32)
GIB = 2**30
H100_NAME = "NVIDIA H100 80GB HBM3"
H100_BYTES = 81_559 * 2**20  # what NVML reports for an H100 80GB


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
    assert cfg.mesh_coord(5) == (1, 0, 0, 1)
    assert cfg.mesh_rank(1, 0, 0, 1) == 5
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


# ---------------------------------------------------------------- profile numbers are checked


def _profile_meta(
    kind: str = "gpu", dtype: Dtype = Dtype.BF16, hosts=("h0",), model=None
) -> ProfileMeta:
    return ProfileMeta(
        hosts=hosts,
        device_kind=kind,
        torch_version="t",
        dtype=dtype,
        date="d",
        method="m",
        model=model,
    )


def _compute_record(device: str = H100_NAME, seq_len: int = 128, **kw) -> ComputeRecord:
    base = dict(
        block=BlockKind.TRANSFORMER_BLOCK,
        device_name=device,
        tp=1,
        micro_batch=1,
        seq_len=seq_len,
        recompute=Recompute.NONE,
        forward_s=1e-3,
        forward_spread_s=0.0,
        backward_s=2e-3,
        backward_spread_s=0.0,
        activation_bytes=100,
        parameter_bytes=100,
        repeats=3,
    )
    return ComputeRecord(**{**base, **kw})


def _measured(
    hosts: int = 1,
    per_host: int = 8,
    *,
    device: str = H100_NAME,
    memory: int = H100_BYTES,
    kind: str = "gpu",
    dtype: Dtype = Dtype.BF16,
    compute: bool = True,
    links: bool = True,
    seq_len: int = 128,
    model=None,
) -> Profile:
    gpus = tuple(
        ProfileGpu(
            gpu_id=h * per_host + i,
            host=f"h{h}",
            local_index=i,
            device_name=device,
            memory_bytes=memory,
        )
        for h in range(hosts)
        for i in range(per_host)
    )
    ids = [g.gpu_id for g in gpus]
    p2p = tuple(
        P2PRecord(src=a, dst=b, bandwidth_bytes_per_s=1e11, latency_s=1e-6)
        for a in ids
        for b in ids
        if a != b
    )
    samples = (LinkSample(bytes=1024, seconds=1e-5), LinkSample(bytes=2048, seconds=2e-5))
    coll = tuple(
        CollectiveRecord(
            op=CollectiveOp.ALL_REDUCE,
            gpu_ids=tuple(range(h * per_host, (h + 1) * per_host)),
            layout="contiguous",
            samples=samples,
            alpha_s=1e-5,
            beta_bytes_per_s=1e10,
            busbw_bytes_per_s=1e10,
        )
        for h in range(hosts)
    )
    return Profile(
        schema_version=SCHEMA_VERSION,
        meta=_profile_meta(kind, dtype, tuple(f"h{h}" for h in range(hosts)), model),
        gpus=gpus,
        compute=(_compute_record(device, seq_len),) if compute else (),
        p2p=p2p if links else (),
        collectives=coll if links else (),
    )


@pytest.mark.parametrize(
    ("section", "index", "field", "value", "message"),
    [
        ("compute", 0, "forward_s", -1.0, r"profile\.compute\[0\]: .*forward_s=-1\.0 must be"),
        (
            "compute",
            0,
            "backward_s",
            "NaN",
            r"profile\.compute\[0\]\.backward_s: expected a finite",
        ),
        (
            "compute",
            0,
            "forward_spread_s",
            "Infinity",
            r"compute\[0\]\.forward_spread_s: expected a finite",
        ),
        ("compute", 0, "activation_bytes", -5, r"compute\[0\]: .*activation_bytes=-5 must be"),
        ("compute", 0, "tp", 0, r"compute\[0\]: .*tp=0 must be an integer >= 1"),
        ("p2p", 1, "bandwidth_bytes_per_s", 0.0, r"profile\.p2p\[1\]: p2p record 0->2\.bandwidth"),
        ("p2p", 0, "latency_s", -1e-6, r"p2p\[0\]: p2p record 0->1\.latency_s=-1e-06 must be"),
        ("p2p", 0, "latency_s", "NaN", r"profile\.p2p\[0\]\.latency_s: expected a finite"),
        ("p2p", 0, "dst", 0, r"p2p\[0\]: p2p record 0->0: src and dst must differ"),
        ("collectives", 0, "alpha_s", "NaN", r"collectives\[0\]\.alpha_s: expected a finite"),
        ("collectives", 0, "beta_bytes_per_s", -1.0, r"collectives\[0\]: .*beta_bytes_per_s=-1\.0"),
        ("collectives", 0, "gpu_ids", [0, 0], r"collectives\[0\]: .*gpu_ids must list distinct"),
        ("gpus", 0, "memory_bytes", -1, r"profile\.gpus\[0\]: .*memory_bytes=-1 must be"),
        ("gpus", 0, "gpu_id", -1, r"profile\.gpus\[0\]: .*gpu_id=-1 must be an integer >= 0"),
    ],
)
def test_profile_numbers_are_refused_on_load(tmp_path, section, index, field, value, message):
    path = tmp_path / "p.json"
    save_profile(_measured(per_host=4), path)
    data = json.loads(path.read_text())
    data[section][index][field] = value
    # json.dumps writes NaN / Infinity for the strings below, as a buggy writer might
    text = json.dumps(data)
    for word in ("NaN", "Infinity"):
        text = text.replace(f'"{word}"', word)
    path.write_text(text)
    with pytest.raises(FormatError, match=message):
        load_profile(path)


def test_link_sample_and_meta_refused(tmp_path):
    path = tmp_path / "p.json"
    save_profile(_measured(per_host=2), path)
    data = json.loads(path.read_text())
    data["collectives"][0]["samples"][0]["seconds"] = -1e-5
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"collectives\[0\]\.samples\[0\]: link sample\.seconds"):
        load_profile(path)
    data = json.loads(dumps(_measured(per_host=2)))
    data["meta"]["device_kind"] = "tpu"
    with pytest.raises(FormatError, match=r"meta\.device_kind='tpu' is not allowed; use one of"):
        from_jsonable(Profile, data, "profile")
    path.write_text('{"schema_version": 1, "x": ' + "9" * 5000 + "}")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_profile(path)


def test_records_validate_on_construction_too():
    with pytest.raises(FormatError, match="compute record.forward_s=nan must be a finite number"):
        _compute_record(forward_s=math.nan)
    with pytest.raises(FormatError, match="link sample.bytes=0 must be an integer >= 1"):
        LinkSample(bytes=0, seconds=1.0)


# ---------------------------------------------------------------- profile vs planned hardware

BF16 = TrainingSpec(global_batch=64, seq_len=128)


def test_cpu_profile_for_an_h100_cluster_is_refused():
    cpu = _measured(1, 2, device="cpu (x86)", kind="cpu", dtype=Dtype.FP32, memory=GIB)
    cluster = presets.load_cluster("dgx-h100", 16)
    training = TrainingSpec(global_batch=64, seq_len=128, dtype=Dtype.FP32)
    with pytest.raises(SpecError, match=r"profile device kind 'cpu' does not describe cluster "):
        check_profile_matches(cpu, cluster, training)


def test_dtype_mismatch_is_refused_only_with_compute_records():
    cluster = presets.load_cluster("dgx-h100", 1)
    fp32 = TrainingSpec(global_batch=64, seq_len=128, dtype=Dtype.FP32)
    with pytest.raises(SpecError, match=r"profile dtype=bf16 does not match training dtype=fp32"):
        check_profile_matches(_measured(), cluster, fp32)
    assert check_profile_matches(_measured(compute=False), cluster, fp32) == (
        "compute: the profile has no compute records; block times are not measured",
    )


def test_other_gpu_name_is_refused():
    a100 = _measured(device="NVIDIA A100-SXM4-80GB")
    with pytest.raises(SpecError, match=r"profile GPU name\(s\) 'NVIDIA A100-SXM4-80GB' describe"):
        check_profile_matches(a100, presets.load_cluster("dgx-h100", 1), BF16)


def test_exact_match_has_no_notes():
    assert check_profile_matches(_measured(), presets.load_cluster("dgx-h100", 1), BF16) == ()
    two = _measured(2)
    assert check_profile_matches(two, presets.load_cluster("dgx-h100", 2), BF16) == ()


def test_one_node_profile_on_sixteen_nodes_is_partial():
    notes = check_profile_matches(_measured(), presets.load_cluster("dgx-h100", 16), BF16)
    assert notes == (
        "links: measured inside node 0; not measured inside nodes 1..15",
        "links: cross-node links are not measured (the profile covers one node)",
        "links: collectives were measured on groups within node 0; groups that include "
        "other nodes are not measured",
    )


def test_two_node_profile_on_four_nodes_measures_some_cross_links():
    notes = check_profile_matches(_measured(2), presets.load_cluster("dgx-h100", 4), BF16)
    assert "links: cross-node links are measured only among nodes 0..1" in notes


def test_mixed_cluster_with_one_type_profiled():
    nodes = [{"type": "dgx-h100"}, {"type": "dgx-a100-80gb", "count": 2}]
    cluster = presets.cluster_from_dict({"nodes": nodes}, "t", None)
    notes = check_profile_matches(_measured(), cluster, BF16)
    assert notes[0] == (
        "compute: measured for H100-SXM-80GB on node 0; not measured for A100-80GB on nodes 1..2"
    )
    # the same profile with the A100 nodes listed first: GPU 0 is no longer an H100
    nodes = [{"type": "dgx-a100-80gb", "count": 2}, {"type": "dgx-h100"}]
    cluster = presets.cluster_from_dict({"nodes": nodes}, "t", None)
    with pytest.raises(SpecError, match=r"profile gpu_id 0 is 'NVIDIA H100 80GB HBM3' but GPU 0"):
        check_profile_matches(_measured(), cluster, BF16)


def test_hosts_must_be_the_cluster_nodes():
    link = {"bandwidth_gb_per_s": 450}
    quad = {"gpu": "H100-SXM-80GB", "gpus": 4, "intra_link": link, "nic": link}
    doc = {"node_types": {"quad": quad}, "nodes": [{"type": "quad", "count": 2}]}
    cluster = presets.cluster_from_dict(doc, "t", None)
    with pytest.raises(SpecError, match=r"profile host 'h0' has GPUs on cluster nodes 0 and 1"):
        check_profile_matches(_measured(1, 8), cluster, BF16)
    with pytest.raises(
        SpecError, match=r"cluster node 0 holds GPUs profiled on hosts 'h0' and 'h1'"
    ):
        check_profile_matches(_measured(2, 4), presets.load_cluster("dgx-h100", 1), BF16)
    shifted = _measured(1, 4)
    shifted = replace(
        shifted, gpus=tuple(replace(g, local_index=g.local_index + 1) for g in shifted.gpus)
    )
    with pytest.raises(
        SpecError, match="is local GPU 1 of host 'h0' but local GPU 0 of cluster node 0"
    ):
        check_profile_matches(shifted, presets.load_cluster("dgx-h100", 1), BF16)


def test_partial_node_and_profile_beyond_the_cluster():
    notes = check_profile_matches(_measured(1, 4), presets.load_cluster("dgx-h100", 1), BF16)
    assert notes == ("links: only some GPUs of node 0 were profiled",)
    notes = check_profile_matches(_measured(2), presets.load_cluster("dgx-h100", 1), BF16)
    assert notes == (
        "links: profile GPUs 8..15 lie beyond the cluster's 8 GPUs; their records are not used",
    )


def test_cpu_workers_per_host_must_match_for_compute():
    fp32 = TrainingSpec(global_batch=8, seq_len=128, dtype=Dtype.FP32)
    cpu = _measured(1, 2, device="cpu (x86)", kind="cpu", dtype=Dtype.FP32, memory=8 * GIB)
    assert check_profile_matches(cpu, presets.load_cluster("cpu-2"), fp32) == ()
    with pytest.raises(
        SpecError, match=r"2 worker\(s\) sharing host 'h0', but cluster node 0 runs 8"
    ):
        check_profile_matches(cpu, presets.load_cluster("cpu-8"), fp32)
    links_only = replace(cpu, compute=())
    notes = check_profile_matches(links_only, presets.load_cluster("cpu-8"), fp32)
    assert "links: only some GPUs of node 0 were profiled" in notes
    two_hosts = check_profile_matches(cpu, presets.load_cluster("cpu-2", 2), fp32)
    assert "links: cross-node links are not measured (the profile covers one node)" in two_hosts


def test_compute_notes_for_model_seq_len_and_links():
    cluster = presets.load_cluster("dgx-h100", 1)
    tiny = presets.load_model("tiny-gpt")
    measured = _measured(model=tiny)
    assert check_profile_matches(measured, cluster, BF16, model=tiny) == ()
    llama = presets.load_model("tiny-llama")
    assert check_profile_matches(measured, cluster, BF16, model=llama) == (
        "compute: records are for model 'tiny-gpt', not 'tiny-llama'; not used",
    )
    assert check_profile_matches(_measured(), cluster, BF16, model=tiny) == (
        "compute: records are for an unnamed model, not 'tiny-gpt'; not used",
    )
    long = TrainingSpec(global_batch=64, seq_len=2048)
    assert check_profile_matches(_measured(), cluster, long) == (
        "compute: records are for seq_len 128, not 2048; not used",
    )
    assert check_profile_matches(_measured(links=False), cluster, BF16) == (
        "links: the profile has no link measurements; links are not measured",
    )


def test_memory_note_when_devices_are_smaller_than_the_plan_budget():
    small = _measured(memory=40 * GIB, device="NVIDIA A100-SXM4-40GB")
    notes = check_profile_matches(small, presets.load_cluster("dgx-a100-80gb", 1), BF16)
    assert notes == (
        "memory: the profiled A100-80GB devices report 40.0 GiB, less than the 76.0 GiB plans "
        "budget; set usable_memory_gib for the GPU in the cluster YAML or use --memory-headroom",
    )


@pytest.mark.parametrize(
    ("device", "gpu", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM-80GB", True),
        ("NVIDIA H100 PCIe", "H100-SXM-80GB", True),
        ("NVIDIA GH200 480GB", "H100-SXM-80GB", False),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB", True),
        ("NVIDIA A100-SXM4-80GB", "H100-SXM-80GB", False),
        ("NVIDIA H200", "H200-141GB", True),
        ("NVIDIA L40S", "L40S", True),
        ("AMD Instinct MI300X", "MI300X", True),
        ("cpu (AMD EPYC 7B13)", "cpu-worker", False),  # a GPU-kind profile is never a CPU
    ],
)
def test_describes(device, gpu, expected):
    assert describes(device, "gpu", presets.load_gpu(gpu)) is expected


def test_describes_cpu_and_custom_names():
    assert describes("cpu (Intel Xeon)", "cpu", presets.load_gpu("cpu-worker"))
    assert not describes("cpu (Intel Xeon)", "cpu", presets.load_gpu("A100-80GB"))
    custom = replace(presets.load_gpu("A100-80GB"), name="Lab Box")
    assert describes("lab box", "gpu", custom) and not describes("NVIDIA A100", "gpu", custom)
    assert device_name_for(_measured(), presets.load_gpu("H100-SXM-80GB")) == H100_NAME
    assert device_name_for(_measured(), presets.load_gpu("A100-80GB")) is None


def test_mixed_cluster_never_borrows_another_types_block_times() -> None:
    """An H100 profile on an H100 + A100 cluster: the A100 node has no measured device."""
    from planner.cost.compute import node_device_names
    from planner.specs import ClusterSpec

    h100 = presets.load_node_type("dgx-h100")
    a100 = presets.load_node_type("dgx-a100-80gb")
    mixed = ClusterSpec(name="mix", nodes=(h100, a100))
    assert node_device_names(_measured(), mixed) == (H100_NAME, None)
    assert node_device_names(_measured(), ClusterSpec(name="h", nodes=(h100, h100))) == (
        H100_NAME,
        H100_NAME,
    )
