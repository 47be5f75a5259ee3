"""estimate() and split_problem(): consistency, fits, measured profiles, heterogeneity, speed."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cli_helpers import tiny_cpu_profile

import presets
from planner.cost.estimate import estimate, split_problem
from planner.errors import ConfigError
from planner.parallel import ParallelConfig, Recompute
from planner.profile import (
    SCHEMA_VERSION,
    BlockKind,
    ComputeRecord,
    Profile,
    ProfileGpu,
    ProfileMeta,
)
from planner.specs import ClusterSpec, Dtype, TrainingSpec

LLAMA70 = presets.load_model("llama3-70b")
GPT13 = presets.load_model("gpt3-13b")


def test_too_big_config_does_not_fit() -> None:
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    est = estimate(
        LLAMA70,
        TrainingSpec(global_batch=16, seq_len=4096),
        cluster,
        ParallelConfig(tp=8, pp=1, dp=1, micro_batch=1),
    )
    assert not est.fits
    # capacity is usable memory: 80 GiB less the default 5 % headroom
    assert est.peak_memory_bytes > est.memory_capacity_bytes == cluster.nodes[0].gpu.capacity_bytes
    assert est.memory_capacity_bytes == 76 * 2**30
    # 70.6e9 params / 8 at 2+4+12 bytes alone exceed 80 GiB
    assert (
        est.memory_breakdown.weights + est.memory_breakdown.grads + est.memory_breakdown.optimizer
        > 80 * 2**30
    )
    assert est.source == "analytic" and "analytic estimate" in est.notes


def test_invalid_config_names_the_rule() -> None:
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    with pytest.raises(ConfigError, match="global_batch must be a multiple of dp"):
        estimate(
            GPT13,
            TrainingSpec(global_batch=8, seq_len=2048),
            cluster,
            ParallelConfig(tp=8, pp=1, dp=1, micro_batch=3),
        )


def _case(schedule: str = "1f1b", v: int = 1, pp: int = 4, recompute: str = "full"):  # type: ignore[no-untyped-def]
    cluster = presets.load_cluster("dgx-a100-80gb", 16)
    training = TrainingSpec(global_batch=64, seq_len=2048)
    config = ParallelConfig(
        tp=8,
        pp=pp,
        dp=128 // (8 * pp),
        micro_batch=1,
        schedule=schedule,
        virtual_stages=v,
        recompute=recompute,
    )
    return GPT13, training, cluster, config


def test_breakdown_sums_to_step_time() -> None:
    est = estimate(*_case())
    b = est.breakdown
    total = b.compute_s + b.tp_comm_s + b.pp_comm_s + b.dp_comm_s + b.bubble_s + b.optimizer_s
    assert total == pytest.approx(est.step_time_s, rel=1e-9)
    assert min(b.compute_s, b.tp_comm_s, b.pp_comm_s, b.bubble_s, b.optimizer_s) > 0
    assert est.tokens_per_s == pytest.approx(64 * 2048 / est.step_time_s)


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("interleaved", 2)])
def test_split_problem_agrees_with_estimate(schedule: str, v: int) -> None:
    model, training, cluster, config = _case(schedule, v)
    problem = split_problem(model, training, cluster, config)
    for split in (None, (12, 8, 10, 10) if v == 1 else (5, 5, 5, 5, 5, 5, 5, 5)):
        cfg = replace(config, stage_layers=split)
        est = estimate(model, training, cluster, cfg)
        s = cfg.layers_per_chunk(model)
        mem = problem.rank_memory_bytes(s)
        assert [st.memory_bytes for st in est.stages] == list(mem)
        assert est.peak_memory_bytes == max(mem) and est.fits == problem.fits(s)
        pipeline = est.step_time_s - est.breakdown.dp_comm_s - est.breakdown.optimizer_s
        # 1F1B: the proxy is the makespan up to p2p overlap; interleaved: the proxy charges the
        # non-interleaved bubble, so it is an upper bound
        # unbalanced: (m-1)*max + sum charges the slow stage's fill and drain in full, the
        # simulation only the neighbours' (an upper bound, within a few %)
        if v == 1 and split is None:
            assert problem.objective_s(s) == pytest.approx(pipeline, rel=0.02)
        else:
            assert pipeline * 0.99 <= problem.objective_s(s) <= pipeline * 1.1


def test_unbalanced_split_is_slower() -> None:
    model, training, cluster, config = _case(recompute="none")
    balanced = estimate(model, training, cluster, config)
    skewed = estimate(model, training, cluster, replace(config, stage_layers=(16, 8, 8, 8)))
    assert skewed.step_time_s > balanced.step_time_s
    assert skewed.stages[0].time_s > balanced.stages[0].time_s


def test_interleaving_reduces_bubble_and_recompute_memory() -> None:
    plain = estimate(*_case("1f1b", 1, recompute="none"))
    inter = estimate(*_case("interleaved", 2, recompute="none"))
    assert inter.breakdown.bubble_s < plain.breakdown.bubble_s
    full = estimate(*_case("1f1b", 1, recompute="full"))
    assert full.memory_breakdown.activations < plain.memory_breakdown.activations
    assert full.hardware_tflops_per_gpu > full.model_tflops_per_gpu


def test_zero_shards_model_states() -> None:
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    training = TrainingSpec(global_batch=16, seq_len=2048, grad_dtype=Dtype.BF16)
    model = presets.load_model("gpt3-1.3b")
    n = model.param_count().total
    by_stage = {}
    for zero in (0, 1, 2, 3):
        est = estimate(
            model, training, cluster, ParallelConfig(tp=1, pp=1, dp=8, micro_batch=2, zero=zero)
        )
        by_stage[zero] = est.memory_breakdown
    assert (by_stage[0].weights, by_stage[0].grads, by_stage[0].optimizer) == (2 * n, 2 * n, 12 * n)
    assert by_stage[1].optimizer == 12 * n / 8
    assert by_stage[2].grads == 2 * n / 8
    assert by_stage[3].weights == 2 * n / 8


def _profile(model, device: str = "NVIDIA A100-SXM4-80GB"):  # type: ignore[no-untyped-def]
    recs = tuple(
        ComputeRecord(
            block=BlockKind.TRANSFORMER_BLOCK,
            device_name=device,
            tp=2,
            micro_batch=mb,
            seq_len=128,
            recompute=Recompute.NONE,
            forward_s=0.001 * mb,
            forward_spread_s=0.0,
            backward_s=0.002 * mb,
            backward_spread_s=0.0,
            activation_bytes=1000 * mb,
            parameter_bytes=10,
            repeats=5,
        )
        for mb in (1, 2, 4)
    )
    meta = ProfileMeta(
        hosts=("h",),
        device_kind="gpu",
        torch_version="x",
        dtype=Dtype.BF16,
        date="2026-01-01",
        method="test",
        model=model,
    )
    gpus = tuple(
        ProfileGpu(gpu_id=i, host="h", local_index=i, device_name=device, memory_bytes=1)
        for i in range(8)
    )
    return Profile(schema_version=SCHEMA_VERSION, meta=meta, gpus=gpus, compute=recs)


def test_measured_profile_with_interpolation() -> None:
    model = presets.load_model("tiny-gpt")
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    training = TrainingSpec(global_batch=24, seq_len=128)
    config = ParallelConfig(tp=2, pp=1, dp=4, micro_batch=3)
    est = estimate(model, training, cluster, config, _profile(model))
    assert est.source == "measured"
    assert any("micro_batch 3 interpolated from measured 1,2,4" in n for n in est.notes)
    assert "analytic estimate" not in est.notes
    # 4 blocks x (3 ms + 6 ms) of measured compute per micro-batch on the only stage
    per_mb = est.breakdown.compute_s / 2
    assert per_mb >= 4 * 0.009
    other = estimate(model, training, cluster, config, _profile(presets.load_model("tiny-llama")))
    assert other.source == "analytic"
    assert any("different model" in n for n in other.notes)


def test_heterogeneous_rank_uses_slowest_gpu_and_smallest_memory() -> None:
    a100 = presets.load_node_type("dgx-a100-80gb")
    h100 = presets.load_node_type("dgx-h100")
    a40 = replace(a100, gpu=replace(a100.gpu, name="A100-40GB", memory_bytes=40 * 2**30))
    mixed = ClusterSpec(name="mix", nodes=(h100, a40))
    fast = ClusterSpec(name="h", nodes=(h100, h100))
    training = TrainingSpec(global_batch=16, seq_len=2048)
    config = ParallelConfig(tp=8, pp=1, dp=2, micro_batch=1)
    e_mix = estimate(GPT13, training, mixed, config)
    e_fast = estimate(GPT13, training, fast, config)
    assert e_mix.stages[0].time_s > e_fast.stages[0].time_s
    assert e_mix.memory_capacity_bytes == a40.gpu.capacity_bytes == 38 * 2**30


def test_gpipe_holds_all_micro_batches() -> None:
    model, training, cluster, config = _case(recompute="none")
    one = estimate(model, training, cluster, config)
    gp = estimate(model, training, cluster, replace(config, schedule="gpipe"))
    m = config.num_micro_batches(training)
    # 1F1B rank 0 holds pp = 4 micro-batches of its blocks, GPipe all m = 16
    block_act = one.stages[1].memory.activations / 3  # rank 1 holds pp - 1 = 3
    assert gp.stages[1].memory.activations == pytest.approx(block_act * m)


def test_measured_links_replace_link_classes() -> None:
    from planner.profile import CollectiveOp, CollectiveRecord, LinkSample, P2PRecord

    model = presets.load_model("tiny-gpt")
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    training = TrainingSpec(global_batch=16, seq_len=128)
    config = ParallelConfig(tp=2, pp=2, dp=2, micro_batch=1)
    base = _profile(model)
    slow_ar = tuple(
        CollectiveRecord(
            op=CollectiveOp.ALL_REDUCE,
            gpu_ids=(2 * i, 2 * i + 1),
            layout="contiguous",
            samples=(LinkSample(bytes=1, seconds=1.0), LinkSample(bytes=2, seconds=1.0)),
            alpha_s=0.01,
            beta_bytes_per_s=1e9,
            busbw_bytes_per_s=1e9,
        )
        for i in range(4)
    )
    slow_p2p = tuple(
        P2PRecord(src=i, dst=i + 4, bandwidth_bytes_per_s=1e6, latency_s=0.001) for i in range(4)
    )
    classes = estimate(model, training, cluster, config, base)
    measured = estimate(
        model, training, cluster, config, replace(base, collectives=slow_ar, p2p=slow_p2p)
    )
    # 2 all-reduces forward + 2 backward per block, 2 blocks per rank, >= 10 ms each
    assert measured.breakdown.tp_comm_s >= 8 * 0.01 * config.num_micro_batches(training)
    assert measured.breakdown.tp_comm_s > 100 * classes.breakdown.tp_comm_s
    assert measured.breakdown.pp_comm_s > classes.breakdown.pp_comm_s + 2 * 0.001
    assert not any("link classes" in n for n in measured.notes)


def test_cpu_workers_expose_dp_sync_that_gpus_hide() -> None:
    """gloo on CPU computes collectives on the same cores: no overlap with backward."""
    model = presets.load_model("tiny-gpt")
    training = TrainingSpec(global_batch=8, seq_len=64, dtype=Dtype.FP32)
    cfg = ParallelConfig(tp=1, pp=1, dp=2, micro_batch=4)
    cpu = estimate(model, training, presets.load_cluster("cpu-2"), cfg)
    gpu_cluster = presets.load_cluster("cpu-2")
    gpu_node = replace(gpu_cluster.nodes[0], gpu=replace(gpu_cluster.nodes[0].gpu, kind="gpu"))
    gpu = estimate(model, training, replace(gpu_cluster, nodes=(gpu_node,)), cfg)
    assert cpu.breakdown.dp_comm_s > 0
    assert gpu.breakdown.dp_comm_s < cpu.breakdown.dp_comm_s
    assert cpu.step_time_s - gpu.step_time_s == pytest.approx(
        cpu.breakdown.dp_comm_s - gpu.breakdown.dp_comm_s
    )


def test_estimate_on_4096_gpus_fits() -> None:
    # Its speed (about 1 ms per call) is measured by benchmarks/search_time.py, not asserted.
    cluster = presets.load_cluster("dgx-h100", 512)
    training = TrainingSpec(global_batch=1024, seq_len=8192)
    config = ParallelConfig(tp=8, pp=8, dp=64, micro_batch=1, recompute="full")
    est = estimate(LLAMA70, training, cluster, config)
    assert est.fits and est.stages[0].time_s > 0


def _with_optimizer_and_tp_records(model, included: bool):  # type: ignore[no-untyped-def]
    """_profile plus measured optimizer steps (plain and DTensor) and, optionally, its TP
    block records marked as timed with their collectives."""
    from planner.profile import OptimizerRecord

    base = _profile(model)
    opt = tuple(
        OptimizerRecord(
            block=kind,
            device_name="NVIDIA A100-SXM4-80GB",
            tp=2,
            distributed=dist,
            step_s={"embedding": 0.01, "transformer_block": 0.1, "head_and_loss": 0.02}[kind.value]
            * (3 if dist else 1),
            step_spread_s=0.0,
            parameter_bytes=10,
            parameter_tensors=4,
            repeats=3,
        )
        for kind in BlockKind
        for dist in (False, True)
    )
    compute = tuple(
        replace(r, tp_collectives_included=True if included else None) for r in base.compute
    )
    return replace(base, compute=compute, optimizer=opt)


@pytest.mark.parametrize("zero", [0, 1])
def test_measured_optimizer_step_replaces_the_bandwidth_price(zero: int) -> None:
    """The step is the blocks' measured DTensor steps (dp > 1); ZeRO sharding divides only
    the bytes / bandwidth part (compute.OptimizerTimes.rank_step_s)."""
    model = presets.load_model("tiny-gpt")
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    training = TrainingSpec(global_batch=24, seq_len=128)
    config = ParallelConfig(tp=2, pp=1, dp=4, micro_batch=2, zero=zero)
    plain = estimate(model, training, cluster, config, _profile(model))
    est = estimate(model, training, cluster, config, _with_optimizer_and_tp_records(model, False))
    measured = 3 * (model.layers * 0.1 + 0.01 + 0.02)
    bandwidth = plain.breakdown.optimizer_s * (4 if zero else 1)
    want = measured - bandwidth + bandwidth / (4 if zero else 1)
    assert est.breakdown.optimizer_s == pytest.approx(want)
    assert est.breakdown.compute_s == plain.breakdown.compute_s
    assert est.step_time_s - plain.step_time_s == pytest.approx(want - plain.breakdown.optimizer_s)


def test_blocks_timed_with_their_tp_collectives_are_not_charged_them_twice() -> None:
    model = presets.load_model("tiny-gpt")
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    training = TrainingSpec(global_batch=24, seq_len=128)
    config = ParallelConfig(tp=2, pp=1, dp=4, micro_batch=2)
    plain = estimate(model, training, cluster, config, _with_optimizer_and_tp_records(model, False))
    timed = estimate(model, training, cluster, config, _with_optimizer_and_tp_records(model, True))
    assert plain.breakdown.tp_comm_s > 0
    # the blocks' all-reduces are gone; the embedding and head (analytic here) keep theirs
    assert 0 < timed.breakdown.tp_comm_s < plain.breakdown.tp_comm_s
    assert timed.breakdown.compute_s == plain.breakdown.compute_s
    assert any("TP collectives measured inside the profiled block" in n for n in timed.notes)


def test_measured_dp_unit_sync_prices_zero0_on_cpu_workers() -> None:
    """On CPU workers nothing overlaps, so the exposed sync is every FSDP unit's measured sync:
    the blocks' and the root unit's (embedding + head), once per step at ZeRO-0; at ZeRO-2 the
    records (measured under replicate) are not used."""
    from planner.profile import DpSyncRecord

    model = presets.load_model("tiny-gpt")
    cluster = presets.load_cluster("cpu-2")
    training = TrainingSpec(global_batch=8, seq_len=128, dtype=Dtype.FP32)
    block = _profile(model, "cpu").compute[0]
    compute = tuple(
        replace(block, block=kind, micro_batch=mb) for kind in BlockKind for mb in (1, 2, 4)
    )
    sync = {"embedding": 0.003, "transformer_block": 0.008, "head_and_loss": 0.007}
    base = replace(
        tiny_cpu_profile(2),
        meta=replace(tiny_cpu_profile(2).meta, model=model),
        compute=compute,
    )
    measured = replace(
        base,
        dp_sync=tuple(
            DpSyncRecord(
                block=k,
                device_name="cpu",
                group_size=2,
                sync_s=sync[k.value],
                sync_spread_s=0.0,
                gradient_bytes=1,
                repeats=3,
            )
            for k in BlockKind
        ),
    )
    config = ParallelConfig(tp=1, pp=1, dp=2, micro_batch=1)
    est = estimate(model, training, cluster, config, measured)
    want = model.layers * 0.008 + 0.003 + 0.007
    assert est.breakdown.dp_comm_s == pytest.approx(want)
    raw = estimate(model, training, cluster, config, base)
    assert raw.breakdown.dp_comm_s != pytest.approx(want)
    z2 = replace(config, zero=2)
    assert estimate(model, training, cluster, z2, measured).breakdown.dp_comm_s == pytest.approx(
        estimate(model, training, cluster, z2, base).breakdown.dp_comm_s
    )


def test_dp_wrapper_overhead_is_paid_per_unit_and_micro_batch() -> None:
    """The replicate wrapper's measured hook cost (sync off) lands on every unit's compute, once
    per micro-batch: 4 blocks + the root's embedding and head, times m = 4."""
    from planner.profile import DpSyncRecord

    model = presets.load_model("tiny-gpt")
    cluster = presets.load_cluster("cpu-2")
    training = TrainingSpec(global_batch=8, seq_len=128, dtype=Dtype.FP32)
    block = _profile(model, "cpu").compute[0]
    compute = tuple(
        replace(block, block=kind, micro_batch=mb) for kind in BlockKind for mb in (1, 2, 4)
    )
    base = replace(
        tiny_cpu_profile(2), meta=replace(tiny_cpu_profile(2).meta, model=model), compute=compute
    )

    def records(fwd: float | None, bwd: float | None) -> tuple[DpSyncRecord, ...]:
        return tuple(
            DpSyncRecord(
                block=k, device_name="cpu", group_size=2, sync_s=0.001, sync_spread_s=0.0,
                gradient_bytes=1, repeats=3, forward_overhead_s=fwd, backward_overhead_s=bwd,
            )
            for k in BlockKind
        )  # fmt: skip

    config = ParallelConfig(tp=1, pp=1, dp=2, micro_batch=1)
    old = estimate(model, training, cluster, config, replace(base, dp_sync=records(None, None)))
    new = estimate(model, training, cluster, config, replace(base, dp_sync=records(0.002, 0.001)))
    units = model.layers + 2  # blocks, embedding, head
    assert new.breakdown.compute_s - old.breakdown.compute_s == pytest.approx(4 * units * 0.003)


