"""Mixture-of-Experts in the cost model: terms against hand calculations, and the CLI.

Mixtral-8x7B (Jiang et al. 2024) is the reference model: 32 blocks, hidden 4096, 32 heads of
128, 8 KV heads, 8 gated experts of 14336, top-2, vocabulary 32000.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_helpers import one_error

import cli.main
import presets
from cli.main import main
from planner.cost import analytic, moe
from planner.cost.analytic import DEFAULT_CONSTANTS
from planner.cost.collectives import CollectiveOp, ring_s
from planner.cost.estimate import estimate
from planner.cost.memory import FRAMEWORK_RESERVE_BYTES, block_activation_bytes, tp_rank_params
from planner.cost.rankcosts import build_rank_costs
from planner.errors import ConfigError
from planner.parallel import ParallelConfig
from planner.profile import CollectiveRecord, LinkSample, Profile, ProfileGpu, ProfileMeta
from planner.runtime import EXECUTOR_MOE, ROUTING_IMBALANCE
from planner.specs import Dtype, ModelSpec, MoeSpec, TrainingSpec

H, L, F, E, K, V = 4096, 32, 14336, 8, 2, 32000
ATTN = H * H + 2 * H * 1024 + H * H  # q, k, v (8 KV heads of 128), o
EXPERT = 3 * H * F  # w1, w2, w3 of one gated expert


@pytest.fixture(autouse=True)
def _commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.main, "COMMAND_MODULES", ("cli.presets_cmd", "cli.estimate_cmd"))


def mixtral() -> ModelSpec:
    return ModelSpec(
        name="mixtral-8x7b-test",
        layers=L,
        hidden=H,
        heads=32,
        kv_heads=8,
        ffn_hidden=F,
        vocab=V,
        max_seq_len=32768,
        mlp="swiglu",
        norm="rmsnorm",
        position="rope",
        bias=False,
        moe=MoeSpec(experts=E, top_k=K, expert_ffn_hidden=F),
    )


def test_the_preset_is_the_hand_built_model() -> None:
    """presets/models.yaml mixtral-8x7b: 46.7 B parameters, 12.9 B active (Jiang et al. 2024)."""
    preset = presets.load_model("mixtral-8x7b")
    assert preset.moe == mixtral().moe
    pc = preset.param_count()
    assert round(pc.total / 1e9, 1) == 46.7 and round(pc.active / 1e9, 1) == 12.9


def test_block_flops_of_a_mixtral_block_by_hand() -> None:
    """Forward FLOPs of one block at tp 1 (2 per multiply-add): q/k/v/o, the h x 8 router, 8
    experts x 3 GEMMs over T*2/8 tokens each, attention 4*T*s*q_dim."""
    mb, s = 1, 4096
    t = mb * s
    fl = analytic.block_flops(mixtral(), mb, s, 1)
    by_hand = 2 * t * ATTN + 2 * t * H * E + E * 3 * (2 * (t * K / E) * H * F)
    assert sum(fl.gemms) == pytest.approx(by_hand, rel=1e-12)
    assert fl.attention == 4 * t * s * H
    # the routed GEMMs are each expert's own (smaller) shape: 24 of M = 1024 tokens
    routed = fl.gemms[3:]
    assert len(routed) == 3 * E and set(routed) == {2 * 1024 * H * F}


def test_expert_gemms_at_ep_8_carry_the_busiest_ranks_load() -> None:
    """ep 8: one local expert, T*k*imbalance tokens, imbalance = ROUTING_IMBALANCE at g = 1."""
    t = 4096
    imb = EXECUTOR_MOE.imbalance(8, E)
    assert imb == pytest.approx(ROUTING_IMBALANCE)
    fl = analytic.block_flops(mixtral(), 1, t, 1, ep=8, moe_imbalance=imb)
    assert fl.gemms[3:] == (2 * t * K * imb * H * F,) * 3


def test_imbalance_is_exact_at_ep_1_and_grows_with_ep() -> None:
    values = [EXECUTOR_MOE.imbalance(ep, E) for ep in (1, 2, 4, 8)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(ROUTING_IMBALANCE)
    assert values == sorted(values) and len(set(values)) == 4
    # g = 4 of 8: 1 + 0.25 * sqrt(4 / (4 * 7))
    assert values[1] == pytest.approx(1 + 0.25 * math.sqrt(1 / 7))


def test_model_flops_count_active_parameters() -> None:
    """MFU convention: 6 * N_active * tokens over the matmul parameters (norms and the
    embedding lookup are not matmuls) plus 3 x the attention products."""
    model = mixtral()
    b, s = 8, 4096
    tokens = b * s
    pc = model.param_count()
    matmul_active = pc.active - pc.embedding - pc.final_norm - L * 2 * H
    attention = L * 4 * tokens * s * H
    expected = 6 * matmul_active * tokens + 3 * attention
    assert analytic.model_flops_per_step(model, b, s) == pytest.approx(expected, rel=1e-12)


def _mixtral_training(batch: int = 64) -> TrainingSpec:
    return TrainingSpec(global_batch=batch, seq_len=4096)


def test_expert_state_bytes_per_rank_at_ep_8_with_zero_1() -> None:
    """One node, dp 8, ep 8, ZeRO-1: each rank holds 1 expert per block with its full Adam state
    (the expert-DP group dp/ep is 1); the rest is sharded over dp = 8. Two nodes (dp 16):
    the expert optimizer state is halved (expert-DP group of 2)."""
    model, training = mixtral(), _mixtral_training()
    non_expert = L * (ATTN + H * E + 2 * H) + 2 * V * H + H  # blocks, embedding, head, norm
    expert = L * EXPERT
    for nodes, edp in ((1, 1), (2, 2)):
        cluster = presets.load_cluster("dgx-h100", nodes)
        dp = 8 * nodes
        cfg = ParallelConfig(tp=1, pp=1, dp=dp, micro_batch=1, zero=1, ep=8, recompute="full")
        mem = estimate(model, training, cluster, cfg).memory_breakdown
        assert mem.weights == 2 * (non_expert + expert)
        assert mem.grads == 4 * (non_expert + expert)
        assert mem.optimizer == pytest.approx(12 * non_expert / dp + 12 * expert / edp)


def test_parameters_of_the_ep_ranks_add_up_to_the_model() -> None:
    """tp 2, pp 1, ep 4: the TP x EP ranks of one replica hold every parameter once, except
    what TP replicates (norms, the router)."""
    model = mixtral()
    p = tp_rank_params(model, 2, 1, 4)
    held = 2 * (L * p.per_block + p.embedding + p.head) + 2 * 4 * L * p.expert_per_block
    replicated = L * (2 * H + H * E) + H  # block norms, router, final norm: once more per TP rank
    assert held - replicated == model.param_count().total


def test_all_to_all_time_by_hand() -> None:
    """ep 8 inside one DGX H100: per MoE block and micro-batch, a dispatch and a combine of
    T*k*imbalance*h*2 bytes per rank, each a (n-1)-step all-to-all on NVLink (450 GB/s, 2 us);
    backward sends the same again, twice with full recompute."""
    model, training = mixtral(), _mixtral_training()
    cluster = presets.load_cluster("dgx-h100", 1)
    cfg = ParallelConfig(tp=1, pp=1, dp=8, micro_batch=1, zero=1, ep=8)
    nbytes = 4096 * K * ROUTING_IMBALANCE * H * 2
    assert moe.dispatch_bytes(model, 4096, 8, 2) == pytest.approx(nbytes)
    eff = DEFAULT_CONSTANTS.intra_link_efficiency
    one = ring_s(CollectiveOp.ALL_TO_ALL, 8, nbytes, 450e9 * eff, 2e-6)
    assert one == pytest.approx(7 * 2e-6 + 7 / 8 * nbytes / (450e9 * eff))
    rc = build_rank_costs(model, training, cluster, cfg, None, DEFAULT_CONSTANTS)
    # the forward first exchanges the 8 per-expert int64 counts (latency-bound)
    counts = ring_s(CollectiveOp.ALL_TO_ALL, 8, 8 * E, 450e9 * eff, 2e-6)
    assert rc.block[0].fwd_ep_s == pytest.approx(2 * one + counts)
    assert rc.block[0].bwd_ep_s == pytest.approx(2 * one)
    full = ParallelConfig(tp=1, pp=1, dp=8, micro_batch=1, zero=1, ep=8, recompute="full")
    rc_full = build_rank_costs(model, training, cluster, full, None, DEFAULT_CONSTANTS)
    assert rc_full.block[0].bwd_ep_s == pytest.approx(4 * one + counts)
    est = estimate(model, training, cluster, cfg)
    per_mb = L * (4 * one + counts)
    assert est.breakdown.ep_comm_s == pytest.approx(cfg.num_micro_batches(training) * per_mb)


def test_ep_groups_across_nodes_are_priced_on_the_nics() -> None:
    """Two nodes, dp 16, ep 8: the default map keeps each EP group in a node (NVLink); a map
    that alternates nodes puts every group on the NICs, and the all-to-all gets slower."""
    model, training = mixtral(), _mixtral_training()
    cluster = presets.load_cluster("dgx-h100", 2)
    cfg = ParallelConfig(tp=1, pp=1, dp=16, micro_batch=1, zero=1, ep=8)
    inside = estimate(model, training, cluster, cfg).breakdown.ep_comm_s
    alternating = tuple(g for i in range(8) for g in (i, 8 + i))
    spread = ParallelConfig(tp=1, pp=1, dp=16, micro_batch=1, zero=1, ep=8, rank_to_gpu=alternating)
    across = estimate(model, training, cluster, spread).breakdown.ep_comm_s
    # NICs 8 x 50 GB/s at 0.92 against NVLink 450 GB/s at 0.78: about 2x slower across nodes
    assert across > 1.5 * inside > 0


def test_moe_activation_bytes_by_hand() -> None:
    """Per token (tp 1, ep 1, bf16): router fp32 probs 8*4, per routed copy the int64 index and
    fp32 weight, expert input and output (2*h*2) and the gated expert's 4 intermediates."""
    per_copy = 8 + 4 + 2 * H * 2 + 4 * 2 * F
    assert moe.mlp_activation_bytes_per_token(mixtral(), 1, 1, 2) == 4 * E + K * per_copy
    # ep 8: the expert's side (its input, the intermediates) carries the busiest rank's load
    at_expert = ROUTING_IMBALANCE * (H * 2 + 4 * 2 * F)
    expected = 4 * E + K * (8 + 4 + H * 2 + at_expert)
    assert moe.mlp_activation_bytes_per_token(mixtral(), 1, 8, 2) == pytest.approx(expected)


