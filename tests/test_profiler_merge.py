"""Merging node profiles (torch-free): accepted shapes, every rejection, split/merge round trip,
plus the pure helpers of the profiler (schedules, statistics, heat-map)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from planner.errors import FormatError, SpecError
from planner.parallel import Recompute
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
    load_profile,
    save_profile,
)
from planner.specs import Dtype
from presets import load_model
from profiler.links import collective_layouts, group_sizes, node_pairings, p2p_rounds, round_robin
from profiler.merge import collect_paths, load_sources, merge_profiles, split_by_host
from profiler.stats import iqr, median
from profiler.summary import bandwidth_heatmap

SAMPLES = (LinkSample(bytes=4096, seconds=1e-5), LinkSample(bytes=1 << 20, seconds=1e-4))


def _meta(
    hosts: tuple[str, ...], dtype: Dtype = Dtype.BF16, model: str = "tiny-gpt"
) -> ProfileMeta:
    return ProfileMeta(
        hosts=hosts,
        device_kind="gpu",
        torch_version="2.13.0",
        dtype=dtype,
        date="2026-11-23T00:00:00+00:00",
        method="test",
        model=load_model(model),
    )


def _node(
    host: str, first_id: int, n: int, *, dtype: Dtype = Dtype.BF16, compute: bool = True
) -> Profile:
    ids = range(first_id, first_id + n)
    rec = ComputeRecord(
        block=BlockKind.TRANSFORMER_BLOCK,
        device_name="H100",
        tp=1,
        micro_batch=1,
        seq_len=128,
        recompute=Recompute.NONE,
        forward_s=1e-3,
        forward_spread_s=1e-5,
        backward_s=2e-3,
        backward_spread_s=1e-5,
        activation_bytes=1000,
        parameter_bytes=2000,
        repeats=3,
    )
    return Profile(
        schema_version=SCHEMA_VERSION,
        meta=_meta((host,), dtype),
        gpus=tuple(
            ProfileGpu(
                gpu_id=i,
                host=host,
                local_index=i - first_id,
                device_name="H100",
                memory_bytes=80 << 30,
            )
            for i in ids
        ),
        compute=(rec,) if compute else (),
        p2p=tuple(
            P2PRecord(src=a, dst=b, bandwidth_bytes_per_s=1e11, latency_s=1e-5, samples=SAMPLES)
            for a, b in itertools.permutations(ids, 2)
        ),
        collectives=(
            CollectiveRecord(
                op=CollectiveOp.ALL_REDUCE,
                gpu_ids=tuple(ids),
                layout="contiguous",
                samples=SAMPLES,
                alpha_s=1e-5,
                beta_bytes_per_s=1e10,
                busbw_bytes_per_s=1e10,
            ),
        ),
    )


def test_merge_two_nodes_keeps_everything_and_notes_missing_pairs() -> None:
    merged, notes = merge_profiles([("a", _node("a", 0, 2)), ("b", _node("b", 2, 2))])
    assert [g.gpu_id for g in merged.gpus] == [0, 1, 2, 3]
    assert merged.meta.hosts == ("a", "b")
    assert len(merged.p2p) == 4 and len(merged.collectives) == 2
    assert len(merged.compute) == 1  # same device type measured twice: kept once
    assert any("more than one node" in n for n in notes)
    assert any("8 of 12 GPU pairs" in n for n in notes)


def test_merge_rejects_duplicate_gpu() -> None:
    with pytest.raises(
        FormatError, match="duplicate GPU: gpu_id 0 is in both a and b.*--distributed"
    ):
        merge_profiles([("a", _node("a", 0, 2)), ("b", _node("b", 0, 2))])


def test_merge_rejects_gap_in_ids() -> None:
    with pytest.raises(
        FormatError, match=r"gap in GPU ids: 2\.\.3 missing \(have 0\.\.1, 4\.\.5\)"
    ):
        merge_profiles([("a", _node("a", 0, 2)), ("c", _node("c", 4, 2))])


def test_merge_rejects_dtype_mismatch() -> None:
    with pytest.raises(FormatError, match="dtype mismatch: a has bf16, b has fp32"):
        merge_profiles([("a", _node("a", 0, 2)), ("b", _node("b", 2, 2, dtype=Dtype.FP32))])


def test_merge_rejects_model_mismatch() -> None:
    b = _node("b", 2, 2)
    b = replace(b, meta=replace(b.meta, model=load_model("tiny-llama")))
    with pytest.raises(
        FormatError, match="model mismatch: a has model 'tiny-gpt', b has model 'tiny-llama'"
    ):
        merge_profiles([("a", _node("a", 0, 2)), ("b", b)])


def test_merge_rejects_duplicate_link_and_unknown_gpu() -> None:
    a = _node("a", 0, 2)
    b = replace(_node("b", 2, 2), p2p=a.p2p)
    with pytest.raises(FormatError, match="duplicate link: p2p 0->1"):
        merge_profiles([("a", a), ("b", b)])
    lone = replace(_node("b", 2, 2), p2p=(replace(a.p2p[0], src=2, dst=9),))
    with pytest.raises(FormatError, match="names a GPU no profile lists"):
        merge_profiles([("a", a), ("b", lone)])


def test_merge_rejects_other_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "profile-x.json"
    save_profile(_node("x", 0, 1), path)
    data = json.loads(path.read_text())
    data["schema_version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match="schema_version=2 is not supported"):
        load_sources(collect_paths([str(tmp_path)]))


def test_collect_paths_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file or directory"):
        collect_paths([str(tmp_path / "missing")])
    with pytest.raises(SpecError, match="no profile-"):
        collect_paths([str(tmp_path)])


def test_split_then_merge_round_trips() -> None:
    whole, _ = merge_profiles([("a", _node("a", 0, 2)), ("b", _node("b", 2, 2, compute=False))])
    parts = split_by_host(whole)
    assert set(parts) == {"a", "b"}
    assert len(parts["a"].compute) == 1 and not parts["b"].compute
    again, _ = merge_profiles(sorted(parts.items()))
    assert again == whole


def test_merge_cli_writes_and_rejects(tmp_path: Path) -> None:
    d = tmp_path / "nodes"
    d.mkdir()
    save_profile(_node("a", 0, 2), d / "profile-a.json")
    save_profile(_node("b", 2, 2), d / "profile-b.json")
    out = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "cli", "profile", "merge", str(d), "--out", str(out), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["out"] == str(out) and len(load_profile(out).gpus) == 4
    save_profile(_node("c", 2, 2), d / "profile-c.json")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: duplicate GPU: gpu_id 2")
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_round_robin_covers_every_pair_once_without_conflicts(n: int) -> None:
    rounds = round_robin(range(n))
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == list(itertools.combinations(range(n), 2))
    for r in rounds:
        members = [x for p in r for x in p]
        assert len(members) == len(set(members))


@pytest.mark.parametrize("nodes,per_node", [(1, 4), (2, 2), (2, 3), (4, 2), (3, 2)])
def test_p2p_rounds_cover_all_pairs_and_are_contention_free(nodes: int, per_node: int) -> None:
    node_of_rank = [r // per_node for r in range(nodes * per_node)]
    rounds = p2p_rounds(node_of_rank)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == list(itertools.combinations(range(nodes * per_node), 2))
    for r in rounds:
        members = [x for p in r for x in p]
        assert len(members) == len(set(members))
        # a round is either all intra-node or all inter-node pairs
        assert len({node_of_rank[a] == node_of_rank[b] for a, b in r}) == 1


def test_node_pairings_recursive_halving_order() -> None:
    assert node_pairings(4)[0] == [(0, 2), (1, 3)]
    assert node_pairings(4)[1] == [(0, 1), (2, 3)]
    assert len(node_pairings(4)) == 3


def test_collective_layouts() -> None:
    assert group_sizes(8) == [2, 4, 8] and group_sizes(6) == [2, 4, 6]
    layouts = {(n, lay): groups for n, lay, groups in collective_layouts(4)}
    assert layouts[(2, "contiguous")] == [(0, 1), (2, 3)]
    assert layouts[(2, "strided")] == [(0, 2), (1, 3)]
    assert (4, "strided") not in layouts


def test_median_and_iqr() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0


def test_heatmap_shades_and_numbers() -> None:
    prof = _node("a", 0, 3)
    slow = tuple(replace(r, bandwidth_bytes_per_s=2.5e10) if r.src == 2 else r for r in prof.p2p)
    lines = bandwidth_heatmap(replace(prof, p2p=slow))
    assert len(lines) == 5
    assert "█100.00" in lines[1] and "░ 25.00" in lines[3]


def test_merge_refuses_out_that_is_a_named_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    save_profile(_node("a", 0, 2), a)
    save_profile(_node("b", 2, 2), b)
    before = a.read_bytes()
    assert main(["profile", "merge", str(a), str(b), "--out", str(a)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {a}: is also an input") and len(err.splitlines()) == 1
    assert a.read_bytes() == before


def test_merge_into_the_directory_it_reads_skips_its_old_result(tmp_path: Path) -> None:
    from cli.main import main

    d = tmp_path / "nodes"
    d.mkdir()
    save_profile(_node("a", 0, 2), d / "profile-a.json")
    save_profile(_node("b", 2, 2), d / "profile-b.json")
    out = d / "profile-all.json"  # matches the directory's profile-*.json on the second run
    assert main(["profile", "merge", str(d), "--out", str(out)]) == 0
    assert main(["profile", "merge", str(d), "--out", str(out)]) == 0
    assert len(load_profile(out).gpus) == 4
    assert sorted(p.name for p in d.iterdir()) == [
        "profile-a.json",
        "profile-all.json",
        "profile-b.json",
    ]


@pytest.mark.parametrize("where", ["missing/p.json", "afile/p.json", "adir"])
def test_merge_refuses_unwritable_out(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    src = tmp_path / "a.json"
    save_profile(_node("a", 0, 2), src)
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "adir").mkdir()
    out = tmp_path / where
    assert main(["profile", "merge", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "missing").exists()
