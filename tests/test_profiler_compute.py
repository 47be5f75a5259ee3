"""Compute measurement on CPU: record structure, monotonicity in micro-batch, activation bytes
against the analytic formula (Korthikanti et al. 2022 Table 2), and the GPU path (marked gpu)."""

from __future__ import annotations

import pytest
import torch

from planner.parallel import Recompute
from planner.profile import BlockKind
from planner.specs import Dtype, ModelSpec
from presets import load_model
from profiler.compute import ComputeCase, ComputeSettings, compute_cases, measure_all, measure_case

CPU = torch.device("cpu")
SEQ = 128


def _settings(**kw: object) -> ComputeSettings:
    base = dict(
        tps=(1,),
        micro_batches=(1, 2),
        seq_len=SEQ,
        recomputes=tuple(Recompute),
        dtype=Dtype.FP32,
        warmup=1,
        repeats=3,
    )
    base.update(kw)
    return ComputeSettings(**base)  # type: ignore[arg-type]


def _measure(spec: ModelSpec, recompute: Recompute, mb: int = 1, tp: int = 1, **kw: object):
    case = ComputeCase(
        block=BlockKind.TRANSFORMER_BLOCK, tp=tp, micro_batch=mb, recompute=recompute
    )
    return measure_case(spec, case, _settings(**kw), CPU, "cpu")


def test_cases_and_record_structure() -> None:
    torch.set_num_threads(1)
    spec = load_model("tiny-llama")
    settings = _settings(tps=(1, 2))
    cases = compute_cases(spec, settings)
    # transformer block: 2 tp x 3 recompute x 2 mb; embedding and head: 2 tp x 2 mb each
    assert len(cases) == 12 + 8
    batches = list(measure_all(spec, settings, CPU, "cpu"))
    assert len(batches) == len(cases)
    records = [r for b in batches for r in b]
    # embedding and head: one measurement recorded under each of the 3 recompute modes
    assert len(records) == 12 + 8 * 3
    emb = [
        r for r in records if r.block is BlockKind.EMBEDDING and r.tp == 1 and r.micro_batch == 1
    ]
    assert {r.recompute for r in emb} == set(Recompute) and len({r.forward_s for r in emb}) == 1
    for r in records:
        assert r.forward_s > 0 and r.backward_s > 0
        assert r.forward_spread_s >= 0 and r.backward_spread_s >= 0
        assert r.activation_bytes > 0 and r.parameter_bytes > 0
        assert r.repeats == 3 and r.seq_len == SEQ and r.peak_memory_bytes is None
    blocks = {
        (r.tp, r.recompute, r.micro_batch): r
        for r in records
        if r.block is BlockKind.TRANSFORMER_BLOCK
    }
    # TP shards the weights: a tp=2 block holds less than a tp=1 block (norms stay replicated)
    assert (
        blocks[(2, Recompute.NONE, 1)].parameter_bytes
        < blocks[(1, Recompute.NONE, 1)].parameter_bytes
    )
    full_params = spec.param_count().per_block * 4
    assert blocks[(1, Recompute.NONE, 1)].parameter_bytes == full_params


def test_bigger_micro_batch_is_not_faster() -> None:
    # mb 1 vs 8: an 8x larger problem, so scheduler noise on a shared CPU cannot reorder them.
    torch.set_num_threads(1)
    spec = load_model("tiny-gpt")
    small = _measure(spec, Recompute.NONE, mb=1, repeats=9)
    big = _measure(spec, Recompute.NONE, mb=8, repeats=9)
    assert big.forward_s >= small.forward_s
    assert big.backward_s >= small.backward_s
    assert big.activation_bytes == 8 * small.activation_bytes


def test_recompute_reduces_activation_bytes() -> None:
    torch.set_num_threads(1)
    spec = load_model("tiny-gpt")
    none = _measure(spec, Recompute.NONE)
    selective = _measure(spec, Recompute.SELECTIVE)
    full = _measure(spec, Recompute.FULL)
    assert full.activation_bytes < selective.activation_bytes <= none.activation_bytes
    # full recompute keeps exactly the block input: mb * seq * hidden fp32 values
    assert full.activation_bytes == 1 * SEQ * spec.hidden * 4


def _korthikanti_table2_bytes(spec: ModelSpec, mb: int, dtype_bytes: int) -> float:
    """Korthikanti et al. 2022 Table 2, no parallelism, 2-byte activations: sbh(34 + 5as/h);
    with SDPA / flash attention no s x s term is stored; fp32 doubles the bytes."""
    s, b, h = SEQ, mb, spec.hidden
    return s * b * h * 34 * dtype_bytes / 2


@pytest.mark.parametrize("tp", [1, 2])
def test_activation_bytes_match_the_cost_model_within_10_percent(tp: int) -> None:
    """Measured saved-tensor bytes vs planner.cost.memory (Table 2 generalised). Known,
    explained differences: the executor has no dropout (the formula adds 2 masks = 2h bytes per
    token for GELU models), LayerNorm keeps mean and rstd (16 bytes/token), SDPA's
    log-sum-exp is in both."""
    torch.set_num_threads(1)
    spec = load_model("tiny-gpt")
    memory = pytest.importorskip("planner.cost.memory")
    for recompute in Recompute:
        rec = _measure(spec, recompute, mb=2, tp=tp, repeats=1, warmup=0)
        analytic = memory.block_activation_bytes(
            spec,
            micro_batch=2,
            seq_len=SEQ,
            tp=tp,
            sequence_parallel=False,
            recompute=recompute.value,
            flash_attention=True,
            dtype=Dtype.FP32,
        )
        ratio = rec.activation_bytes / analytic
        assert 0.9 <= ratio <= 1.1, (recompute, tp, rec.activation_bytes, analytic, ratio)


def test_activation_bytes_match_table2_within_10_percent() -> None:
    torch.set_num_threads(1)
    spec = load_model("tiny-gpt")
    rec = _measure(spec, Recompute.NONE, mb=2, repeats=1, warmup=0)
    ratio = rec.activation_bytes / _korthikanti_table2_bytes(spec, 2, 4)
    # 64.5 sbh measured vs 68 sbh: no dropout masks (-2 sbh x 2), LN statistics and the
    # log-sum-exp (+0.5 sbh at h=64)
    assert 0.9 <= ratio <= 1.0


@pytest.mark.gpu
def test_gpu_compute_uses_cuda_events_and_records_peak_memory() -> None:
    spec = load_model("tiny-llama")
    device = torch.device("cuda:0")
    settings = _settings(dtype=Dtype.BF16, tps=(1, 2))
    records = [
        r for b in measure_all(spec, settings, device, torch.cuda.get_device_name(0)) for r in b
    ]
    assert records and all(
        r.peak_memory_bytes is not None and r.peak_memory_bytes > 0 for r in records
    )
    by = {(r.block, r.tp, r.recompute, r.micro_batch): r for r in records}
    blk = BlockKind.TRANSFORMER_BLOCK
    assert (
        by[(blk, 1, Recompute.FULL, 1)].activation_bytes
        < by[(blk, 1, Recompute.NONE, 1)].activation_bytes
    )


def test_budget_stops_compute_between_cases() -> None:
    torch.set_num_threads(1)
    spec = load_model("tiny-gpt")
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    batches = list(
        measure_all(spec, _settings(repeats=1, warmup=0), CPU, "cpu", should_stop=should_stop)
    )
    assert len(batches) == 2
