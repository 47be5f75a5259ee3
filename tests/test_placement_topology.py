"""The topology graph / link model and rank-map validation (fast, pure)."""

from __future__ import annotations

import numpy as np
import pytest

import presets
from planner.cost.comm import GroupLink, ring_time_s
from planner.errors import ConfigError
from planner.parallel import ParallelConfig
from planner.placement import validate_rank_map
from planner.profile import CollectiveOp, P2PRecord, Profile, ProfileGpu, ProfileMeta
from planner.specs import Dtype, TrainingSpec
from planner.topology import Surrogate, gpu_graph, link_model, tp_islands
from presets import cluster_from_dict

SPINE = {"name": "spine", "bandwidth_gb_per_s": 12.5, "latency_us": 10}


def _mixed_cluster():
    return cluster_from_dict(
        {
            "nodes": [
                {"type": "dgx-a100-80gb"},
                {"type": "dgx-a100-80gb", "nic_factor": 0.25},
                {"type": "dgx-h100", "switch": 1},
            ],
            "inter_switch_link": SPINE,
        },
        "test",
        None,
    )


def test_links_match_cluster_link_classes():
    cluster = _mixed_cluster()
    links = link_model(cluster)
    for a in range(0, cluster.num_gpus, 3):
        for b in range(cluster.num_gpus):
            if a == b:
                continue
            spec = cluster.link_between(a, b)
            assert links.link(a, b) == pytest.approx((spec.bandwidth_bytes_per_s, spec.latency_s))


def test_graph_attributes_and_edges():
    cluster = _mixed_cluster()
    graph = gpu_graph(cluster, gpus=[0, 1, 9, 17])
    assert graph.nodes[9] == {"node": 1, "local": 1, "gpu_type": "A100-80GB", "switch": 0}
    assert graph.nodes[17]["gpu_type"] == "H100-SXM-80GB"
    assert graph.number_of_edges() == 6
    assert graph.edges[0, 1]["bandwidth_bytes_per_s"] == 300e9
    assert graph.edges[0, 9]["bandwidth_bytes_per_s"] == pytest.approx(25e9 * 0.25)
    assert graph.edges[0, 17]["bandwidth_bytes_per_s"] == pytest.approx(12.5e9)


def test_ring_bottleneck_and_nic_sharing():
    cluster = _mixed_cluster()
    links = link_model(cluster)
    # one ring over nodes 0 and 2 (different switches): capped by the spine
    bw, _ = links.ring_links(np.array([[0, 16]]))
    assert bw[0] == pytest.approx(12.5e9)
    # one ring over nodes 0 and 1 gets node 1's eight NICs at 25 %
    bw, _ = links.ring_links(np.array([[0, 8]]))
    assert bw[0] == pytest.approx(8 * 25e9 * 0.25)
    # eight concurrent rings leaving nodes 0 and 1 share their NICs
    rings = np.stack([np.arange(8), np.arange(8, 16)], axis=1)
    bw, _ = links.ring_links(rings)
    assert bw == pytest.approx(np.full(8, 25e9 * 0.25))
    # a ring inside one node runs at the intra link
    bw, _ = links.ring_links(np.array([[0, 1, 2, 3]]))
    assert bw[0] == pytest.approx(300e9)


def _profile(n: int, fast_pairs: set[tuple[int, int]]) -> Profile:
    meta = ProfileMeta(
        hosts=("h0",), device_kind="gpu", torch_version="t", dtype=Dtype.BF16, date="d", method="m"
    )
    gpus = tuple(
        ProfileGpu(gpu_id=i, host="h0", local_index=i, device_name="x", memory_bytes=1)
        for i in range(n)
    )
    p2p = tuple(
        P2PRecord(
            src=a,
            dst=b,
            bandwidth_bytes_per_s=100e9 if (min(a, b), max(a, b)) in fast_pairs else 10e9,
            latency_s=1e-6,
        )
        for a in range(n)
        for b in range(n)
        if a != b
    )
    return Profile(schema_version=1, meta=meta, gpus=gpus, p2p=p2p)


