"""Context parallelism in the executor on CPU/gloo: losses of cp layouts equal a single process.

One set of 4 spawned processes runs every layout one after another (each start costs 10-40 s on
2 cores), each in a fresh process group; the single-process references run in the pytest
process. Layouts: cp2 x dp2 (selective recompute: the K/V gather runs again inside the
checkpointed core), cp2 x tp2 (dp = 1: gradients averaged over the cp ranks alone), cp2 x tp2
with sequence parallelism and full recompute, cp2 x pp2, a GPT (learned position table) at
cp2 x dp2, and a checkpoint written under cp2 x dp2 and resumed under cp1 x dp4.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
from executor_shapes import GPT, LLAMA
from test_executor_parallel import STEPS, _plan, _reference, _report, _spawn
from test_memory_parity import _small
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.testing._internal.distributed.fake_pg import FakeStore

import presets
from executor.activation_checkpoint import apply_ac
from executor.cp import ContextParallel, apply_cp
from executor.fake_dist import cuda_kernels
from executor.model import Transformer
from planner.cost import cp as cpcost
from planner.cost import memory
from planner.errors import ConfigError
from planner.parallel import ParallelConfig
from planner.runtime import EXECUTOR_CP, EXECUTOR_MEMORY, CpAttention
from planner.specs import Dtype, ModelSpec, NormKind, TrainingSpec


def _cp(rank: int, size: int) -> ContextParallel:
    return ContextParallel(group=None, size=size, rank=rank)  # type: ignore[arg-type]


def test_load_balanced_shards_cover_the_sequence_once_with_equal_causal_work() -> None:
    seq, cp = 16, 4
    tokens = torch.arange(seq)[None, :]
    shards = [_cp(c, cp).shard(tokens) for c in range(cp)]
    assert sorted(torch.cat(shards, dim=1).flatten().tolist()) == list(range(seq))
    for c, s in enumerate(shards):
        # the positions RoPE and the position table use are the tokens' own places
        assert s.flatten().tolist() == _cp(c, cp).positions(seq // cp, torch.device("cpu")).tolist()
    # causal work: keys seen by each query, summed per rank, is equal on every rank
    work = [sum(p + 1 for p in s.flatten().tolist()) for s in shards]
    assert len(set(work)) == 1


def test_cp_validation_names_the_rule() -> None:
    training = TrainingSpec(global_batch=8, seq_len=14, dtype=Dtype.FP32)
    cfg = ParallelConfig(tp=1, pp=1, dp=1, cp=2, micro_batch=2)
    with pytest.raises(ConfigError, match=r"cp=2 needs seq_len divisible by 2\*cp"):
        cfg.validate(LLAMA, training, _cluster(2))
    with pytest.raises(
        ConfigError, match=r"tp\*pp\*dp\*cp must equal the cluster's GPU count: 1\*1\*1\*2 = 2 != 4"
    ):
        cfg.validate(LLAMA, replace(training, seq_len=16), _cluster(4))


@pytest.mark.parametrize("kind", list(EXECUTOR_CP.supported))
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("name", ["llama3-8b", "gpt3-1.3b"])
def test_cp_block_saved_bytes_equal_the_rules(name: str, recompute: str, kind: CpAttention) -> None:
    """A block under cp = 2 (rank 0 of a fake process group) keeps exactly what the memory rules
    of a seq/cp block plus planner/cost/cp.py's gathered K, V say."""
    spec = _small(name)
    seq, cp, mb = 64, 2, 2
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=cp)
    try:
        got = _cp_saved_bytes(spec, seq, cp, mb, recompute, kind)
    finally:
        dist.destroy_process_group()
    predicted = memory.block_activation_bytes(
        spec,
        micro_batch=mb,
        seq_len=seq // cp,
        tp=1,
        sequence_parallel=False,
        recompute=recompute,
        flash_attention=True,
        dtype=Dtype.BF16,
        residual_bytes=2,
        rules=EXECUTOR_MEMORY,
    ) + cpcost.saved_extra_bytes(
        spec,
        micro_batch=mb,
        seq_len=seq,
        tp=1,
        cp=cp,
        recompute=recompute,
        dtype=Dtype.BF16,
        rules=EXECUTOR_CP,
        kind=kind,
    )
    # Not in the model: fp32 copies of the bf16 norm weights, as in tests/test_memory_parity.py,
    # and on CPU the lower-right causal mask of the second query chunk, materialised as an
    # [n, seq] bf16 bias on rank 0 (CUDA's flash and efficient kernels take it without materialising).
    tensors_per_norm = 2 if spec.norm is NormKind.LAYERNORM else 1
    constant = 0 if recompute == "full" else 2 * tensors_per_norm * 4 * spec.hidden
    n = seq // (2 * cp)
    mask = 2 * n * (2 * cp * n) if recompute == "none" and kind is CpAttention.ALL_GATHER_KV else 0
    assert got == predicted + constant + mask