def test_dense_models_have_no_moe_terms() -> None:
    """A dense estimate has no ep term in its JSON, and its config has no ep field."""
    model = presets.load_model("llama3-8b")
    cluster = presets.load_cluster("dgx-h100", 1)
    training = TrainingSpec(global_batch=16, seq_len=2048)
    est = estimate(model, training, cluster, ParallelConfig(tp=2, pp=1, dp=4, micro_batch=1))
    assert "ep_comm_s" not in est.to_json()["breakdown"]
    assert est.breakdown.ep_comm_s == 0.0


def test_non_uniform_moe_is_refused_naming_the_field() -> None:
    model = ModelSpec(
        **{
            **{k: getattr(mixtral(), k) for k in ("layers", "hidden", "heads", "kv_heads")},
            "name": "dense-first",
            "ffn_hidden": F,
            "vocab": V,
            "max_seq_len": 4096,
            "mlp": "swiglu",
            "moe": MoeSpec(experts=E, top_k=K, expert_ffn_hidden=F, dense_layers=1),
        }
    )
    with pytest.raises(ConfigError, match=r"model\.moe\.dense_layers=1"):
        estimate(
            model,
            _mixtral_training(),
            presets.load_cluster("dgx-h100", 1),
            ParallelConfig(tp=1, pp=1, dp=8, micro_batch=1),
        )


