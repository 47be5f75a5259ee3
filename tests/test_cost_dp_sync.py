"""The data-parallel overlap model (planner/cost/dp_sync.py) and the latency it pays per unit."""

from __future__ import annotations

from dataclasses import replace

import pytest

import presets
from planner.cost.comm import GroupLink, ring_time_s
from planner.cost.dp_sync import (
    RankSyncInputs,
    Unit,
    exposed_dp_s,
    overlap_efficiency,
    simulate_stream,
)
from planner.cost.estimate import estimate
from planner.parallel import ParallelConfig
from planner.profile import CollectiveOp
from planner.runtime import EXECUTOR, MEGATRON_2021
from planner.specs import TrainingSpec

PERFECT = replace(EXECUTOR, overlap_efficiency=1.0)


def _inputs(**kw: object) -> RankSyncInputs:
    base = dict(
        blocks=4, last_chunk_blocks=4, chunks=1, micro_batches=1, zero=0, pp=1,
        block_fwd_s=1.0, block_bwd_s=2.0, root_fwd_s=0.0, root_bwd_s=0.0,
        block_reduce_s=0.5, root_reduce_s=0.3, block_gather_s=0.0, root_gather_s=0.0,
    )  # fmt: skip
    base.update(kw)
    return RankSyncInputs(**base)  # type: ignore[arg-type]


def test_ring_latency_is_paid_for_an_empty_message() -> None:
    """Commit 66de02a's per-unit latency term was always 0: ring_time_s returned 0 for 0 bytes."""
    link = GroupLink(size=32, bandwidth_bytes_per_s=25e9, latency_s=5e-6)
    assert ring_time_s(CollectiveOp.REDUCE_SCATTER, 0.0, link) == pytest.approx(31 * 5e-6)
    # all-reduce takes NCCL's tree when faster: 2 * ceil(log2 32) = 10 latencies, not 62
    assert ring_time_s(CollectiveOp.ALL_REDUCE, 0.0, link) == pytest.approx(10 * 5e-6)
    one = GroupLink(size=1, bandwidth_bytes_per_s=25e9, latency_s=5e-6)
    assert ring_time_s(CollectiveOp.ALL_REDUCE, 1e9, one) == 0.0


def test_large_all_reduce_stays_bandwidth_bound() -> None:
    link = GroupLink(size=8, bandwidth_bytes_per_s=100e9, latency_s=2e-6)
    ring = 2 * 7 * 2e-6 + 2 * 7 / 8 * 1e9 / 100e9
    assert ring_time_s(CollectiveOp.ALL_REDUCE, 1e9, link) == pytest.approx(ring)


def test_stream_prefetches_one_gather_ahead() -> None:
    # gather 1 s before each of two 2 s units: the first waits, the second is prefetched
    r = simulate_stream([Unit(compute_s=2.0, gather_s=1.0), Unit(compute_s=2.0, gather_s=1.0)])
    assert r.compute_end_s == pytest.approx(5.0)
    assert r.compute_s == pytest.approx(4.0)
    assert r.hidden_s == pytest.approx(1.0)


def test_reductions_hide_behind_later_backward_but_the_root_is_exposed() -> None:
    """Four 2 s block backwards each reduce 0.5 s as they finish: all but nothing of the last
    hides; the root unit reduces after the whole backward and is fully exposed."""
    x = _inputs()
    exposed = exposed_dp_s(x, PERFECT, overlaps=True)
    # forward 4 s, backward 8 s; the last block's 0.5 s and the root's 0.3 s end after it
    assert exposed == pytest.approx(0.5 + 0.3)
    # with imperfect overlap, the 3 hidden reductions (1.5 s) cost their share too
    assert exposed_dp_s(x, EXECUTOR, overlaps=True) == pytest.approx(
        0.8 + (1 - EXECUTOR.overlap_efficiency) * 1.5
    )
    # on CPU workers nothing overlaps
    assert exposed_dp_s(x, EXECUTOR, overlaps=False) == pytest.approx(4 * 0.5 + 0.3)


def test_pipelined_1f1b_reduces_after_the_last_backward_fully_exposed() -> None:
    x = _inputs(pp=4)
    assert exposed_dp_s(x, PERFECT, overlaps=True) == pytest.approx(4 * 0.5 + 0.3)


