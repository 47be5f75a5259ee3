"""Compute measurement: times the executor's own blocks and counts what they keep for backward.

Owns: building `executor.model.Embedding`, `TransformerBlock` and `HeadAndLoss` at the
tensor-parallel-sharded shapes (`ModelSpec.tp_shard(tp)`) on one device, applying the
executor's activation checkpointing, timing forward and backward (warm-up, repeats, median and
interquartile range), counting activation bytes with saved-tensor hooks, and producing
`planner.profile.ComputeRecord`s.
Does not own: clocks and memory counters (device.py), the order of phases (run.py), fitting time
against micro-batch size (the planner does that when it looks a size up).

What a record means is fixed by planner/profile.py: per call of one block on one device for one
micro-batch; TP collectives are not in the block (they are priced from link measurements);
`backward_s` includes the recompute forward under checkpointing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from planner.errors import SpecError
from planner.parallel import Recompute
from planner.profile import BlockKind, ComputeRecord
from planner.specs import Dtype, ModelSpec
from profiler import device as dev
from profiler.stats import iqr, median

log = logging.getLogger(__name__)

# Recompute changes only transformer blocks; the embedding and the head are measured once.
RECOMPUTE_BLOCKS = (BlockKind.TRANSFORMER_BLOCK,)


@dataclass(frozen=True, kw_only=True)
class ComputeSettings:
    tps: tuple[int, ...]
    micro_batches: tuple[int, ...]
    seq_len: int
    recomputes: tuple[Recompute, ...]
    dtype: Dtype
    warmup: int
    repeats: int


@dataclass(frozen=True, kw_only=True)
class ComputeCase:
    block: BlockKind
    tp: int
    micro_batch: int
    recompute: Recompute


def compute_cases(spec: ModelSpec, settings: ComputeSettings) -> list[ComputeCase]:
    """Every (block, tp, micro-batch, recompute) to measure, tp degrees that do not divide the
    model rejected with the rule they break."""
    if settings.seq_len > spec.max_seq_len:
        raise SpecError(
            f"--seq-len {settings.seq_len} exceeds model '{spec.name}' max_seq_len={spec.max_seq_len}"
        )
    for tp in settings.tps:
        rule = spec.tp_divisible(tp)
        if rule:
            raise SpecError(f"--tp {tp}: model '{spec.name}': {rule}")
    cases = []
    for tp in settings.tps:
        for block in BlockKind:
            # embedding/head: measured once (as recompute=none), recorded under every mode
            modes = settings.recomputes if block in RECOMPUTE_BLOCKS else (Recompute.NONE,)
            for recompute in modes:
                for mb in settings.micro_batches:
                    cases.append(
                        ComputeCase(block=block, tp=tp, micro_batch=mb, recompute=recompute)
                    )
    return cases


def _apply_recompute(block: nn.Module, mode: Recompute) -> nn.Module:
    """The executor's own checkpointing, so what is timed is what will run."""
    from executor.activation_checkpoint import apply_ac

    wrapped = apply_ac(block, mode)
    return block if wrapped is None else wrapped


def build_block(
    spec: ModelSpec, case: ComputeCase, device: torch.device, dtype: Dtype
) -> nn.Module:
    """The executor's block at the shapes one TP rank holds, on `device`, in `dtype`."""
    from executor import model

    shard = spec.tp_shard(case.tp)
    with torch.device(device):
        if case.block is BlockKind.EMBEDDING:
            module: nn.Module = model.Embedding(shard)
        elif case.block is BlockKind.HEAD_AND_LOSS:
            module = model.HeadAndLoss(shard)
        else:
            module = model.TransformerBlock(shard, 0)
    module = module.to(dtype=dev.TORCH_DTYPES[dtype])
    if case.block is BlockKind.TRANSFORMER_BLOCK:
        module = _apply_recompute(module, case.recompute)
    return module.train()


def _loss_fn() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from executor import model

    fn = getattr(model.HeadAndLoss, "loss_fn", None) or model.loss_fn
    return fn


