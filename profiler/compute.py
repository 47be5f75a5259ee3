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

Mixture-of-Experts models: the `transformer_block` record is the executor's MoE block (the
first MoE layer's, also for models whose first blocks are dense) with all E experts on the
device (ep = 1) and balanced routing (`ep.MoeParallel.balanced_routing`): every expert runs
T*k/E rows (T = micro_batch * seq_len tokens), the shapes a plan's balanced step has and the
same expert FLOPs per rank as at any ep (there an ep rank runs T*k rows over E/ep experts).
A random router would give a random imbalance instead. The all-to-all is not in the block
(priced from link measurements, like TP collectives).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

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


def profiled_layer(spec: ModelSpec) -> int:
    """The block index whose block is timed: an MoE model's first MoE block, else block 0."""
    moe = spec.moe
    return next(i for i in range(spec.layers) if moe.is_moe_layer(i)) if moe is not None else 0


def _balance_routing(module: nn.Module) -> None:
    from executor.ep import MoeParallel
    from executor.moe import moe_modules

    for moe in moe_modules(module):
        par = moe.parallel if isinstance(moe.parallel, MoeParallel) else MoeParallel.single()
        moe.parallel = replace(par, balanced_routing=True)


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
            module = model.TransformerBlock(shard, profiled_layer(spec))
    module = module.to(dtype=dev.TORCH_DTYPES[dtype])
    if case.block is BlockKind.TRANSFORMER_BLOCK:
        _balance_routing(module)
        module = _apply_recompute(module, case.recompute)
    return module.train()


def build_tp_block(
    spec: ModelSpec, case: ComputeCase, device: torch.device, dtype: Dtype, tp_mesh: object
) -> nn.Module:
    """The executor's block at full shapes, sharded over `tp_mesh` by the executor's own
    `apply_tp` (DTensor, its collectives included), as one chunk of a `Transformer` holding
    only this part; it takes and returns plain tensors (the head returns vocab-sharded
    DTensor logits, whose loss runs under `loss_parallel`)."""
    from executor import model
    from executor.ep import apply_ep
    from executor.tp import apply_tp

    with torch.device("meta"):
        full = model.Transformer(spec, tie_embeddings=False)
    if case.block is not BlockKind.EMBEDDING:
        full.embed = None
    if case.block is not BlockKind.HEAD_AND_LOSS:
        full.head = None
    layer = str(profiled_layer(spec))
    for key in list(full.layers.keys()):
        if case.block is not BlockKind.TRANSFORMER_BLOCK or key != layer:
            del full.layers[key]
    apply_tp(full, tp_mesh, sequence_parallel=False)  # type: ignore[arg-type]
    if spec.moe is not None:
        apply_ep(
            full,
            ep=1,
            ep_mesh=None,
            tp=case.tp,
            tp_mesh=tp_mesh,  # type: ignore[arg-type]
            expert_mesh=tp_mesh,  # type: ignore[arg-type]
            sequence_parallel=False,
        )
        _balance_routing(full)
    full.to_empty(device=device)
    model.init_weights(full, 0)
    full = full.to(dtype=dev.TORCH_DTYPES[dtype])
    part: nn.Module
    if case.block is BlockKind.EMBEDDING:
        part = full.embed  # type: ignore[assignment]
    elif case.block is BlockKind.HEAD_AND_LOSS:
        part = full.head  # type: ignore[assignment]
    else:
        part = _apply_recompute(full.layers[layer], case.recompute)
    return part.train()


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
        tp_as_run: bool = False,
    ) -> None:
        self.case, self.module = case, module
        # under the executor's TP the block takes the full hidden and the full vocab of ids
        shard = spec if tp_as_run else spec.tp_shard(case.tp)
        self.context = _loss_context(case.tp if tp_as_run else 1, case.block)
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
        with self.context():
            out = self.module(self.input)
            if self.loss_fn is not None:
                out = self.loss_fn(out, self.targets)
        self.out = out

    def backward(self) -> None:
        assert self.out is not None
        with self.context():
            if self.loss_fn is not None:
                self.out.backward()
            else:
                if self.grad_out is None:
                    self.grad_out = torch.randn_like(self.out)
                self.out.backward(self.grad_out)
        self.out = None
        if self.input.is_floating_point():
            self.input.grad = None


def _loss_context(tp: int, block: BlockKind) -> Callable[[], Any]:
    """The executor's loss_parallel around the head's forward and backward under TP."""
    from executor.tp import loss_context

    if block is BlockKind.HEAD_AND_LOSS:
        return lambda: loss_context(tp)
    return contextlib.nullcontext


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
    tp_mesh: object | None = None,
) -> ComputeRecord:
    """Time one case: `warmup` untimed steps, then `repeats` timed forward and backward calls.
    With `tp_mesh` (tp > 1) the timed block is the executor's DTensor TP block over that mesh,
    its TP collectives included (`ComputeRecord.tp_collectives_included`); the saved bytes are
    counted on the plain sharded block either way (saved-tensor hooks see plain tensors)."""
    module = build_block(spec, case, device, settings.dtype)
    step = _Step(spec, case, module, device, settings.dtype, settings.seq_len)
    as_run = tp_mesh is not None and case.tp > 1
    timed = step
    if as_run:
        tp_module = build_tp_block(spec, case, device, settings.dtype, tp_mesh)
        timed = _Step(spec, case, tp_module, device, settings.dtype, settings.seq_len, True)
    for _ in range(settings.warmup):
        timed.forward()
        timed.backward()
    fwd, bwd = [], []
    for _ in range(settings.repeats):
        fwd.append(dev.time_region(device, timed.forward))
        bwd.append(dev.time_region(device, timed.backward))
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
        tp_collectives_included=True if as_run else None,
    )


def measure_all(
    spec: ModelSpec,
    settings: ComputeSettings,
    device: torch.device,
    device_name: str,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    tp_meshes: dict[int, object] | None = None,
) -> Iterator[tuple[ComputeRecord, ...]]:
    """Yield the records of one case at a time; stops early when `should_stop()` says the budget
    is spent.

    The executor checkpoints transformer blocks only (apply_ac), so the embedding and the head
    run the same under every recompute mode: their one measurement is recorded under each
    requested mode, which lets the planner look any mode up directly.
    A case that runs out of device memory is skipped with a warning (the planner treats a
    missing size as not measured), never recorded with made-up numbers.
    """
    meshes = tp_meshes or {}
    for case in compute_cases(spec, settings):
        if should_stop():
            return
        try:
            record = measure_case(spec, case, settings, device, device_name, meshes.get(case.tp))
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
