"""Context parallelism through the CLI and the cost model: a 2M-token Llama-3.1-8B fits only with cp.

The model is a Llama-3.1-8B-shaped YAML file with max_seq_len 2,097,152 (meta-llama/Llama-3.1-8B
config.json shape: 32 layers, hidden 4096, 32 heads, 8 KV heads, ffn 14336, vocab 128256).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cli_helpers import one_error
from hypothesis import given
from hypothesis import strategies as st

import presets
from cli.main import main
from planner.cost import cp as cpcost
from planner.cost.comm import ClusterArrays
from planner.cost.estimate import estimate
from planner.parallel import MeshAxis, ParallelConfig
from planner.plan import build_plan, plan_to_json
from planner.runtime import EXECUTOR_CP, CpAttention
from planner.specs import Dtype, TrainingSpec

SEQ = 2_097_152
LLAMA31_8B = """name: llama-3.1-8b-2m
family: llama
layers: 32
hidden: 4096
heads: 32
kv_heads: 8
ffn_hidden: 14336
vocab: 128256
max_seq_len: 2097152
"""
LONG = ["--global-batch", "8", "--seq-len", str(SEQ), "--tp", "8", "--pp", "1"]
LONG += ["--micro-batch", "1", "--recompute", "full"]


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    path = tmp_path / "llama31-8b-2m.yaml"
    path.write_text(LLAMA31_8B)
    return str(path)


def _estimate(capsys: pytest.CaptureFixture[str], model: str, *args: str) -> tuple[int, dict]:
    code = main(["estimate", "--model", model, "--cluster", "dgx-h100", *args])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else {})


def test_estimate_at_2m_tokens_fits_with_cp16_only(
    model_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # the command as written: sequence parallelism is on by default at tp >= 2
    code, doc = _estimate(capsys, model_file, "--nodes", "16", *LONG, "--cp", "16", "--json")
    assert code == 0 and doc["fits"], doc.get("peak_memory_bytes")
    assert doc["config"]["cp"] == 16 and doc["config"]["sequence_parallel"] is True
    assert doc["breakdown"]["cp_comm_s"] > 0
    assert any("all_gather_kv attention" in n for n in doc["notes"])
    # the executor's own memory rules: without sequence parallelism the block inputs kept by
    # full recompute (32 GiB) and the vocab-parallel loss (16 B per logit, 31 GiB) overflow 80 GB
    code, doc = _estimate(
        capsys, model_file, "--nodes", "16", *LONG, "--cp", "16", "--no-sequence-parallel", "--json"
    )
    assert code == 3 and not doc["fits"]
    # the same configuration without CP (one node: dp = 1) does not fit: exit 3; on 16 nodes
    # cp = 1 would make dp = 16 > the global batch of 8 (an invalid configuration, exit 2)
    code, doc = _estimate(capsys, model_file, "--nodes", "1", *LONG, "--cp", "1", "--json")
    assert code == 3 and not doc["fits"]
    assert "cp_comm_s" not in doc["breakdown"]


def test_plan_at_2m_tokens_picks_context_parallelism(
    model_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["plan", "--model", model_file, "--cluster", "dgx-h100", "--nodes", "16"]
        + ["--global-batch", "8", "--seq-len", str(SEQ), "--json"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    doc = json.loads(captured.out)
    assert any("context parallelism searched" in n for n in doc["search_notes"])
    plans = doc["plans"]
    assert plans[0]["config"]["cp"] > 1
    assert all(p["fits"] for p in plans)


def test_cp_errors_are_one_line(model_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["estimate", "--model", model_file, "--cluster", "dgx-h100", "--nodes", "16"]
        + ["--global-batch", "8", "--seq-len", "6000", "--tp", "8", "--pp", "1", "--cp", "16"]
        + ["--micro-batch", "1"]
    )
    assert code == 2
    one_error(capsys, "cp=16", "seq_len", "2*cp")
    code = main(
        ["plan", "--model", model_file, "--cluster", "dgx-h100", "--global-batch", "8"]
        + ["--seq-len", "4096", "--fix", "cp=x"]
    )
    assert code == 2
    one_error(capsys, "cp=x")


def _llama(seq: int = 8192):  # noqa: ANN202
    return replace(presets.load_model("llama3-8b"), max_seq_len=seq)


def test_balanced_causal_attention_flops_are_1_over_cp_of_the_whole() -> None:
    m = _llama()
    whole = cpcost.attention_square_flops(m, 1, 8192, 1, 1)
    for cp in (2, 4, 8):
        assert cpcost.attention_square_flops(m, 1, 8192, 1, cp) == pytest.approx(whole / cp)


def test_cp_memory_shrinks_activations_and_keeps_the_gathered_kv() -> None:
    cluster = presets.load_cluster("dgx-h100", nodes=1)
    m = _llama(65536)
    t = TrainingSpec(global_batch=8, seq_len=65536, dtype=Dtype.BF16)
    base = ParallelConfig(tp=1, pp=1, dp=8, micro_batch=1, zero=1)
    one = estimate(m, t, cluster, base)
    eight = estimate(m, t, cluster, replace(base, dp=1, cp=8))
    act1, act8 = one.memory_breakdown.activations, eight.memory_breakdown.activations
    # activations per GPU fall by about cp, less the gathered K, V each block keeps
    kv = cpcost.kv_bytes(m, 1, 65536, 1, Dtype.BF16) * (1 - 1 / 8) * m.layers
    assert act8 < act1 / 4
    assert act8 > act1 / 8 + 0.9 * kv
    assert eight.breakdown.cp_comm_s > 0 and one.breakdown.cp_comm_s == 0


def test_cp_group_inside_a_node_uses_the_intra_link() -> None:
    cluster = presets.load_cluster("dgx-h100", nodes=2)
    inside = ClusterArrays(cluster, ParallelConfig(tp=2, pp=1, dp=2, cp=4, micro_batch=1), 1.0)
    across = ClusterArrays(cluster, ParallelConfig(tp=8, pp=1, dp=1, cp=2, micro_batch=1), 1.0)
    nvlink = cluster.nodes[0].intra_link.bandwidth_bytes_per_s
    assert inside.axis_links(MeshAxis.CP)[0].bandwidth_bytes_per_s == nvlink
    assert across.axis_links(MeshAxis.CP)[0].bandwidth_bytes_per_s < nvlink
    # the CP group of mesh rank 0: GPUs 0, 2, 4, 6 (tp innermost, then cp)
    assert inside.cp_groups(0)[0].tolist() == [0, 2, 4, 6]


def test_ring_hides_behind_attention_and_ulysses_is_bounded_by_kv_heads() -> None:
    m = _llama()
    link = cpcost.CpLink(size=8, bandwidth_bytes_per_s=50e9, latency_s=5e-6)
    slow = cpcost.PassTimes(forward_s=1.0, backward_s=2.5)
    fast = cpcost.PassTimes(forward_s=1e-6, backward_s=2.5e-6)
    kw = dict(micro_batch=1, seq_len=8192, tp=1, link=link, recompute="none", dtype=Dtype.BF16)
    ring = CpAttention.RING
    hidden = cpcost.block_comm_times(ring, m, attention=slow, rules=EXECUTOR_CP, **kw)
    exposed = cpcost.block_comm_times(ring, m, attention=fast, rules=EXECUTOR_CP, **kw)
    assert hidden is not None and exposed is not None
    assert hidden.forward_s == 0 and exposed.forward_s > 0
    ag = cpcost.block_comm_times(
        CpAttention.ALL_GATHER_KV, m, attention=slow, rules=EXECUTOR_CP, **kw
    )
    assert ag is not None and ag.forward_s > 0  # the executor's gather is not overlapped
    assert cpcost.ulysses_fits(m, 1, 8) and not cpcost.ulysses_fits(m, 2, 8)
    assert (
        cpcost.block_comm_times(
            CpAttention.ULYSSES, m, attention=slow, rules=EXECUTOR_CP, **{**kw, "tp": 2}
        )
        is None
    )


def test_cp1_plan_bytes_have_no_cp_fields() -> None:
    cluster = presets.load_cluster("dgx-h100", nodes=1)
    m = _llama()
    t = TrainingSpec(global_batch=8, seq_len=8192, dtype=Dtype.BF16)
    one = build_plan(
        model=m,
        training=t,
        cluster=cluster,
        config=ParallelConfig(tp=8, pp=1, dp=1, micro_batch=1),
        prediction={},
        source="analytic",
    )
    assert '"cp"' not in plan_to_json(one)
    two = build_plan(
        model=m,
        training=t,
        cluster=cluster,
        config=ParallelConfig(tp=4, pp=1, dp=1, cp=2, micro_batch=1),
        prediction={},
        source="analytic",
    )
    assert [(r.cp, r.tp) for r in two.ranks[:4]] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert two.ranks[4].cp == 1 and '"cp": 2' in plan_to_json(two)


@pytest.mark.slow
def test_quick_start_runs_a_cp2_plan(tmp_path: Path) -> None:
    """tests/test_e2e_quickstart.py's flow (profile -> plan -> emit -> node0.sh) with cp = 2 on
    two CPU workers: the plan prices the CP collectives from the profile and the loss falls."""
    import os
    import sys

    from test_e2e_quickstart import _free_port, _meshplan

    (tmp_path / "cluster.yaml").write_text("name: laptop\nnodes:\n  - {type: cpu-2}\n")
    common = ["--model", "tiny-gpt", "--seq-len", "64"]
    _meshplan(
        "profile",
        "--device",
        "cpu",
        "--nproc",
        "2",
        "--quick",
        *common,
        "--out",
        "profile.json",
        cwd=tmp_path,
    )
    r = _meshplan(
        "plan",
        *common,
        "--cluster",
        "cluster.yaml",
        "--global-batch",
        "8",
        "--dtype",
        "fp32",
        "--profile",
        "profile.json",
        "--fix",
        "cp=2",
        "--out",
        "plan.json",
        "--emit",
        "launch",
        "--json",
        cwd=tmp_path,
    )
    best = json.loads(r.stdout)["plans"][0]
    assert best["config"]["cp"] == 2
    assert any("from the profile's measured fits" in n for n in best["notes"]), best["notes"]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MESHPLAN_RDZV_ENDPOINT": f"localhost:{_free_port()}"}
    metrics = tmp_path / "m.jsonl"
    run = subprocess.run(
        ["bash", str(tmp_path / "launch" / "node0.sh"), "--steps", "10", "--metrics", str(metrics)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_cp_collectives_come_from_the_profiles_fits() -> None:
    """A profile's all-gather / reduce-scatter fits of the CP group price the CP collectives:
    per block and micro-batch AG(K,V) forward, RS(dK,dV) backward (recompute none)."""
    from cli_helpers import tiny_cpu_profile
    from executor_shapes import LLAMA

    from planner.profile import CollectiveOp, CollectiveRecord, LinkSample

    def rec(op: CollectiveOp, alpha: float, beta: float) -> CollectiveRecord:
        sample = LinkSample(bytes=1024, seconds=alpha + 1024 / beta)
        return CollectiveRecord(
            op=op,
            gpu_ids=(0, 1),
            layout="contiguous",
            samples=(sample,),
            alpha_s=alpha,
            beta_bytes_per_s=beta,
            busbw_bytes_per_s=beta / 2,
        )

    ag, rs = rec(CollectiveOp.ALL_GATHER, 1e-3, 1e8), rec(CollectiveOp.REDUCE_SCATTER, 2e-3, 5e7)
    profile = replace(tiny_cpu_profile(2), collectives=(ag, rs))
    cluster = presets.load_cluster("cpu-2")
    t = TrainingSpec(global_batch=8, seq_len=16, dtype=Dtype.FP32)
    cfg = ParallelConfig(tp=1, pp=1, dp=1, cp=2, micro_batch=2)
    est = estimate(LLAMA, t, cluster, cfg, profile)
    kv = cpcost.kv_bytes(LLAMA, 2, 16, 1, Dtype.FP32)
    per_block = ag.time_s(kv) + rs.time_s(kv)
    m = cfg.num_micro_batches(t)
    assert est.breakdown.cp_comm_s == pytest.approx(m * LLAMA.layers * per_block)
    assert any("measured fits" in n for n in est.notes)


@given(
    st.sampled_from([1, 2, 4]),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 3]),
    st.sampled_from([1, 2, 4]),
)
def test_mesh_rank_and_coordinates_round_trip_with_cp(tp: int, pp: int, dp: int, cp: int) -> None:
    cfg = ParallelConfig(tp=tp, pp=pp, dp=dp, cp=cp, micro_batch=1)
    assert cfg.world_size == tp * pp * dp * cp
    for r in range(cfg.world_size):
        p, d, c, t = cfg.mesh_coord(r)
        assert cfg.mesh_rank(p, d, c, t) == r
        cp_group = cfg.group_gpus(MeshAxis.CP, r)
        # tp innermost, then cp: a CP group is strided by tp inside a block of tp*cp ranks
        assert cp_group == tuple(cfg.mesh_rank(p, d, i, t) for i in range(cp))
        assert len(set(cfg.group_gpus(MeshAxis.DP, r)) & set(cp_group)) == 1
    if cp == 1:  # the layout of plans written before cp existed
        assert all(cfg.mesh_coord(r)[2] == 0 for r in range(cfg.world_size))
        assert (
            cfg.mesh_rank(pp - 1, dp - 1, 0, tp - 1) == (pp - 1) * dp * tp + (dp - 1) * tp + tp - 1
        )


GPT_32K = """name: gpt-1.3b-32k
family: gpt
layers: 24
hidden: 2048
heads: 16
ffn_hidden: 8192
vocab: 51200
max_seq_len: 32768
"""


def test_plan_picks_the_cheaper_cp_attention_the_executor_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With as many KV heads as heads (a GPT), Ulysses' all-to-alls move less than gathering K
    and V, and the search picks it; Llama 3's 8 KV heads over tp 8 leave it nothing to split."""
    model = tmp_path / "gpt.yaml"
    model.write_text(GPT_32K)
    args = ["--model", str(model), "--cluster", "dgx-h100", "--nodes", "1"]
    args += ["--global-batch", "8", "--seq-len", "32768"]
    cfg = ["--tp", "1", "--pp", "1", "--cp", "8", "--micro-batch", "1", "--zero", "1"]
    comm = {}
    for kind in ("all_gather_kv", "ulysses"):
        assert main(["estimate", *args, *cfg, "--cp-attention", kind, "--json"]) == 0
        comm[kind] = json.loads(capsys.readouterr().out)["breakdown"]["cp_comm_s"]
    assert comm["ulysses"] < comm["all_gather_kv"]
    assert main(["plan", *args, "--fix", "cp=8", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["plans"][0]
    assert best["config"]["cp_attention"] == "ulysses"
    # refused with one line: a variant the executor does not run, and Ulysses without heads
    assert main(["estimate", *args, *cfg, "--cp-attention", "ring"]) == 2
    one_error(capsys, "cp_attention=ring", "all_gather_kv|ulysses")
    llama = ["--model", str(tmp_path / "l.yaml"), "--cluster", "dgx-h100", "--nodes", "2"]
    (tmp_path / "l.yaml").write_text(LLAMA31_8B)
    code = main(
        ["estimate", *llama, "--global-batch", "8", "--seq-len", "8192", "--tp", "8", "--pp", "1"]
        + ["--cp", "2", "--micro-batch", "1", "--cp-attention", "ulysses"]
    )
    assert code == 2
    one_error(capsys, "cp_attention=ulysses", "KV heads")
