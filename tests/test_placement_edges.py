"""Placement corner cases: measured profiles, TP across nodes, no TP tiling, surrogate-only."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import planner.placement as placement
from planner.cost.estimate import estimate
from planner.errors import ConfigError
from planner.parallel import ParallelConfig
from planner.placement import place, validate_rank_map
from planner.profile import P2PRecord, Profile, ProfileGpu, ProfileMeta
from planner.specs import Dtype, TrainingSpec
from planner.topology import Surrogate, link_model
from presets import cluster_from_dict, load_model


def _node_type(gpus: int, nics: int = 2) -> dict[str, object]:
    return {
        "box": {
            "gpu": "A100-80GB",
            "gpus": gpus,
            "intra_link": {"name": "nvlink3", "bandwidth_gb_per_s": 300, "latency_us": 2},
            "nic": {"name": "hdr-ib", "bandwidth_gb_per_s": 25, "latency_us": 5},
            "nics": nics,
        }
    }


def _profile_from(cluster, slow_node: int) -> Profile:
    """A measured p2p matrix equal to the link classes, except `slow_node`'s network at 10 %."""
    links = link_model(cluster)
    n = cluster.num_gpus
    meta = ProfileMeta(
        hosts=tuple(f"h{i}" for i in range(len(cluster.nodes))),
        device_kind="gpu",
        torch_version="t",
        dtype=Dtype.BF16,
        date="d",
        method="synthetic",
    )
    gpus = tuple(
        ProfileGpu(
            gpu_id=g,
            host=f"h{int(links.gpu_node[g])}",
            local_index=int(links.gpu_local[g]),
            device_name="A100",
            memory_bytes=80 * 2**30,
        )
        for g in range(n)
    )
    records = []
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            bw, lat = links.link(a, b)
            na, nb = int(links.gpu_node[a]), int(links.gpu_node[b])
            if na != nb and slow_node in (na, nb):
                bw *= 0.1
            records.append(P2PRecord(src=a, dst=b, bandwidth_bytes_per_s=bw, latency_s=lat))
    return Profile(schema_version=1, meta=meta, gpus=gpus, p2p=tuple(records))


def test_measured_profile_is_never_worse():
    cluster = cluster_from_dict(
        {"node_types": _node_type(4), "nodes": [{"type": "box", "count": 4}]}, "t", None
    )
    profile = _profile_from(cluster, slow_node=1)
    links = link_model(cluster, profile)
    assert links.link(4, 8)[0] == pytest.approx(2.5e9)
    model = load_model("gpt3-1.3b")
    training = TrainingSpec(global_batch=8, seq_len=2048)
    config = ParallelConfig(tp=2, pp=2, dp=4, micro_batch=1)
    result = place(model, training, cluster, config, profile)
    validate_rank_map(cluster, config, result.rank_to_gpu)
    placed = replace(config, rank_to_gpu=result.rank_to_gpu)
    assert result.step_time_s == pytest.approx(
        estimate(model, training, cluster, placed, profile=profile).step_time_s
    )
    assert result.step_time_s <= result.default_step_time_s


def test_tp_larger_than_a_node_uses_whole_node_blocks():
    nodes = [{"type": "box", "count": 3}, {"type": "box", "nic_factor": 0.25}]
    cluster = cluster_from_dict({"node_types": _node_type(4), "nodes": nodes}, "t", None)
    model = load_model("gpt3-1.3b")
    training = TrainingSpec(global_batch=4, seq_len=2048)
    config = ParallelConfig(tp=8, pp=1, dp=2, micro_batch=1)
    result = place(model, training, cluster, config)
    validate_rank_map(cluster, config, result.rank_to_gpu)
    assert result.step_time_s <= result.default_step_time_s
    groups = np.asarray(result.rank_to_gpu).reshape(2, 8) // 4
    assert all(len(set(row.tolist())) == 2 for row in groups)


def test_tp_that_cannot_tile_the_nodes_is_a_config_error():
    cluster = cluster_from_dict(
        {"node_types": _node_type(6), "nodes": [{"type": "box", "count": 2}]}, "t", None
    )
    model = load_model("gpt3-1.3b")
    training = TrainingSpec(global_batch=3, seq_len=2048)
    config = ParallelConfig(tp=4, pp=1, dp=3, micro_batch=1)
    with pytest.raises(ConfigError, match="must stay inside one node"):
        place(model, training, cluster, config)


def test_surrogate_alone_when_no_cost_model(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(placement, "_cost_model", lambda *args: None)
    nodes = [{"type": "dgx-a100-80gb", "switch": i % 2} for i in range(4)]
    spine = {"name": "spine", "bandwidth_gb_per_s": 12.5, "latency_us": 10}
    cluster = cluster_from_dict({"nodes": nodes, "inter_switch_link": spine}, "t", None)
    model = load_model("llama3-8b")
    training = TrainingSpec(global_batch=8, seq_len=2048)
    config = ParallelConfig(tp=8, pp=2, dp=2, micro_batch=1)
    result = place(model, training, cluster, config)
    assert result.objective == "link-level surrogate (estimate)"
    assert any("surrogate" in s for s in result.explanation)
    sur = Surrogate(model, training, cluster, config, link_model(cluster))
    assert result.step_time_s == pytest.approx(
        sur.step_s(np.asarray(result.rank_to_gpu).reshape(2, 2, 8))
    )
    assert result.speedup > 1.15


def test_tp_blocks_stay_on_one_switch():
    """Hosts alternate between two switches: TP groups of 16 must not straddle the spine."""
    nodes = [{"type": "dgx-h100", "switch": i % 2} for i in range(4)]
    spine = {"name": "spine", "bandwidth_gb_per_s": 12.5, "latency_us": 10}
    cluster = cluster_from_dict({"nodes": nodes, "inter_switch_link": spine}, "t", None)
    model = load_model("llama2-7b")
    training = TrainingSpec(global_batch=8, seq_len=2048)
    config = ParallelConfig(tp=16, pp=1, dp=2, micro_batch=1)
    result = place(model, training, cluster, config)
    validate_rank_map(cluster, config, result.rank_to_gpu)
    switch = (np.asarray(result.rank_to_gpu).reshape(2, 16) // 8) % 2
    assert all(len(set(row.tolist())) == 1 for row in switch)
    assert result.speedup > 1.15
