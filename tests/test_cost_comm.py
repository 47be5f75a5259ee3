"""Alpha-beta collectives (collectives.py) over the actual GPU ids of a group (comm.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import presets
from planner import profile as profile_format
from planner.cost import collectives as C
from planner.cost.comm import ClusterArrays, GroupLink, ring_time_s
from planner.parallel import MeshAxis, ParallelConfig
from planner.profile import CollectiveOp, CollectiveRecord, LinkSample


def test_ring_factors() -> None:
    link = GroupLink(size=8, bandwidth_bytes_per_s=100e9, latency_s=1e-6)
    nbytes = 1e9
    # all-reduce: 2(n-1)/n * bytes/bw + 2(n-1) alpha; all-gather: (n-1)/n * bytes/bw + (n-1) alpha
    assert ring_time_s(CollectiveOp.ALL_REDUCE, nbytes, link) == pytest.approx(
        14e-6 + 1.75e9 / 100e9
    )
    assert ring_time_s(CollectiveOp.ALL_GATHER, nbytes, link) == pytest.approx(
        7e-6 + 0.875e9 / 100e9
    )
    assert (
        ring_time_s(
            CollectiveOp.ALL_REDUCE, nbytes, GroupLink(size=1, bandwidth_bytes_per_s=1, latency_s=1)
        )
        == 0
    )


def test_tp_inside_node_uses_nvlink_and_dp_shares_nics() -> None:
    cluster = presets.load_cluster("dgx-a100-80gb", 4)
    arrays = ClusterArrays(cluster, ParallelConfig(tp=8, pp=1, dp=4, micro_batch=1), 1.0)
    (tp,) = arrays.axis_links(MeshAxis.TP)
    assert tp.bandwidth_bytes_per_s == 300e9 and tp.size == 8
    # 8 DP groups leave every node at once over its 8 x 25 GB/s NICs: 25 GB/s each
    (dp,) = arrays.axis_links(MeshAxis.DP)
    assert dp.bandwidth_bytes_per_s == pytest.approx(25e9) and dp.latency_s == 5e-6


def test_single_dp_group_gets_all_nics() -> None:
    cluster = presets.load_cluster("dgx-a100-80gb", 2)
    arrays = ClusterArrays(cluster, ParallelConfig(tp=1, pp=1, dp=16, micro_batch=1), 1.0)
    (dp,) = arrays.axis_links(MeshAxis.DP)
    assert dp.bandwidth_bytes_per_s == pytest.approx(200e9)


def test_strided_placement_makes_tp_cross_nodes() -> None:
    cluster = presets.load_cluster("dgx-a100-80gb", 2)
    order = tuple(r // 2 + 8 * (r % 2) for r in range(16))  # each TP pair on two nodes
    arrays = ClusterArrays(
        cluster, ParallelConfig(tp=2, pp=1, dp=8, micro_batch=1, rank_to_gpu=order), 1.0
    )
    (tp,) = arrays.axis_links(MeshAxis.TP)
    assert tp.bandwidth_bytes_per_s == pytest.approx(25e9)


def test_pipeline_boundary_pairs_share_nics() -> None:
    cluster = presets.load_cluster("dgx-a100-80gb", 2)
    arrays = ClusterArrays(cluster, ParallelConfig(tp=8, pp=2, dp=1, micro_batch=1), 1.0)
    # 8 pairs cross between the nodes, one NIC each: latency + bytes / 25 GB/s
    assert arrays.boundary_p2p_s(0, 1, 25e6, None) == pytest.approx(5e-6 + 1e-3)


SIZES = np.array([0.0, 1.0, 1e3, 1e5, 1e6, 3e7, 1e9, 4e10])


@pytest.mark.parametrize("op", list(CollectiveOp))
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 64, 512])
@pytest.mark.parametrize("lat", [0.0, 2e-6, 5e-5])
def test_scalar_and_vectorised_collectives_are_one_formula(op, n, lat) -> None:
    """The cost model's per-group `ring_time_s` and the placement surrogate's arrays give the
    same number, bit for bit: one formula (collectives.collective_s), two shapes of input."""
    bw = np.array([1e9, 25e9, 300e9])[:, None] * np.ones_like(SIZES)
    vec = C.collective_s(op, n, SIZES[None, :], bw, lat)
    assert vec.shape == bw.shape
    for (i, k), got in np.ndenumerate(vec):
        link = GroupLink(size=n, bandwidth_bytes_per_s=float(bw[i, k]), latency_s=lat)
        assert ring_time_s(op, float(SIZES[k]), link) == got


def test_all_reduce_takes_the_tree_when_faster_on_both_paths() -> None:
    n, bw, lat = 64, 25e9, 5e-6
    tree = 2 * math.ceil(math.log2(n)) * lat + 2 * 1e6 / bw
    ring = 2 * (n - 1) * lat + 2 * (n - 1) / n * 1e6 / bw
    assert tree < ring
    link = GroupLink(size=n, bandwidth_bytes_per_s=bw, latency_s=lat)
    assert ring_time_s(CollectiveOp.ALL_REDUCE, 1e6, link) == pytest.approx(tree)
    vec = C.collective_s(CollectiveOp.ALL_REDUCE, n, np.array([0.0, 1e6, 1e10]), bw, lat)
    # latency is paid at 0 bytes; large buffers take the ring (2(n-1)/n < 2 bytes per byte)
    assert vec.tolist() == pytest.approx(
        [2 * 6 * lat, tree, 2 * (n - 1) * lat + 2 * (n - 1) / n * 1e10 / bw]
    )


@pytest.mark.parametrize("n", [2, 3, 8, 64])
def test_busbw_factor_is_the_rings_bandwidth_term(n) -> None:
    for op in CollectiveOp:
        t = C.ring_s(op, n, 1e9, 1e10, 0.0)
        assert op.busbw_factor(n) == pytest.approx(t * 1e10 / 1e9, rel=1e-15)
    assert profile_format.CollectiveOp is C.CollectiveOp


def test_measured_fit_and_p2p_use_the_message_formula() -> None:
    rec = CollectiveRecord(
        op=CollectiveOp.ALL_GATHER,
        gpu_ids=(0, 1),
        layout="contiguous",
        samples=(LinkSample(bytes=1, seconds=1.0),),
        alpha_s=3e-6,
        beta_bytes_per_s=2e10,
        busbw_bytes_per_s=1e10,
    )
    assert rec.time_s(4e6) == C.message_s(4e6, 2e10, 3e-6) == 3e-6 + 4e6 / 2e10
    cluster = presets.load_cluster("dgx-a100-80gb", 2)
    arrays = ClusterArrays(cluster, ParallelConfig(tp=8, pp=2, dp=1, micro_batch=1), 1.0)
    assert arrays.boundary_p2p_s(0, 1, 25e6, None) == C.message_s(25e6, 25e9, 5e-6)