class _Step:
    """One micro-batch through a block: `forward()` then `backward()`; inputs made once."""

    def __init__(
        self,
        spec: ModelSpec,
        case: ComputeCase,
        module: nn.Module,
        device: torch.device,
        dtype: Dtype,
        seq_len: int,
    ) -> None:
        self.case, self.module = case, module
        shard = spec.tp_shard(case.tp)
        mb, seq = case.micro_batch, seq_len
        self.loss_fn = _loss_fn() if case.block is BlockKind.HEAD_AND_LOSS else None
        torch_dtype = dev.TORCH_DTYPES[dtype]
        if case.block is BlockKind.EMBEDDING:
            self.input = torch.randint(0, shard.vocab, (mb, seq), device=device)
        else:
            self.input = torch.randn(
                mb, seq, shard.hidden, device=device, dtype=torch_dtype, requires_grad=True
            )
        self.targets = torch.randint(0, shard.vocab, (mb, seq), device=device)
        self.grad_out: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def forward(self) -> None:
        out = self.module(self.input)
        if self.loss_fn is not None:
            out = self.loss_fn(out, self.targets)
        self.out = out

    def backward(self) -> None:
        assert self.out is not None
        if self.loss_fn is not None:
            self.out.backward()
        else:
            if self.grad_out is None:
                self.grad_out = torch.randn_like(self.out)
            self.out.backward(self.grad_out)
        self.out = None
        if self.input.is_floating_point():
            self.input.grad = None


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def saved_activation_bytes(step: _Step) -> int:
    """Bytes the forward keeps for backward: every tensor autograd saves, de-duplicated by
    storage (views share one), parameters excluded (they are weights, not activations)."""
    params = {_storage_key(p)[0] for p in step.module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage_key(t)
        if ptr not in params and nbytes > 0:
            seen[ptr] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step.forward()
    # Counted while the graph (and so every saved tensor) is alive; then release it.
    total = sum(seen.values())
    step.backward()
    return total


def measure_case(
    spec: ModelSpec,
    case: ComputeCase,
    settings: ComputeSettings,
    device: torch.device,
    device_name: str,
) -> ComputeRecord:
    """Time one case: `warmup` untimed steps, then `repeats` timed forward and backward calls."""
    module = build_block(spec, case, device, settings.dtype)
    step = _Step(spec, case, module, device, settings.dtype, settings.seq_len)
    for _ in range(settings.warmup):
        step.forward()
        step.backward()
    fwd, bwd = [], []
    for _ in range(settings.repeats):
        fwd.append(dev.time_region(device, step.forward))
        bwd.append(dev.time_region(device, step.backward))
    baseline = dev.reset_peak_memory(device)
    activation = saved_activation_bytes(step)
    peak = dev.peak_memory_since(device, baseline)
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    return ComputeRecord(
        block=case.block,
        device_name=device_name,
        tp=case.tp,
        micro_batch=case.micro_batch,
        seq_len=settings.seq_len,
        recompute=case.recompute,
        forward_s=median(fwd),
        forward_spread_s=iqr(fwd),
        backward_s=median(bwd),
        backward_spread_s=iqr(bwd),
        activation_bytes=activation,
        parameter_bytes=params,
        repeats=settings.repeats,
        peak_memory_bytes=peak,
    )


def measure_all(
    spec: ModelSpec,
    settings: ComputeSettings,
    device: torch.device,
    device_name: str,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[ComputeRecord, ...]]:
    """Yield the records of one case at a time; stops early when `should_stop()` says the budget
    is spent.

    The executor checkpoints transformer blocks only (apply_ac), so the embedding and the head
    run the same under every recompute mode: their one measurement is recorded under each
    requested mode, which lets the planner look any mode up directly.
    A case that runs out of device memory is skipped with a warning (the planner treats a
    missing size as not measured), never recorded with made-up numbers.
    """
    for case in compute_cases(spec, settings):
        if should_stop():
            return
        try:
            record = measure_case(spec, case, settings, device, device_name)
        except torch.OutOfMemoryError:
            log.warning(
                "out of memory: %s tp=%d mb=%d recompute=%s skipped",
                case.block.value,
                case.tp,
                case.micro_batch,
                case.recompute.value,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if case.block in RECOMPUTE_BLOCKS:
            yield (record,)
        else:
            yield tuple(replace(record, recompute=mode) for mode in settings.recomputes)
