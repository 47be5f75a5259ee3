"""One rank of a plan on this CPU, without the plan's hardware: the executor's own code on fake
tensors under a fake process group, CUDA behaviour emulated where CPU kernels would use
different memory, and a tracker of the storages the rank's GPU would hold.

Owns: the fake-tensor mode (`MetaKeepingFakeMode`), the fake process group (`fake_world`), the
emulated runtime and CUDA kernel shims (`EmulatedRuntime`, `cuda_kernels`), the optimizers as
train.py builds them on the plan's device (`build_optimizers`), the pipeline metadata shim
(`static_pipeline_metadata`), the storage tracker (`StorageTracker`, `Kind`) and the labels
of where a step is that it keeps a peak for (`StepLabeler`).
Does not own: which runs to make and what they mean (memcheck.py), or anything the executor
decides (parallelize.py, train.py): those run unchanged.

Shims, each because one process cannot be the plan's hardware:
- a FakeTensorMode that leaves meta tensors meta and real tensors real: parallelize.py builds the
  model on meta and then `to_empty`s it; a plain FakeTensorMode turns the meta parameters into
  fake ones whose weak references make `to_empty`'s `swap_tensors` fail (torch 2.13), and it
  would fake the device mesh's bookkeeping tensors (`nonzero` cannot run on fake tensors);
- CUDA autocast on CPU: `torch.autocast("cpu")` casts the same matmul/attention ops to bf16 and
  caches weight casts the same way, but CUDA's autocast also runs layer_norm and rms_norm in
  fp32 (AutocastCUDA kernels, see `torch._C._dispatch_has_kernel_for_dispatch_key`), which CPU
  autocast does not;
- CUDA's fused rms_norm (aten::_fused_rms_norm keeps input and rstd for backward) where the CPU
  decomposes it and also keeps x * rstd, a full activation per norm;
- AdamW's foreach implementation, which torch picks by default on CUDA and never on CPU;
- the pipeline's metadata exchange: `torch.distributed.pipelining` sends tensor shapes between
  stages with `recv_object_list`, which a fake process group cannot answer, so each local stage
  is given the metadata its neighbour would send (and torch validates it at run time).
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mod_tracker import ModTracker
from torch.distributed.pipelining._utils import InferenceMode, _StageMeta, _TensorMeta
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from executor.device import _TORCH_DTYPE, Runtime
from executor.parallelize import ParallelModel
from executor.train import ADAM_BETAS, WEIGHT_DECAY, TrainOptions
from planner.errors import ConfigError
from planner.plan import Plan
from planner.specs import DeviceKind


class MetaKeepingFakeMode(FakeTensorMode):
    """Fake tensors for everything the executor allocates on its device; ops whose tensor
    inputs are all real (or all meta, with no device asked for) run for real, so meta
    construction stays meta and the device mesh's small index tensors stay concrete."""

    def __init__(self) -> None:
        # Real inputs reach here from the device mesh, built before the mode is entered.
        super().__init__(allow_non_fake_inputs=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device = kwargs.get("device")
        to_meta = device is not None and torch.device(device).type == "meta"
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            if to_meta or device is None or not any(t.is_meta for t in tensors):
                return func(*args, **kwargs)
        elif not tensors and to_meta:
            return func(*args, **kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)


def stage_rank(plan: Plan, pp_rank: int) -> int:
    """The mesh rank of pipeline rank `pp_rank` at dp = tp = 0 (its dp/tp peers are symmetric)."""
    return next(e.rank for e in plan.ranks if (e.pp, e.dp, e.tp) == (pp_rank, 0, 0))


def targets_cuda(plan: Plan, pp_rank: int) -> bool:
    """Whether pipeline rank `pp_rank` runs on GPUs (CUDA kernels and autocast) or CPU workers."""
    nodes = {e.node for e in plan.ranks if e.pp == pp_rank}
    return any(plan.cluster.nodes[n].gpu.kind is not DeviceKind.CPU for n in nodes)


@contextlib.contextmanager
def fake_world(plan: Plan, rank: int) -> Iterator[None]:
    """This process as mesh rank `rank` of the plan's world, under a process group that
    communicates nothing (collectives return at once, leaving their outputs as they were)."""
    if dist.is_initialized():
        raise ConfigError("a process group is already running in this process; run memcheck alone")
    dist.init_process_group("fake", rank=rank, world_size=plan.config.world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True, kw_only=True)
class EmulatedRuntime(Runtime):
    """The runtime `make_runtime` would give on the plan's device, computing on this CPU: the
    plan's dtype (FSDP mixed precision, autocast) on GPUs, fp32 without autocast on CPU workers."""

    target_cuda: bool

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.target_cuda and self.compute_dtype != torch.float32:
            return torch.autocast("cpu", dtype=self.compute_dtype)
        return contextlib.nullcontext()


def emulated_runtime(plan: Plan, pp_rank: int) -> EmulatedRuntime:
    cuda = targets_cuda(plan, pp_rank)
    return EmulatedRuntime(
        device=torch.device("cpu"),
        backend="fake",
        compute_dtype=_TORCH_DTYPE[plan.training.dtype] if cuda else torch.float32,
        target_cuda=cuda,
    )


def _float32(x: Any) -> Any:
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


class _FusedRmsNorm(torch.autograd.Function):
    """rms_norm over the trailing `dims`, keeping what CUDA's fused kernel keeps for backward
    (input, rstd, weight) and allocating no full-size intermediate in forward."""

    @staticmethod
    def forward(ctx, x, weight, dims, eps):  # type: ignore[no-untyped-def]
        n = math.prod(x.shape[d] for d in dims)
        rstd = torch.linalg.vector_norm(x, dim=dims, keepdim=True)
        rstd = rstd.pow_(2).div_(n).add_(eps).rsqrt_()
        y = x * rstd
        if weight is not None:
            y.mul_(weight)
        ctx.save_for_backward(x, rstd, weight)
        ctx.dims, ctx.n = dims, n
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[no-untyped-def]
        # y = x r w with r = (mean(x^2) + eps)^-1/2: dx = g r - x r^3 sum(g x) / n, g = gy w.
        # One full-size temporary at a time besides dx, as few as a decomposition allows.
        x, rstd, weight = ctx.saved_tensors
        dw = None
        if weight is not None and ctx.needs_input_grad[1]:
            lead = tuple(range(x.dim() - len(ctx.dims)))
            dw = (gy * x).mul_(rstd).sum(dim=lead)
        g = gy * weight if weight is not None else gy.clone()
        c = (g * x).sum(dim=ctx.dims, keepdim=True).mul_(rstd.pow(3)).div_(ctx.n)
        dx = g.mul_(rstd).sub_(x * c)
        return dx, dw, None, None


def _fused_rms_norm(x, normalized_shape, weight=None, eps=None):  # type: ignore[no-untyped-def]
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return _FusedRmsNorm.apply(x, weight, dims, eps)


def _cuda_norm(impl: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # The AutocastCUDA fp32 policy: every floating input cast to fp32, fp32 out.
    if torch.is_autocast_enabled("cpu"):
        args = tuple(_float32(a) for a in args)
        kwargs = {k: _float32(v) for k, v in kwargs.items()}
    with torch.autocast("cpu", enabled=False):
        return impl(*args, **kwargs)


@contextlib.contextmanager
def cuda_kernels() -> Iterator[None]:
    """Norms as CUDA runs them: fp32 under autocast, and rms_norm as the fused kernel.
    `F.layer_norm` / `F.rms_norm` are replaced for the duration (nn.LayerNorm and nn.RMSNorm
    call them by attribute) rather than intercepted by a TorchFunctionMode: the autograd
    engine recomputes checkpointed blocks without the caller's torch-function modes."""
    layer_norm, rms_norm = F.layer_norm, F.rms_norm
    F.layer_norm = partial(_cuda_norm, layer_norm)  # type: ignore[assignment]
    F.rms_norm = partial(_cuda_norm, _fused_rms_norm)  # type: ignore[assignment]
    try:
        yield
    finally:
        F.layer_norm, F.rms_norm = layer_norm, rms_norm


def build_optimizers(
    model: ParallelModel, target_cuda: bool
) -> tuple[list[torch.optim.Optimizer], tuple[str, ...]]:
    """train.py's AdamW per chunk, with the implementation torch picks on the plan's device:
    foreach on CUDA (a list-wide temporary per update term), per-tensor on CPU."""
    notes: list[str] = []
    optimizers: list[torch.optim.Optimizer] = []
    for module in model.modules:
        params = list(module.parameters())
        foreach = None
        if target_cuda:
            kinds = {isinstance(p, DTensor) for p in params}
            foreach = len(kinds) == 1
            if not foreach:
                notes.append(
                    "on CUDA torch.optim.AdamW defaults to foreach, which raises 'got mixed "
                    "torch.Tensor and DTensor' for this chunk's parameters (tensor-parallel "
                    "without FSDP leaves norms plain): the executor fails at its first optimizer "
                    "step; memcheck measured the per-tensor step"
                )
        optimizers.append(
            torch.optim.AdamW(
                params,
                lr=TrainOptions().lr,
                betas=ADAM_BETAS,
                weight_decay=WEIGHT_DECAY,
                foreach=foreach,
            )
        )
    return optimizers, tuple(dict.fromkeys(notes))


def _meta(shape: Sequence[int], dtype: torch.dtype, requires_grad: bool) -> _TensorMeta:
    size = torch.Size(shape)
    stride = tuple(math.prod(size[i + 1 :]) for i in range(len(size)))
    return _TensorMeta(shape=size, stride=stride, dtype=dtype, requires_grad=requires_grad)


def static_pipeline_metadata(model: ParallelModel, plan: Plan, rt: Runtime) -> None:
    """Give every local pipeline stage the tensor metadata its neighbours would send, in place
    of the schedule's warm-up exchange. Between stages flows the residual stream
    [micro_batch, seq (/tp with SP), hidden]: in the FSDP parameter dtype with dp > 1
    (dp.py's MixedPrecisionPolicy), else in fp32 (autocast leaves the embedding and the residual
    additions in the parameter dtype). Torch checks every stage's actual inputs and outputs
    against this (`_runtime_validate`), so a wrong guess fails instead of measuring wrongly."""
    schedule = model.schedule
    if schedule is None:
        return
    cfg, spec = plan.config, plan.model
    seq = plan.training.seq_len
    dtype = rt.compute_dtype if cfg.dp_cp > 1 else torch.float32
    hidden = _meta(
        (cfg.micro_batch, seq // (cfg.tp if cfg.sequence_parallel else 1), spec.hidden),
        dtype,
        True,
    )
    tokens = _meta((cfg.micro_batch, seq), torch.int64, False)
    # The last stage's output goes to the loss, not to a peer: only its count is used.
    logits = _meta((cfg.micro_batch, seq, -(-spec.vocab // cfg.tp)), torch.float32, True)

    def warmup(stages: list[Any], has_backward: bool, p2p_done: bool) -> None:
        for stage in stages:
            stage._user_meta = _StageMeta(
                inputs=(tokens if stage.is_first else hidden,),
                outputs=(logits if stage.is_last else hidden,),
            )
            stage._inference_mode = InferenceMode.STATIC
            stage._runtime_validate = True

    schedule._warmup_p2p = warmup  # type: ignore[method-assign]


class Kind(str, Enum):
    """What a live storage is, decided by identity at the peak (the first three and the two
    buffer kinds) or by when it was made (activations in forward, temporaries otherwise)."""

    PARAMETERS = "parameters"  # the rank's own (FSDP: sharded fp32) parameters
    GATHERED = "gathered_parameters"  # FSDP all-gathered (param-dtype) copies
    GRADIENTS = "gradients"
    OPTIMIZER = "optimizer_state"
    ACTIVATIONS = "activations"  # made in forward (incl. autocast weight casts), not freed yet
    PIPELINE = "pipeline_buffers"  # torch.distributed.pipelining recv buffers, one per micro-batch
    TEMPORARIES = "temporaries"  # backward/optimizer temporaries, comm buffers, input batch


@dataclass(kw_only=True)
class _Entry:
    """One live storage (mutable bookkeeping, private to the tracker)."""

    nbytes: int
    made_in_backward: bool
    hint: Kind | None
    ref: weakref.ref


_FSDP_COMM = (
    torch.ops.c10d._allgather_base_.default,
    torch.ops.c10d._reduce_scatter_base_.default,
)


Peak = tuple[int, dict[Kind, int]]  # bytes and bytes by kind


class StorageTracker(TorchDispatchMode):
    """Live storage bytes seen at op boundaries (outputs and first-seen inputs; storages die
    when their last reference does; FSDP's `resize_` is followed) and, per label of where the
    step is (`label()`, e.g. the block and micro-batch running), the highest total with its
    breakdown. `known()` maps storage ids to kinds by identity (parameters, gradients, ...).
    Below DTensor: DTensor ops return NotImplemented here and reach it again as local ops.
    """

    def __init__(
        self,
        *,
        known: Callable[[], dict[int, Kind]],
        label: Callable[[], Hashable],
        optimizing: Callable[[], bool],
        block_bytes: int,
        fake: bool,
    ) -> None:
        super().__init__()
        self._known = known
        self._label = label
        self._optimizing = optimizing
        self._block = block_bytes
        self._fake = fake
        self._live: dict[int, _Entry] = {}
        self._entry_mode: Any = None
        self._muted = 0
        self._patches = contextlib.ExitStack()
        self._orig_resize = torch.UntypedStorage.resize_
        self.total_bytes = 0
        self.peaks: dict[Hashable, Peak] = {}

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self._block) * self._block

    def _drop(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry.ref is ref:
            del self._live[key]
            self.total_bytes -= entry.nbytes

    def add(self, t: torch.Tensor, hint: Kind | None = None, *, override: bool = False) -> None:
        """Track `t`'s storages; `hint` sets the kind of a new storage (of any with `override`)."""
        if self._fake and not isinstance(t, FakeTensor | DTensor):
            return
        for st in get_untyped_storages(t):
            key = id(st)
            if (entry := self._live.get(key)) is not None:
                if override:
                    entry.hint = hint
                continue
            in_bw = torch._C._current_graph_task_id() != -1
            made = hint or (Kind.TEMPORARIES if self._optimizing() else None)
            nbytes = self._rounded(st.nbytes())
            ref = weakref.ref(st, partial(self._drop, key))
            self._live[key] = _Entry(nbytes=nbytes, made_in_backward=in_bw, hint=made, ref=ref)
            self.total_bytes += nbytes

    @property
    def peak_bytes(self) -> int:
        return max((total for total, _ in self.peaks.values()), default=0)

    def _note_peak(self) -> None:
        key = self._label()
        best = self.peaks.get(key)
        if best is None or self.total_bytes > best[0]:
            self.peaks[key] = (self.total_bytes, self._breakdown())

    def _breakdown(self) -> dict[Kind, int]:
        known = self._known()
        out = dict.fromkeys(Kind, 0)
        for key, e in self._live.items():
            kind = known.get(key) or e.hint
            if kind is None:
                kind = Kind.TEMPORARIES if e.made_in_backward else Kind.ACTIVATIONS
            out[kind] += e.nbytes
        return out

    def _resize(self, st: torch.UntypedStorage, size: int) -> Any:
        result = self._orig_resize(st, size)
        entry = self._live.get(id(st))
        if entry is not None:
            nbytes = self._rounded(st.nbytes())
            self.total_bytes += nbytes - entry.nbytes
            entry.nbytes = nbytes
            self._note_peak()
        return result

    @contextlib.contextmanager
    def _muted_sharding_propagation(self) -> Iterator[None]:
        """DTensor computes output metadata by running each op on global-shape tensors in the
        active fake mode (the rank's own, under memcheck): those are not memory anywhere."""
        prop = DTensor._op_dispatcher.sharding_propagator
        inner = prop._propagate_tensor_meta_non_cached

        def muted(op_schema: Any) -> Any:
            self._muted += 1
            try:
                return inner(op_schema)
            finally:
                self._muted -= 1

        prop._propagate_tensor_meta_non_cached = muted  # type: ignore[method-assign]
        try:
            yield
        finally:
            del prop._propagate_tensor_meta_non_cached  # back to the class's method

    def __enter__(self) -> StorageTracker:
        self._entry_mode = active_fake_mode()
        self._patches = contextlib.ExitStack()
        self._patches.enter_context(self._muted_sharding_propagation())

        # resize_ bypasses dispatch; FSDP frees and re-allocates unsharded parameters with it.
        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            return self._resize(st, size)

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign, assignment]
        self._note_peak()
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
        self._patches.close()
        super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if any(t is DTensor for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        if func is torch.ops._c10d_functional.wait_tensor.default and self._fake:
            # The fake kernel of wait_tensor returns a new tensor; eager returns its input.
            out = args[0]
        else:
            out = func(*args, **kwargs)
        if self._muted or active_fake_mode() is not self._entry_mode:
            return out  # DTensor's sharding propagation (see above): not memory
        comm = func in _FSDP_COMM  # FSDP's flat all-gather / reduce-scatter buffers
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                # First seen as an input: it existed before the step (a buffer).
                self.add(t, Kind.TEMPORARIES, override=comm)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        self._note_peak()
        return out


Label = tuple[Any, ...]
_LAYER = re.compile(r"\.layers\.(\d+)(?:\.|$)")


class StepLabeler:
    """Where the step is, as a label that means the same at any depth and micro-batch count:
    (chunk, pass, which pass of that chunk counted from the start or (negative) from the end,
    segment: embedding, first / middle / last block of the chunk, head, or outside modules).
    Within one label every op's memory moves by the same amount when blocks or micro-batches
    are added, so each label's peak is linear in both; a step's peak is the largest label's."""

    def __init__(self, model: ParallelModel, micro_batches: int, window: int) -> None:
        self._roots = {id(module): stage.chunk for stage, module in model.chunks}
        self._blocks: dict[int, tuple[int, str]] = {}
        for stage, _ in model.chunks:
            for i in range(stage.first_layer, stage.end_layer):
                where = "first" if i == stage.first_layer else "middle"
                self._blocks[i] = (stage.chunk, "last" if i == stage.end_layer - 1 else where)
        self._first = model.chunks[0][0].chunk
        self._last = model.chunks[-1][0].chunk
        self._m, self._window = micro_batches, window
        self._started: dict[tuple[int, str], int] = {}
        self._latest: dict[str, int] = {}
        self._mods = ModTracker()
        self.in_optimizer = False

    def __enter__(self) -> StepLabeler:
        self._mods.register_user_hooks(pre_fw_hook=self._pre_fw, pre_bw_hook=self._pre_bw)
        self._mods.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self._mods.__exit__(*args)
        self._mods.clear_user_hooks()

    def _start(self, module: Any, phase: str) -> None:
        chunk = self._roots.get(id(module))
        if chunk is not None:
            self._started[chunk, phase] = self._started.get((chunk, phase), 0) + 1
            self._latest[phase] = chunk

    def _pre_fw(self, module: Any, inputs: Any) -> None:
        if not self._mods.is_bw:
            self._start(module, "forward")

    def _pre_bw(self, module: Any, grads: Any) -> None:
        self._start(module, "backward")

    def _segment(self, backward: bool) -> tuple[int | None, str]:
        parents = self._mods.parents
        layers = [int(x) for p in parents for x in _LAYER.findall(p)]
        if layers:
            # Backward runs blocks in reverse: the lowest active one is the newest.
            chunk, where = self._blocks[min(layers) if backward else max(layers)]
            return chunk, where
        if any(p.endswith(".embed") or ".embed." in p for p in parents):
            return self._first, "embedding"
        if any(p.endswith(".head") or ".head." in p for p in parents):
            return self._last, "head"
        return None, "outside"

    def __call__(self) -> Label:
        if self.in_optimizer:
            return ("optimizer",)
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        chunk, segment = self._segment(phase == "backward")
        if chunk is None:
            chunk = self._latest.get(phase, -1)
        n = self._started.get((chunk, phase), 0) - 1
        # The first and last `window` passes hold the schedule's warm-up and cool-down; the
        # ones between repeat the steady state (and are dropped when a run has none).
        ordinal: int | str = n if n < self._window else n - self._m
        if self._window <= n < self._m - self._window:
            ordinal = "steady"
        return (chunk, phase, ordinal, segment)