def _cp_saved_bytes(
    spec: ModelSpec, seq: int, cp: int, mb: int, recompute: str, kind: CpAttention
) -> int:
    model = Transformer(spec, tie_embeddings=False)
    model.embed, model.head = None, None
    model = model.to(torch.bfloat16)
    apply_cp(model, ContextParallel(group=dist.group.WORLD, size=cp, rank=0, kind=kind))
    blk = model.layers["0"]
    apply_ac(blk, recompute)
    params = {s.data_ptr() for p in blk.parameters() for s in get_untyped_storages(p)}
    x = torch.randn(mb, seq // cp, spec.hidden, dtype=torch.bfloat16, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        for st in get_untyped_storages(t):
            if st.data_ptr() not in params:
                saved[st.data_ptr()] = st.nbytes()
        return t

    with (
        cuda_kernels(),
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        blk(x)
    return sum(saved.values())


@pytest.mark.slow
def test_cp_layouts_match_single_process(tmp_path: Path) -> None:
    ref_llama = _reference(_plan(tmp_path, "ref", LLAMA, 1, tp=1, pp=1, dp=1, micro_batch=2))
    ref_gpt = _reference(_plan(tmp_path, "ref-gpt", GPT, 1, tp=1, pp=1, dp=1, micro_batch=2))
    ckpt = tmp_path / "ckpt"
    half = STEPS - 2
    cases = [
        {
            "name": "cp2-dp2-selective",
            "plan": _plan(
                tmp_path,
                "a",
                LLAMA,
                4,
                tp=1,
                pp=1,
                dp=2,
                cp=2,
                micro_batch=2,
                recompute="selective",
            ),
        },
        {
            "name": "cp2-tp2",
            "plan": _plan(tmp_path, "b", LLAMA, 4, tp=2, pp=1, dp=1, cp=2, micro_batch=2),
        },
        {
            "name": "cp2-tp2-sp-full",
            "plan": _plan(
                tmp_path,
                "c",
                LLAMA,
                4,
                tp=2,
                pp=1,
                dp=1,
                cp=2,
                micro_batch=2,
                sequence_parallel=True,
                recompute="full",
            ),
        },
        {
            "name": "cp2-pp2",
            "plan": _plan(tmp_path, "d", LLAMA, 4, tp=1, pp=2, dp=1, cp=2, micro_batch=2),
        },
        {
            "name": "cp2-dp2-ulysses",
            "plan": _plan(
                tmp_path,
                "u",
                LLAMA,
                4,
                tp=1,
                pp=1,
                dp=2,
                cp=2,
                micro_batch=2,
                cp_attention="ulysses",
                recompute="selective",
            ),
        },
        {
            "name": "gpt-cp2-pp2-ulysses",
            "plan": _plan(
                tmp_path,
                "v",
                GPT,
                4,
                tp=1,
                pp=2,
                dp=1,
                cp=2,
                micro_batch=2,
                cp_attention="ulysses",
            ),
        },
        {
            "name": "gpt-cp2-dp2",
            "plan": _plan(tmp_path, "e", GPT, 4, tp=1, pp=1, dp=2, cp=2, micro_batch=2),
        },
        {
            "name": "save-cp2",
            "plan": _plan(tmp_path, "f", LLAMA, 4, tp=1, pp=1, dp=2, cp=2, micro_batch=2, zero=1),
            "opts": {"checkpoint_dir": str(ckpt), "checkpoint_every": half},
        },
        {
            "name": "resume-cp1",
            "plan": _plan(tmp_path, "g", LLAMA, 4, tp=1, pp=1, dp=4, micro_batch=2, zero=1),
            "opts": {"checkpoint_dir": str(ckpt), "resume": True},
        },
    ]
    got = _spawn(4, cases, tmp_path)
    diffs = {
        name: _max_diff_any(got[name], ref_gpt if name.startswith("gpt") else ref_llama)
        for name in (
            "cp2-dp2-selective",
            "cp2-tp2",
            "cp2-tp2-sp-full",
            "cp2-pp2",
            "gpt-cp2-dp2",
            "cp2-dp2-ulysses",
            "gpt-cp2-pp2-ulysses",
        )
    }
    diffs["save-cp2"] = _max_diff_any(got["save-cp2"], ref_llama)
    diffs["resume-cp1 (after cp2)"] = _max_diff_any(got["resume-cp1"], ref_llama[half:])
    _report(diffs)
    assert ref_llama[-1] < ref_llama[0] - 0.05  # the model trains, so equal losses mean something


def _max_diff_any(got: list[float], want: list[float]) -> float:
    if len(got) != len(want):
        return math.inf
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


def _cluster(workers: int):  # noqa: ANN202
    two = presets.load_cluster("cpu-2")
    return replace(two, name=f"cpu-{workers}", nodes=(replace(two.nodes[0], gpus=workers),))
