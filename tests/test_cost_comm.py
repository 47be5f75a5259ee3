"""Alpha-beta ring collectives over the actual GPU ids of a group (comm.py)."""

from __future__ import annotations

import pytest

import presets
from planner.cost.comm import ClusterArrays, GroupLink, ring_time_s
from planner.parallel import MeshAxis, ParallelConfig
from planner.profile import CollectiveOp


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