def test_a_measured_overlap_replaces_the_estimated_efficiency() -> None:
    """A GPU profile's overlap record sets the efficiency the DP overlap model prices, and
    the estimate says so; on CPU workers, where nothing overlaps, it changes nothing."""
    from planner.profile import OverlapRecord
    from planner.runtime import EXECUTOR

    model = presets.load_model("tiny-gpt")
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    training = TrainingSpec(global_batch=32, seq_len=128)
    config = ParallelConfig(tp=1, pp=1, dp=8, micro_batch=2, zero=3)
    record = OverlapRecord(
        device_name="A100", group_size=8, collective_bytes=1 << 20,
        compute_s=0.010, collective_s=0.004, together_s=0.012, repeats=5,
    )  # fmt: skip
    profile = replace(_profile(model), compute=(), overlap=(record,))
    measured = estimate(model, training, cluster, config, profile)
    assert record.efficiency == pytest.approx(0.5)
    half = replace(EXECUTOR, overlap_efficiency=0.5)
    priced = estimate(model, training, cluster, config, runtime=half)
    assert measured.breakdown.dp_comm_s == pytest.approx(priced.breakdown.dp_comm_s)
    assert (
        measured.breakdown.dp_comm_s
        > estimate(model, training, cluster, config).breakdown.dp_comm_s
    )
    assert any("overlap efficiency 0.50 measured by the profiler" in n for n in measured.notes)
    assert not any("priced as" in n for n in measured.notes)
    cpu = presets.load_cluster("cpu-8", 1)
    on_cpu = estimate(model, TrainingSpec(global_batch=32, seq_len=128, dtype="fp32"), cpu,
                      config, profile)  # fmt: skip
    assert not any("overlap efficiency" in n for n in on_cpu.notes)
