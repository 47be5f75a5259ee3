"""`meshplan replan` and planner/replan.py: names, survivors, the profile carried over, the
global batch when the old one no longer divides, the slowdown, the checkpoint to resume from,
and the command-line contract (one error line, exit 2 / 3, one JSON document)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import presets
from cli.launch_cmd import write_launch_dir
from cli.main import main
from executor import checkpoint_dir as layout
from executor.emit import LAUNCH_RECORD, EmitOptions
from planner import replan as rp
from planner.cost.collectives import CollectiveOp
from planner.errors import NoFeasiblePlan, SpecError
from planner.parallel import ParallelConfig
from planner.plan import Plan, build_plan, load_plan, save_plan
from planner.profile import CollectiveRecord, P2PRecord, Profile, ProfileGpu, ProfileMeta
from planner.profile_match import check_profile_matches
from planner.search_space import SearchOptions
from planner.specs import Dtype, TrainingSpec

GB = 1e9


def _plan(nodes: int = 4, node_type: str = "dgx-h100", batch: int = 64, **cfg: object) -> Plan:
    config = cfg or {"tp": 8, "pp": 1, "dp": nodes, "micro_batch": 1}
    return build_plan(
        model=presets.load_model("llama3-8b"),
        training=TrainingSpec(global_batch=batch, seq_len=4096),
        cluster=presets.load_cluster(node_type, nodes),
        config=ParallelConfig(**config),  # type: ignore[arg-type]
        prediction={},
        source="analytic",
    )


def _searched(nodes: int, batch: int) -> Plan:
    """The plan `meshplan plan` makes for llama3-8b on `nodes` DGX H100s (analytic)."""
    from planner.planning import place_winner
    from planner.search import search

    model, cluster = presets.load_model("llama3-8b"), presets.load_cluster("dgx-h100", nodes)
    training = TrainingSpec(global_batch=batch, seq_len=4096)
    best = place_winner(model, training, cluster, search(model, training, cluster)).plans[0]
    return build_plan(
        model=model,
        training=training,
        cluster=cluster,
        config=best.config,
        prediction=best.estimate.to_json(),
        source="analytic",
    )


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error(err: str, *words: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ names and survivors


def test_unknown_names_list_the_allowed_ones() -> None:
    cluster = _plan().cluster
    assert rp.parse_nodes("node3,1,node1", cluster) == [1, 3]
    with pytest.raises(SpecError, match="'node4': no such node; the plan's nodes are node0..node3"):
        rp.parse_nodes("node4", cluster)
    with pytest.raises(SpecError, match="'32': no such GPU; the plan's GPU ids are 0..31"):
        rp.parse_gpus("3,32", cluster)
    with pytest.raises(SpecError, match="FACTOR in \\(0, 1\\]"):
        rp.parse_degrades(["node2:1.5"], cluster)
    assert rp.parse_degrades(["node2:0.25", "node0:0.5"], cluster) == [(0, 0.5), (2, 0.25)]


def test_survivors_renumber_and_drop_partial_nodes() -> None:
    cluster = _plan().cluster
    s = rp.survivors(cluster, exclude_nodes=[1], exclude_gpus=[17])
    # GPU 17 is node 2's local GPU 1: node 2 goes whole (launch files need equal nodes).
    assert s.node_map == (0, 3) and s.lost_nodes == (1, 2) and s.partial_dropped == (2,)
    assert s.gpu_map == (*range(0, 8), *range(24, 32))
    kept = rp.survivors(cluster, exclude_gpus=[17], keep_partial_nodes=True)
    assert [n.gpus for n in kept.cluster.nodes] == [8, 8, 7, 8] and 17 not in kept.gpu_map
    one = rp.survivors(_plan(1, batch=8).cluster, exclude_gpus=[3])
    assert one.cluster.nodes[0].gpus == 7 and one.gpu_map == (0, 1, 2, 4, 5, 6, 7)
    slow = rp.survivors(cluster, degrade=[(2, 0.25)])
    assert (
        slow.cluster.nodes[2].nic.bandwidth_bytes_per_s
        == cluster.nodes[2].nic.bandwidth_bytes_per_s / 4
    )
    assert slow.cluster.nodes[1] == cluster.nodes[1] and not slow.lost_nodes
    with pytest.raises(NoFeasiblePlan, match="nothing is left"):
        rp.survivors(cluster, exclude_nodes=[0, 1, 2], exclude_gpus=range(24, 32))


# ------------------------------------------------------------------ the profile carried over


def _profile() -> Profile:
    """Two hosts of two CPU workers: p2p inside and across, one cross-node all-reduce."""
    gpus = tuple(
        ProfileGpu(
            gpu_id=i, host=f"h{i // 2}", local_index=i % 2, device_name="cpu", memory_bytes=2**34
        )
        for i in range(4)
    )
    p2p = tuple(
        P2PRecord(
            src=a, dst=b, bandwidth_bytes_per_s=(10 if a // 2 == b // 2 else 1) * GB, latency_s=1e-5
        )
        for a in range(4)
        for b in range(4)
        if a != b
    )
    coll = CollectiveRecord(
        op=CollectiveOp.ALL_REDUCE,
        gpu_ids=(1, 2),
        layout="strided",
        samples=(),
        alpha_s=1e-5,
        beta_bytes_per_s=GB,
        busbw_bytes_per_s=GB,
    )
    meta = ProfileMeta(
        hosts=("h0", "h1"),
        device_kind="cpu",
        torch_version="x",
        dtype=Dtype.FP32,
        date="d",
        method="m",
    )
    return Profile(schema_version=1, meta=meta, gpus=gpus, p2p=p2p, collectives=(coll,))


def test_profile_is_renumbered_for_the_survivors_and_degraded_links_scaled() -> None:
    cluster = presets.load_cluster("cpu-2", 3)
    # A third host's GPUs 4, 5 were never profiled; node 0 is lost: h1 becomes node 0.
    prof = _profile()
    s = rp.survivors(cluster, exclude_nodes=[0], degrade=[(2, 0.5)])
    new = rp.remap_profile(prof, cluster, s)
    assert [(g.gpu_id, g.host, g.local_index) for g in new.gpus] == [(0, "h1", 0), (1, "h1", 1)]
    assert {(r.src, r.dst) for r in new.p2p} == {(0, 1), (1, 0)} and not new.collectives
    training = TrainingSpec(global_batch=4, seq_len=16, dtype=Dtype.FP32)
    check_profile_matches(new, s.cluster, training)
    # Degrading node 1 scales the measured links that leave it, not those inside a node.
    d = rp.survivors(cluster, degrade=[(1, 0.25)])
    scaled = rp.remap_profile(prof, cluster, d)
    bw = {(r.src, r.dst): r.bandwidth_bytes_per_s for r in scaled.p2p}
    assert bw[(0, 2)] == 0.25 * GB and bw[(2, 3)] == 10 * GB and bw[(0, 1)] == 10 * GB
    assert scaled.collectives[0].beta_bytes_per_s == 0.25 * GB


# ------------------------------------------------------------------ batch, slowdown


def test_a_batch_the_survivors_cannot_divide_moves_to_the_nearest_that_fits() -> None:
    plan = _plan(4, batch=4, tp=8, pp=1, dp=4, micro_batch=1)
    s = rp.survivors(plan.cluster, exclude_nodes=[3])
    pinned = SearchOptions(top_k=1, fix={"tp": 8, "pp": 1})
    assert rp.batch_candidates(plan.model, plan.training, s.cluster, pinned)[:2] == [3, 6]
    res = rp.replan(plan, s, options=pinned)
    assert res.plan.training.global_batch == 3 and res.plan.config.dp == 3
    assert any("global batch 4 divides no valid layout" in w for w in res.warnings)
    # Same batch when it still divides a layout.
    res = rp.replan(plan, rp.survivors(plan.cluster, exclude_nodes=[2, 3]), options=pinned)
    assert res.plan.training.global_batch == 4 and res.plan.config.dp == 2 and not res.warnings


def test_slowdown_against_the_old_plan_and_the_degraded_alternative() -> None:
    plan = _searched(4, batch=64)
    res = rp.replan(plan, rp.survivors(plan.cluster, exclude_nodes=[1]))
    assert res.plan.cluster.num_gpus == 24 and res.plan.model == plan.model
    assert res.slowdown == pytest.approx(
        res.old_estimate.tokens_per_s / res.new_estimate.tokens_per_s
    )
    assert res.slowdown > 1  # three quarters of the GPUs for the same work
    deg = rp.replan(plan, rp.survivors(plan.cluster, degrade=[(0, 0.1)]))
    assert deg.old_on_degraded is not None
    # Re-planning on the degraded cluster is never predicted slower than keeping the old plan.
    assert deg.new_estimate.step_time_s <= deg.old_on_degraded.step_time_s * (1 + 1e-9)
    assert deg.old_on_degraded.step_time_s > deg.old_estimate.step_time_s


# ------------------------------------------------------------------ the command


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.json"
    save_plan(_plan(2, batch=8, tp=8, pp=1, dp=2, micro_batch=1), path)
    rc, out, err = _cli(capsys, "replan", str(path), "--exclude", "node7")
    assert rc == 2 and not out
    _one_error(err, "--exclude 'node7'", "node0..node1")
    rc, _, err = _cli(capsys, "replan", str(path), "--exclude-gpus", "16")
    assert rc == 2
    _one_error(err, "--exclude-gpus '16'", "0..15")
    rc, _, err = _cli(capsys, "replan", str(path))
    assert rc == 2
    _one_error(err, "--exclude NODES")
    rc, out, err = _cli(capsys, "replan", str(path), "--exclude", "node0,node1", "--json")
    assert rc == 3 and not out
    _one_error(err, "nothing is left")


def test_cli_json_is_one_document_and_finds_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    launch = tmp_path / "launch"
    write_launch_dir(_searched(4, batch=64), launch, EmitOptions(checkpoint_name="run-7"))
    ckpt = launch / "checkpoints"
    for step in (10, 20):
        (layout.partial_dir(ckpt, step)).mkdir(parents=True)
        (layout.partial_dir(ckpt, step) / layout.DCP_METADATA).write_text("x")
        record = layout.CheckpointRecord(
            step=step,
            model_name="llama3-8b",
            model_fingerprint=layout.model_fingerprint(presets.load_model("llama3-8b")),
            layout="tp=8 pp=1 dp=4",
            world_size=32,
        )
        layout.publish(ckpt, step, record)
    layout.partial_dir(ckpt, 30).mkdir()  # a save that never finished
    new_launch = tmp_path / "launch2"
    rc, out, err = _cli(
        capsys,
        "replan",
        str(launch / "plan.json"),
        "--exclude",
        "node2",
        "--out",
        str(tmp_path / "new.json"),
        "--emit",
        str(new_launch),
        "--json",
    )
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["lost_nodes"] == ["node2"] and doc["node_map"] == [0, 1, 3]
    assert doc["resume"]["step"] == 20 and doc["resume"]["found_in"] == "launch.json"
    assert doc["resume"]["pod_checkpoint_dir"] == "/checkpoints/run-7"
    assert doc["slowdown"] > 1 and doc["new"]["gpus"] == 24
    new = load_plan(tmp_path / "new.json")
    assert new.cluster.num_gpus == 24
    # The new launch files checkpoint where the old ones did (host and pods).
    rec = json.loads((new_launch / LAUNCH_RECORD).read_text())
    assert rec["host_checkpoint_dir"] == str(ckpt.resolve())
    assert rec["pod_checkpoint_dir"] == "/checkpoints/run-7"
    assert load_plan(new_launch / "plan.json") == new


def test_cli_text_says_how_to_pass_a_checkpoint_when_none_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plan.json"
    save_plan(_plan(4, batch=64), path)
    rc, out, err = _cli(capsys, "replan", str(path), "--exclude", "node3")
    assert rc == 0, err
    assert "re-planned llama3-8b for 3 of 4 nodes" in out and "time per token" in out
    assert "pass --checkpoint-dir DIR" in out
    rc, out, _ = _cli(
        capsys,
        "replan",
        str(path),
        "--exclude",
        "node0",
        "--checkpoint-dir",
        str(tmp_path / "none"),
    )
    assert rc == 0 and "no complete checkpoint in" in out
    assert "node1..node3 -> node0..node2" in out


def test_a_profile_of_the_old_cluster_is_carried_to_the_survivors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from planner.profile import save_profile

    one = presets.load_cluster("cpu-2", 2)
    plan = build_plan(
        model=presets.load_model("tiny-gpt"),
        training=TrainingSpec(global_batch=8, seq_len=16, dtype=Dtype.FP32),
        cluster=one,
        config=ParallelConfig(tp=1, pp=1, dp=4, micro_batch=1),
        prediction={},
        source="analytic",
    )
    save_plan(plan, tmp_path / "plan.json")
    save_profile(_profile(), tmp_path / "p.json")
    rc, out, err = _cli(
        capsys,
        "replan",
        str(tmp_path / "plan.json"),
        "--exclude",
        "node0",
        "--profile",
        str(tmp_path / "p.json"),
        "--json",
    )
    assert rc == 0, err
    assert json.loads(out)["new"]["gpus"] == 2
    # A profile of other hardware is refused with one line.
    wrong = replace(_profile(), gpus=tuple(replace(g, host="hx") for g in _profile().gpus))
    save_profile(wrong, tmp_path / "bad.json")
    rc, _, err = _cli(
        capsys,
        "replan",
        str(tmp_path / "plan.json"),
        "--exclude",
        "node0",
        "--profile",
        str(tmp_path / "bad.json"),
    )
    assert rc == 2
    _one_error(err, "profile host 'hx'")


def test_a_faster_nearby_batch_is_named_and_planned_on_request() -> None:
    plan = _searched(4, batch=64)
    surv = rp.survivors(plan.cluster, exclude_nodes=[1])
    kept = rp.replan(plan, surv, batch_tolerance=0.125)
    assert kept.plan.training.global_batch == 64
    (hint,) = [w for w in kept.warnings if "--change-batch plans it" in w]
    changed = rp.replan(plan, surv, batch_tolerance=0.125, change_batch=True)
    b = changed.plan.training.global_batch
    assert b != 64 and abs(b - 64) <= 8 and f"global batch {b} " in hint
    assert changed.new_estimate.tokens_per_s > kept.new_estimate.tokens_per_s
    assert any("is not the fastest on the 24 surviving GPUs" in w for w in changed.warnings)


def test_json_is_one_document_on_the_real_stdout(tmp_path: Path) -> None:
    """As a user runs it: a subprocess, the real fd 1, the solver loaded (pp > 1 candidates)."""
    import subprocess
    import sys

    save_plan(_searched(4, batch=64), tmp_path / "plan.json")
    r = subprocess.run(
        [sys.executable, "-m", "cli", "replan", "plan.json", "--exclude", "node1", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    doc, end = json.JSONDecoder().raw_decode(r.stdout.lstrip())
    assert r.stdout.lstrip()[end:].strip() == "" and doc["lost_nodes"] == ["node1"]
