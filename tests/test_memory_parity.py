"""The executor's memory rules (planner/runtime.py `EXECUTOR_MEMORY`) against what the executor
really keeps: the saved-for-backward tensors of its own `TransformerBlock` after `apply_tp`
(on a fake process group, with memcheck's CUDA autocast shims), and the live bytes of its head
and loss through forward and backward. These are measurements of the code that trains, not of
the formula; the whole-rank check is memcheck (tests/test_memcheck.py, benchmarks/)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from executor.activation_checkpoint import apply_ac
from executor.fake_dist import StorageTracker, cuda_kernels
from executor.model import Transformer, loss_fn
from executor.tp import apply_tp, loss_context
from planner.cost import memory
from planner.runtime import EXECUTOR_MEMORY
from planner.specs import Dtype, ModelSpec, NormKind
from presets import load_model

MB, SEQ = 2, 64


@pytest.fixture
def fake_mesh(request: pytest.FixtureRequest) -> Iterator[DeviceMesh]:
    tp = request.param
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        yield init_device_mesh("cpu", (tp,))
    finally:
        dist.destroy_process_group()


def _small(name: str) -> ModelSpec:
    spec = load_model(name)
    kv = 8 if spec.kv_heads == spec.heads else 2
    return dataclasses.replace(
        spec, layers=1, hidden=512, heads=8, kv_heads=kv, ffn_hidden=1024, head_dim=64, vocab=1024
    )


def _chunk(spec: ModelSpec, mesh: DeviceMesh, sp: bool, *, block: bool) -> Transformer:
    model = Transformer(spec, tie_embeddings=False)
    model.embed = None
    if block:
        model.head = None
    else:
        del model.layers["0"]
    model = model.to(torch.bfloat16)  # FSDP mixed precision: bf16 parameters, autocast on
    if mesh.size() > 1:
        apply_tp(model, mesh, sequence_parallel=sp)
    return model


def _saved_bytes(spec: ModelSpec, mesh: DeviceMesh, sp: bool, recompute: str) -> int:
    model = _chunk(spec, mesh, sp, block=True)
    blk = model.layers["0"]
    apply_ac(blk, recompute)
    params = {s.data_ptr() for p in blk.parameters() for s in get_untyped_storages(p)}
    tp = mesh.size()
    x = torch.randn(MB, SEQ // tp if sp else SEQ, spec.hidden, dtype=torch.bfloat16)
    x.requires_grad_(True)
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


@pytest.mark.parametrize(
    "fake_mesh,sp,name",
    [
        (1, False, "llama3-8b"),
        (2, False, "llama3-8b"),
        (2, True, "llama3-8b"),
        (1, False, "gpt3-1.3b"),  # LayerNorm (mean + rstd), GELU, biases, no RoPE
        (2, True, "gpt3-1.3b"),
    ],
    indirect=["fake_mesh"],
)
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_block_saved_bytes_equal_the_executor_rules(
    fake_mesh: DeviceMesh, sp: bool, name: str, recompute: str
) -> None:
    spec = _small(name)
    got = _saved_bytes(spec, fake_mesh, sp, recompute)
    predicted = memory.block_activation_bytes(
        spec,
        micro_batch=MB,
        seq_len=SEQ,
        tp=fake_mesh.size(),
        sequence_parallel=sp,
        recompute=recompute,
        flash_attention=True,
        dtype=Dtype.BF16,
        residual_bytes=2,
        rules=EXECUTOR_MEMORY,
    )
    # Not in the model: fp32 copies of the bf16 norm weights (and biases), a constant
    # 2 norms x 4h bytes per block and micro-batch (32 KiB at h = 4096).
    tensors_per_norm = 2 if spec.norm is NormKind.LAYERNORM else 1
    constant = 0 if recompute == "full" else 2 * tensors_per_norm * 4 * spec.hidden
    assert got == predicted + constant


def _loss_peak_bytes(spec: ModelSpec, mesh: DeviceMesh, sp: bool, seq: int) -> int:
    model = _chunk(spec, mesh, sp, block=False)
    tp = mesh.size()
    x = torch.randn(MB, seq // tp if sp else seq, spec.hidden, dtype=torch.bfloat16)
    x.requires_grad_(True)
    y = torch.randint(0, spec.vocab, (MB, seq))
    tracker = StorageTracker(
        known=dict, label=lambda: 0, optimizing=lambda: False, block_bytes=1, fake=False
    )
    with tracker, cuda_kernels(), loss_context(tp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
    return tracker.peak_bytes


@pytest.mark.parametrize(
    "fake_mesh,sp", [(1, False), (2, False), (2, True)], indirect=["fake_mesh"]
)
def test_loss_bytes_per_logit_are_the_executors(fake_mesh: DeviceMesh, sp: bool) -> None:
    """The head's growth per token (two sequence lengths, so parameters and their gradients
    cancel) against head_activation_bytes: the measured loss constants within 4 %."""
    spec = dataclasses.replace(_small("llama3-8b"), vocab=4096, hidden=256, heads=4)
    seqs = (256, 512)
    grow = _loss_peak_bytes(spec, fake_mesh, sp, seqs[1]) - _loss_peak_bytes(
        spec, fake_mesh, sp, seqs[0]
    )

    def predicted(seq: int) -> float:
        return memory.head_activation_bytes(
            spec, micro_batch=MB, seq_len=seq, tp=fake_mesh.size(), sequence_parallel=sp,
            dtype=Dtype.BF16, rules=EXECUTOR_MEMORY,
        )  # fmt: skip

    assert grow == pytest.approx(predicted(seqs[1]) - predicted(seqs[0]), rel=0.04)


@pytest.mark.parametrize("fake_mesh", [2, 4], indirect=True)
def test_vocab_parallel_embedding_gradient_has_every_row(fake_mesh: DeviceMesh) -> None:
    """The rule `embedding_grad_full_vocab`: the local gradient of DTensor's vocab-sharded
    embedding is V x h, so the excess over the rank's shard is what memory.py adds."""
    spec = _small("llama3-8b")
    model = Transformer(spec, tie_embeddings=False)
    model.head = None
    del model.layers["0"]
    apply_tp(model, fake_mesh, sequence_parallel=False)
    out = model.embed(torch.randint(0, spec.vocab, (MB, SEQ)))
    out.sum().backward()
    weight = model.embed.tok_embeddings.weight
    local_grad = weight.grad.to_local()
    excess = local_grad.nbytes - weight.to_local().nbytes
    tp = fake_mesh.size()
    assert excess == memory.embedding_gradient_excess_bytes(spec, tp, Dtype.FP32, EXECUTOR_MEMORY)