ESTIMATE = [
    "estimate",
    "--model",
    "mixtral-8x7b",
    "--cluster",
    "dgx-h100",
    "--global-batch",
    "64",
    "--seq-len",
    "4096",
    "--tp",
    "1",
    "--pp",
    "1",
    "--micro-batch",
    "1",
]


def test_cli_mixtral_without_ep_or_zero_does_not_fit_on_one_node(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """tp1 pp1 ep1 ZeRO-0 on one DGX H100: 46.7 B parameters at 18 bytes each per GPU."""
    assert main([*ESTIMATE, "--nodes", "1", "--zero", "0", "--json"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] is False and doc["config"]["ep"] == 1
    mem = doc["memory_breakdown"]
    total = presets.load_model("mixtral-8x7b").param_count().total
    assert mem["weights"] + mem["grads"] + mem["optimizer"] == 18 * total


def test_cli_estimate_with_ep(capsys: pytest.CaptureFixture[str]) -> None:
    args = [*ESTIMATE, "--nodes", "2", "--zero", "3", "--recompute", "full", "--ep", "8"]
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["ep"] == 8 and doc["fits"] is True
    assert doc["breakdown"]["ep_comm_s"] > 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ep=8" in out and "ep_comm" in out


def test_cli_estimate_refuses_a_bad_ep(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ESTIMATE, "--nodes", "1", "--ep", "3"]) == 2
    one_error(capsys, "ep=3", "dp=8")


def test_cli_refuses_non_uniform_moe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "interleaved.yaml"
    path.write_text(
        "{family: llama, layers: 4, hidden: 64, heads: 4, kv_heads: 2, ffn_hidden: 128, "
        "vocab: 512, max_seq_len: 128, moe: {experts: 4, top_k: 2, expert_ffn_hidden: 64, "
        "layer_interval: 2}}\n"
    )
    args = ["estimate", "--model", str(path), "--cluster", "dgx-h100", "--global-batch", "8"]
    args += ["--seq-len", "128", "--tp", "1", "--pp", "1", "--micro-batch", "1"]
    assert main(args) == 2
    one_error(capsys, "model.moe.layer_interval=2")


def test_measured_all_to_all_fits_replace_the_link_model() -> None:
    """A profile's all_to_all alpha-beta fit of the EP group is what the dispatch costs."""
    model, training = mixtral(), _mixtral_training()
    cluster = presets.load_cluster("dgx-h100", 1)
    cfg = ParallelConfig(tp=1, pp=1, dp=8, micro_batch=1, zero=1, ep=4)
    fits = tuple(
        CollectiveRecord(
            op=CollectiveOp.ALL_TO_ALL,
            gpu_ids=tuple(range(4 * i, 4 * i + 4)),
            layout="contiguous",
            samples=(LinkSample(bytes=1, seconds=1.0), LinkSample(bytes=2, seconds=1.0)),
            alpha_s=1e-4,
            beta_bytes_per_s=1e10,
            busbw_bytes_per_s=1e10,
        )
        for i in range(2)
    )
    meta = ProfileMeta(
        hosts=("h",),
        device_kind="gpu",
        torch_version="x",
        dtype=Dtype.BF16,
        date="2026-01-01",
        method="test",
    )
    gpus = tuple(
        ProfileGpu(gpu_id=i, host="h", local_index=i, device_name="H100", memory_bytes=1)
        for i in range(8)
    )
    prof = Profile(schema_version=1, meta=meta, gpus=gpus, collectives=fits)
    rc = build_rank_costs(model, training, cluster, cfg, prof, DEFAULT_CONSTANTS)
    nbytes = moe.dispatch_bytes(model, 4096, 4, 2)
    counts = fits[0].time_s(8 * E)
    assert rc.block[0].fwd_ep_s == pytest.approx(2 * fits[0].time_s(nbytes) + counts)


def test_moe_block_activation_bytes_by_hand() -> None:
    """The whole block at tp 1, bf16, flash, no recompute, executor rules: the dense block's
    attention-side terms (fp32 norm inputs + rstd, q/k/v and MLP inputs, q/k/v/o, the fp32
    log-sum-exp, RoPE tables) and the MoE feed-forward in place of the dense MLP."""
    t, s, d, q, kv = 4096, 4096, 2, 4096, 1024
    per_token = 2 * (4 * H + 4) + 2 * d * H + d * (q + kv) + d * kv + d * q + 4 * 32
    per_token += moe.mlp_activation_bytes_per_token(mixtral(), 1, 8, d)
    by_hand = per_token * t + s * 128 * d
    got = block_activation_bytes(
        mixtral(),
        micro_batch=1,
        seq_len=s,
        tp=1,
        sequence_parallel=False,
        recompute="none",
        flash_attention=True,
        dtype=Dtype.BF16,
        ep=8,
    )
    assert got == pytest.approx(by_hand, rel=1e-12)


def test_all_to_all_buffers_are_resident_once_per_rank() -> None:
    """The dispatch's send buffer and the expert output before the combine: 2 x the dispatch
    buffer on top of the framework reserve (pp 1, ZeRO-1, no full recompute)."""
    model, training = mixtral(), _mixtral_training()
    cluster = presets.load_cluster("dgx-h100", 1)
    cfg = ParallelConfig(tp=1, pp=1, dp=8, micro_batch=2, zero=1, ep=8)
    rc = build_rank_costs(model, training, cluster, cfg, None, DEFAULT_CONSTANTS)
    buffers = 2 * 2 * 4096 * K * ROUTING_IMBALANCE * H * 2
    assert rc.fixed_bytes[0] == pytest.approx(FRAMEWORK_RESERVE_BYTES + buffers)


def test_tp_completes_the_routing_gradient_with_one_all_reduce() -> None:
    """tp 2: backward all-reduces the [T, k] routing-weight gradient over TP once per block."""
    model, training = mixtral(), _mixtral_training()
    cluster = presets.load_cluster("dgx-h100", 1)
    cfg = ParallelConfig(tp=2, pp=1, dp=4, micro_batch=1, zero=1, ep=4)
    rc = build_rank_costs(model, training, cluster, cfg, None, DEFAULT_CONSTANTS)
    bw = 450e9 * DEFAULT_CONSTANTS.intra_link_efficiency
    dense_ar = 2 * ring_s(CollectiveOp.ALL_REDUCE, 2, 4096 * H * 2, bw, 2e-6)
    routing = ring_s(CollectiveOp.ALL_REDUCE, 2, 4096 * K * 2, bw, 2e-6)
    assert rc.block[0].fwd_tp_s == pytest.approx(dense_ar)
    assert rc.block[0].bwd_tp_s == pytest.approx(dense_ar + routing)


def test_moe_with_context_parallelism_shards_experts_over_dp_and_cp() -> None:
    """cp = 2 with ep = 1: the experts' data-parallel group is the dp x cp group (4 ranks here),
    as ZeRO shards everything else; this configuration used to fail building that group."""
    model = mixtral()
    cluster = presets.load_cluster("dgx-h100", 2)
    training = TrainingSpec(global_batch=8, seq_len=8192)
    cfg = ParallelConfig(tp=4, pp=1, dp=2, cp=2, micro_batch=1, zero=1)
    rc = build_rank_costs(model, training, cluster, cfg, None, DEFAULT_CONSTANTS)
    assert rc.expert_dp is not None and rc.expert_dp.links[0].size == 4
    assert estimate(model, training, cluster, cfg).step_time_s > 0