def test_measured_links_and_tp_islands():
    cluster = cluster_from_dict(
        {
            "node_types": {
                "pcie4": {
                    "gpu": "L40S",
                    "gpus": 4,
                    "intra_link": {"bandwidth_gb_per_s": 32, "latency_us": 5},
                    "nic": {"bandwidth_gb_per_s": 12.5, "latency_us": 10},
                    "nics": 1,
                }
            },
            "nodes": [{"type": "pcie4"}],
        },
        "test",
        None,
    )
    profile = _profile(4, {(0, 2), (1, 3)})
    links = link_model(cluster, profile)
    assert links.link(0, 2) == pytest.approx((100e9, 1e-6))
    assert links.link(0, 1) == pytest.approx((10e9, 1e-6))
    graph = gpu_graph(cluster, profile)
    assert tp_islands(graph, [0, 1, 2, 3], 2) == [(0, 2), (1, 3)]
    assert tp_islands(gpu_graph(cluster), [0, 1, 2, 3], 2) == [(0, 1), (2, 3)]


def test_validate_rank_map():
    cluster = _mixed_cluster()
    cfg = ParallelConfig(tp=4, pp=2, dp=3, micro_batch=1)
    default = tuple(range(24))
    validate_rank_map(cluster, cfg, default)
    swapped = (4, 5, 6, 7, 0, 1, 2, 3) + default[8:]
    validate_rank_map(cluster, cfg, swapped)
    with pytest.raises(ConfigError, match="GPU 0 is given to mesh ranks 0 and 1"):
        validate_rank_map(cluster, cfg, (0, 0) + default[2:])
    with pytest.raises(ConfigError, match="outside 0..23"):
        validate_rank_map(cluster, cfg, default[:-1] + (24,))
    with pytest.raises(ConfigError, match="23 entries"):
        validate_rank_map(cluster, cfg, default[:-1])
    split = (0, 1, 2, 8) + (4, 5, 6, 7) + (3,) + default[9:]
    with pytest.raises(ConfigError, match=r"TP group \(pp=0, dp=0\).*spans nodes \[0, 1\]"):
        validate_rank_map(cluster, cfg, split)
    with pytest.raises(ConfigError, match="!= 24 GPUs"):
        validate_rank_map(cluster, ParallelConfig(tp=4, pp=1, dp=2, micro_batch=1), default)


def test_validate_allows_tp_across_nodes_only_when_larger_than_a_node():
    cluster = cluster_from_dict({"node_type": "dgx-h100"}, "test", 4)
    cfg = ParallelConfig(tp=16, pp=1, dp=2, micro_batch=1)
    order = tuple(range(8)) + tuple(range(16, 24)) + tuple(range(8, 16)) + tuple(range(24, 32))
    validate_rank_map(cluster, cfg, order)


def test_surrogate_prices_collectives_like_the_cost_model():
    """The placement surrogate's DP all-reduce is the cost model's `ring_time_s` on the same
    link, NCCL's tree included: 64 ranks and a small gradient buffer are latency-bound, where
    the tree's 2 log2(n) latencies beat the ring's 2(n-1)."""
    model = presets.load_model("tiny-gpt")
    cluster = presets.load_cluster("dgx-h100", 8)
    training = TrainingSpec(global_batch=64, seq_len=128, dtype=Dtype.BF16)
    config = ParallelConfig(tp=1, pp=1, dp=64, micro_batch=1)
    links = link_model(cluster)
    sur = Surrogate(model, training, cluster, config, links)
    rank_map = np.arange(64).reshape(1, 64, 1)
    bw, lat = links.ring_links(rank_map.transpose(0, 2, 1).reshape(1, 64))
    link = GroupLink(size=64, bandwidth_bytes_per_s=float(bw[0]), latency_s=float(lat[0]))
    sync = ring_time_s(CollectiveOp.ALL_REDUCE, float(sur.grad_bytes[0]), link)
    ring = 2 * 63 * link.latency_s + 2 * 63 / 64 * sur.grad_bytes[0] / link.bandwidth_bytes_per_s
    assert sync < ring / 2  # the tree
    speed = sur.gpu_speed[rank_map].min(axis=2)
    compute = sur.m * (sur.work_flops[:, None] / speed).max()
    exposed = sync - (sur.bwd_flops[:, None] / speed).max()
    assert exposed > 0
    assert sur.rank_ends(rank_map)[0] == pytest.approx(compute + exposed, rel=1e-12)