def test_interleaved_chunks_overlap_the_remaining_backward() -> None:
    # two chunks of two blocks: the first-reduced chunk (1 s) hides under the other's 4 s backward
    x = _inputs(pp=4, chunks=2, last_chunk_blocks=2)
    assert exposed_dp_s(x, PERFECT, overlaps=True) == pytest.approx(2 * 0.5 + 0.3)


def test_megatron_2021_does_not_overlap_its_all_reduce() -> None:
    x = _inputs()
    assert exposed_dp_s(x, replace(MEGATRON_2021, overlap_efficiency=1.0), overlaps=True) == (
        pytest.approx(4 * 0.5 + 0.3)
    )


def test_zero3_gathers_slow_compute_when_they_exceed_it() -> None:
    fast = exposed_dp_s(_inputs(zero=3, block_gather_s=0.5), PERFECT, overlaps=True)
    slow = exposed_dp_s(_inputs(zero=3, block_gather_s=3.0), PERFECT, overlaps=True)
    assert slow > fast + 4 * (3.0 - 2.0)


def test_many_micro_batches_extrapolate_from_three() -> None:
    """The closed form for m > 3 equals simulating every micro-batch (ZeRO-3, gathers + RS)."""
    from planner.cost.dp_sync import _micro_batch

    x = _inputs(zero=3, block_gather_s=1.5, micro_batches=7, root_fwd_s=0.4, root_bwd_s=0.8)
    units = []
    for _ in range(7):
        units += _micro_batch(x, gather_fwd=True, gather_bwd=True, reduce=True)
    full = simulate_stream(units).exposed_s(EXECUTOR.overlap_efficiency)
    assert exposed_dp_s(x, EXECUTOR, overlaps=True) == pytest.approx(full, rel=1e-9)


def test_dp32_estimate_shows_the_exposed_last_bucket_and_latency() -> None:
    """The issue's case: a 1.7B-class model at dp 32 printed `dp_comm 0.0 us`."""
    model = presets.load_model("gpt3-1.3b")
    cluster = presets.load_cluster("dgx-h100", 4)
    training = TrainingSpec(global_batch=64, seq_len=2048)
    est = estimate(model, training, cluster, ParallelConfig(tp=1, pp=1, dp=32, micro_batch=2))
    link = GroupLink(size=32, bandwidth_bytes_per_s=1.0, latency_s=5e-6)
    latency_floor = model.layers * ring_time_s(CollectiveOp.ALL_REDUCE, 0.0, link)
    assert est.breakdown.dp_comm_s > latency_floor > 0


def test_zero3_at_micro_batch_1_slows_down_as_dp_grows() -> None:
    model = presets.load_model("gpt3-175b")
    steps = []
    for nodes in (16, 128):
        cluster = presets.load_cluster("dgx-a100-80gb", nodes)
        dp = cluster.num_gpus
        cfg = ParallelConfig(tp=1, pp=1, dp=dp, micro_batch=1, zero=3, recompute="full")
        steps.append(estimate(model, TrainingSpec(global_batch=dp, seq_len=2048), cluster, cfg))
    assert steps[1].breakdown.dp_comm_s > steps[0].breakdown.dp_comm_s
    assert steps[1].step_time_s > steps[0].step_time_s


def test_overlap_efficiency_inverts_the_exposure_model() -> None:
    """A 10 s block and a 4 s collective: together 10 s is a perfect overlap, 14 s none, 12 s
    half; the record's efficiency put back into the stream model gives the measured time."""
    assert overlap_efficiency(10.0, 4.0, 10.0) == 1.0
    assert overlap_efficiency(10.0, 4.0, 14.0) == 0.0
    assert overlap_efficiency(10.0, 4.0, 12.0) == pytest.approx(0.5)
    assert overlap_efficiency(4.0, 10.0, 12.0) == pytest.approx(0.5)  # the collective longer
    assert overlap_efficiency(10.0, 4.0, 9.0) == 1.0 and overlap_efficiency(10.0, 4.0, 20.0) == 0.0
    # one unit computing 10 s beside a 4 s reduction issued at its start
    r = simulate_stream([Unit(compute_s=0.0, reduce_s=4.0), Unit(compute_s=10.0)])
    eff = overlap_efficiency(10.0, 4.0, 11.0)
    assert r.compute_end_s + r.exposed_s(eff) == pytest.approx(11.0)
