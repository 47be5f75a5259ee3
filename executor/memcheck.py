"""`meshplan memcheck`: a plan's peak memory per pipeline rank, measured by running the executor's
own construction and training step on fake tensors at the plan's real model size on this CPU.

Owns: which tensors of a rank are what (`known_tensors`), one measured run of one rank
(`measure_rank`), layer and micro-batch reduction with linear extrapolation (`measure_stage`),
and the report against prediction and capacity (`MemcheckReport`, `run_memcheck`).
Does not own: the fake environment, its CUDA shims and the storage tracker (fake_dist.py), or
the executor's construction and step (parallelize.py, train.py), which run unchanged.

What is counted: every tensor storage the rank holds, as the plan's GPU would hold it (CUDA
blocks rounded up to 512 bytes, like `torch.cuda.max_memory_allocated`; exact bytes on CPU
workers). Not counted: kernels' internal workspaces, the CUDA context, NCCL buffers and
allocator slack; the report adds the planner's reserve for those before comparing with
capacity.

Peaks: the last of `steps` training steps is measured (the first allocates the optimizer state
and FSDP's buffers lazily). With pp = 1 only min(m, 3) micro-batches run: the first, one middle
and the last differ (gradient allocation, accumulation, synchronisation); the middle ones repeat
exactly. With pp > 1 see `_micro_batch_points`.

Mixture-of-Experts plans run with balanced routing (`balance_routing`): every expert gets
T*k/E rows and every all-to-all moves equal shares, since fake tensors carry no router values.
Models whose blocks are not all MoE blocks run at their real depth (no layer extrapolation).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed.fsdp import FSDPModule

from executor.ep import MoeParallel
from executor.fake_dist import (
    Kind,
    Label,
    MetaKeepingFakeMode,
    StepLabeler,
    StorageTracker,
    build_optimizers,
    cuda_kernels,
    emulated_runtime,
    fake_world,
    stage_rank,
    static_pipeline_metadata,
    targets_cuda,
)
from executor.mesh import build_mesh
from executor.moe import moe_modules
from executor.parallelize import ParallelModel, parallelize
from executor.pp import local_chunks
from executor.train import _local_step
from planner.cost import memory
from planner.errors import ConfigError, SpecError
from planner.plan import Plan, build_plan

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator's smallest block (CUDACachingAllocator.cpp)
PP1_MICRO_BATCHES = 3  # first, a middle and the last micro-batch: the rest repeat a middle one
LAYER_STEP = 2  # layer reduction runs k and 2k blocks per chunk
MIN_STEPS = 2  # one step to warm up lazy state, one to measure


def _pipeline_stages(model: ParallelModel) -> list[Any]:
    s = model.schedule
    if s is None:
        return []
    return list(getattr(s, "_stages", None) or [s._stage])


def known_tensors(
    model: ParallelModel, optimizers: list[torch.optim.Optimizer]
) -> list[tuple[torch.Tensor, Kind]]:
    """The rank's tensors whose kind is known by identity, first match winning."""
    out: list[tuple[torch.Tensor, Kind]] = []

    def mark(t: Any, kind: Kind) -> None:
        if isinstance(t, torch.Tensor):
            out.append((t, kind))

    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                mark(value, Kind.OPTIMIZER)
    for module in model.modules:
        for m in module.modules():
            group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
            for fp in group.fsdp_params if group is not None else ():
                mark(fp.sharded_param.grad, Kind.GRADIENTS)
                mark(fp.sharded_param, Kind.PARAMETERS)
                unsharded = getattr(fp, "_unsharded_param", None)
                mark(getattr(unsharded, "grad", None), Kind.GRADIENTS)
                mark(getattr(fp, "unsharded_accumulated_grad", None), Kind.GRADIENTS)
                mark(unsharded, Kind.GATHERED)
                for t in getattr(fp, "all_gather_outputs", ()):
                    mark(t, Kind.GATHERED)
        for p in module.parameters():
            mark(p.grad, Kind.GRADIENTS)
            mark(p, Kind.PARAMETERS)
    for stage in _pipeline_stages(model):
        for infos in (*stage.args_recv_info.values(), *stage.grad_recv_info.values()):
            for info in infos:
                mark(info.buffer, Kind.PIPELINE)
    return out


def _kind_map(tensors: list[tuple[torch.Tensor, Kind]]) -> dict[int, Kind]:
    kinds: dict[int, Kind] = {}
    for t, kind in tensors:
        for st in get_untyped_storages(t):
            kinds.setdefault(id(st), kind)
    return kinds


@dataclass(frozen=True, kw_only=True)
class RunMeasurement:
    """The measured step of one rank: each label's peak (bytes, bytes by kind)."""

    peaks: dict[Label, tuple[int, dict[str, int]]]
    micro_batches_run: int
    notes: tuple[str, ...]

    @property
    def peak(self) -> tuple[int, dict[str, int]]:
        return max(self.peaks.values(), key=lambda p: p[0])


def _step(
    model: ParallelModel,
    optimizers: list[torch.optim.Optimizer],
    batch: tuple[torch.Tensor, torch.Tensor, int],
    plan: Plan,
    rt: Any,
    labeler: StepLabeler,
) -> None:
    """train.py's step body: zero_grad, `_local_step`, AdamW. Its loss and peak-memory
    all-reduces are left out: they read values (`float`) that fake tensors do not have."""
    inputs, targets, m = batch
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    kernels = cuda_kernels() if rt.target_cuda else contextlib.nullcontext()
    with kernels:
        _local_step(model, inputs, targets, m, plan.config.tp, plan.config.zero, rt)
    labeler.in_optimizer = True
    for opt in optimizers:
        opt.step()
    labeler.in_optimizer = False


def _batch(plan: Plan, model: ParallelModel) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This dp rank's whole local batch (as train.py holds it) and the micro-batches to run."""
    cfg, t = plan.config, plan.training
    rows = t.global_batch // cfg.dp
    inputs = torch.randint(plan.model.vocab, (rows, t.seq_len))
    targets = torch.randint(plan.model.vocab, (rows, t.seq_len))
    if model.schedule is not None:
        return inputs, targets, plan.num_micro_batches
    m = min(plan.num_micro_batches, PP1_MICRO_BATCHES)
    # Views: the full batch stays allocated, as in train.py.
    return inputs[: m * cfg.micro_batch], targets[: m * cfg.micro_batch], m


def measure_rank(
    plan: Plan,
    pp_rank: int,
    *,
    steps: int,
    fake: bool = True,
    around_measured: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> RunMeasurement:
    """Build pipeline rank `pp_rank` (at dp = tp = 0) with the executor, run `steps` steps and
    return the last one's peak. `fake=False` allocates real tensors (small plans, tests);
    `around_measured` wraps the measured step (a profiler, in tests). Run it in a process of its
    own (`run_memcheck` does): DTensor caches device meshes by layout, not by process group, so
    a later process group in the same process would reuse stale groups."""
    if steps < MIN_STEPS:
        raise SpecError(f"--steps {steps}: must be >= {MIN_STEPS} (one warm-up, one measured)")
    rt = emulated_runtime(plan, pp_rank)
    block = CUDA_BLOCK_BYTES if rt.target_cuda else 1
    with fake_world(plan, stage_rank(plan, pp_rank)):
        mesh = build_mesh(plan, "cpu")  # outside fake mode: DeviceMesh indexes real tensors
        with MetaKeepingFakeMode() if fake else contextlib.nullcontext():
            torch.manual_seed(0)
            model = parallelize(plan, mesh, rt, seed=0)
            balance_routing(model)
            static_pipeline_metadata(model, plan, rt)
            optimizers, notes = build_optimizers(model, rt.target_cuda)
            batch = _batch(plan, model)

            def known() -> dict[int, Kind]:
                return _kind_map(known_tensors(model, optimizers))

            window = 1 if model.schedule is None else schedule_window(plan)
            labeler = StepLabeler(model, batch[2], window)
            tracker = StorageTracker(
                known=known,
                label=labeler,
                optimizing=lambda: labeler.in_optimizer,
                block_bytes=block,
                fake=fake,
            )
            for _ in range(steps - 1):
                _step(model, optimizers, batch, plan, rt, labeler)
            for t, _kind in known_tensors(model, optimizers):
                tracker.add(t)
            for t in batch[:2]:
                tracker.add(t, Kind.TEMPORARIES)
            outer = around_measured() if around_measured else contextlib.nullcontext()
            with outer, labeler, tracker:
                _step(model, optimizers, batch, plan, rt, labeler)
    return RunMeasurement(
        peaks={
            label: (total, {k.value: v for k, v in kinds.items()})
            for label, (total, kinds) in tracker.peaks.items()
        },
        micro_batches_run=batch[2],
        notes=notes,
    )


def balance_routing(model: ParallelModel) -> None:
    """Size every MoE block's expert batches and all-to-all exchanges as for perfectly even
    routing (T*k/E rows per expert): fake tensors have no router values to count, and the fake
    process group answers the count exchange with nothing. The peak is then the balanced
    routing's; an imbalanced step holds more rows on its busiest expert's rank."""
    for module in model.modules:
        for moe in moe_modules(module):
            if isinstance(moe.parallel, MoeParallel):
                moe.parallel = replace(moe.parallel, balanced_routing=True)


def _variant(plan: Plan, pp_rank: int, counts: dict[int, int] | None, m: int) -> Plan:
    """The plan with chunk k of `pp_rank` holding counts[k] blocks (every other chunk one:
    other ranks' chunks are not built here) and `m` micro-batches per step."""
    if counts is None and m == plan.num_micro_batches:
        return plan
    config, model = plan.config, plan.model
    if counts is not None:
        layers = tuple(counts.get(s.chunk, 1) if s.pp_rank == pp_rank else 1 for s in plan.stages)
        model = replace(model, layers=sum(layers))
        config = replace(config, stage_layers=layers)
    batch = m * config.micro_batch * config.dp
    return build_plan(
        model=model,
        training=replace(plan.training, global_batch=batch),
        cluster=plan.cluster,
        config=config,
        prediction={},
        source=plan.provenance.source,
    )


@dataclass(frozen=True, kw_only=True)
class StageMeasurement:
    """A pipeline rank's measured peak at its real depth and micro-batch count, and how."""

    peak_bytes: int
    by_kind_bytes: dict[str, int]
    layers: int
    extrapolated_from_layers: tuple[int, int] | None
    extrapolated_from_micro_batches: tuple[int, int] | None
    micro_batches_run: int
    runs: int
    wall_s: float
    notes: tuple[str, ...]


Vector = dict[str, float]


def _vectors(r: RunMeasurement) -> dict[Label, Vector]:
    return {
        label: {"total": float(total), **{k: float(v) for k, v in kinds.items()}}
        for label, (total, kinds) in r.peaks.items()
    }


def _linear(
    base: dict[Label, Vector], steps: list[tuple[dict[Label, Vector], float]]
) -> dict[Label, Vector]:
    """Per label present in every run: base + sum of (v - base) * factor, per key (a linear
    model through the measured points)."""
    labels = set(base).intersection(*(set(v) for v, _ in steps))
    return {
        label: {k: b + sum((v[label][k] - b) * f for v, f in steps) for k, b in base[label].items()}
        for label in labels
    }


def _layer_plan(counts: dict[int, int], exact: bool) -> tuple[dict[int, int], list[Any]] | None:
    """Base chunk depths and (direction, factor) pairs for layer extrapolation, or None to run
    the real depths: one direction when the rank's chunks are equally deep, one per chunk
    otherwise (interleaved chunks differ in micro-batches in flight, hence in slope)."""
    k = LAYER_STEP
    if exact or max(counts.values()) <= 2 * k:
        return None
    base = dict.fromkeys(counts, k)
    if len(set(counts.values())) == 1:
        n = next(iter(counts.values()))
        return base, [(dict.fromkeys(counts, 2 * k), (n - k) / k)]
    return base, [(base | {c: 2 * k}, (n - k) / k) for c, n in counts.items()]


def schedule_window(plan: Plan) -> int:
    """Passes per chunk that a pipeline schedule's warm-up (or cool-down) spans: pp for 1F1B and
    GPipe, pp * v for interleaved (rank 0 runs (v-1)*pp + 2*(pp-1) chunk-forwards before its
    first backward, torch's ScheduleInterleaved1F1B)."""
    return plan.config.pp * plan.config.virtual_stages


def _micro_batch_points(plan: Plan, exact: bool) -> tuple[int, ...]:
    """With pp > 1 a rank's memory is linear in the micro-batch count once the schedule has a
    steady state between warm-up and cool-down: the pipeline keeps one receive buffer per
    micro-batch, and the last stage every micro-batch's output until the step ends. So runs
    use 2w and 2w + pp micro-batches (w = `schedule_window`) and extrapolate. With pp = 1,
    `_batch` runs 3 micro-batches, exactly."""
    m, pp, w = plan.num_micro_batches, plan.config.pp, schedule_window(plan)
    if exact or pp == 1 or m <= 2 * w + pp:
        return (m,)
    return (2 * w, 2 * w + pp)


def _row(
    plan: Plan, pp_rank: int, m: int, layered: Any, steps: int
) -> tuple[dict[Label, Vector], list[RunMeasurement]]:
    """Every label's peak at the plan's depth with `m` micro-batches, and the runs behind it."""
    if layered is None:
        run = measure_rank(_variant(plan, pp_rank, None, m), pp_rank, steps=steps)
        return _vectors(run), [run]
    base_counts, directions = layered
    runs = [measure_rank(_variant(plan, pp_rank, base_counts, m), pp_rank, steps=steps)]
    for direction, _ in directions:
        runs.append(measure_rank(_variant(plan, pp_rank, direction, m), pp_rank, steps=steps))
    factors = [f for _, f in directions]
    return _linear(
        _vectors(runs[0]), [(_vectors(r), f) for r, f in zip(runs[1:], factors, strict=True)]
    ), runs


def measure_stage(plan: Plan, pp_rank: int, *, steps: int, exact: bool) -> StageMeasurement:
    """Pipeline rank `pp_rank`'s peak at the plan's depth and micro-batch count. Unless `exact`,
    runs k and 2k blocks per chunk (when a chunk has more than 2k) and, with pp > 1, two
    micro-batch counts (`_micro_batch_points`), extrapolates every label's peak
    linearly in both (bilinearly: GPipe's activations grow with depth x micro-batches) and
    takes the largest."""
    t0 = time.perf_counter()
    counts = {s.chunk: s.end_layer - s.first_layer for s in local_chunks(plan, pp_rank)}
    # Fewer blocks would change which of them are MoE blocks unless every block is one.
    mixed = plan.model.moe is not None and not plan.model.moe.uniform
    layered = _layer_plan(counts, exact or mixed)
    points = _micro_batch_points(plan, exact)
    rows, runs = [], []
    for m in points:
        row, row_runs = _row(plan, pp_rank, m, layered, steps)
        rows.append(row)
        runs.extend(row_runs)
    result = rows[0]
    if len(points) == 2:
        m1, m2 = points
        result = _linear(rows[0], [(rows[1], (plan.num_micro_batches - m1) / (m2 - m1))])
    top = max(result.values(), key=lambda v: v["total"])
    depths = None
    if layered is not None:
        base_counts, directions = layered
        depths = (sum(base_counts.values()), max(sum(d.values()) for d, _ in directions))
    return StageMeasurement(
        peak_bytes=round(top["total"]),
        by_kind_bytes={key: round(x) for key, x in top.items() if key != "total"},
        layers=sum(counts.values()),
        extrapolated_from_layers=depths,
        extrapolated_from_micro_batches=(points[0], points[-1]) if len(points) == 2 else None,
        micro_batches_run=runs[0].micro_batches_run,
        runs=len(runs),
        wall_s=time.perf_counter() - t0,
        notes=tuple(dict.fromkeys(n for r in runs for n in r.notes)),
    )


@dataclass(frozen=True, kw_only=True)
class StageMemory:
    """One pipeline rank: measured beside predicted, and whether it fits its GPUs."""

    pp_rank: int
    measured: StageMeasurement
    reserve_bytes: int
    capacity_bytes: int
    predicted_bytes: float | None
    predicted_by_kind_bytes: dict[str, float] | None

    @property
    def required_bytes(self) -> int:
        return self.measured.peak_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.required_bytes <= self.capacity_bytes

    def to_json(self) -> dict[str, Any]:
        m = self.measured
        predicted = self.predicted_bytes
        return {
            "pp_rank": self.pp_rank,
            "layers": m.layers,
            "measured_bytes": m.peak_bytes,
            "by_kind": dict(m.by_kind_bytes),
            "reserve_bytes": self.reserve_bytes,
            "required_bytes": self.required_bytes,
            "capacity_bytes": self.capacity_bytes,
            "fits": self.fits,
            "predicted_bytes": predicted,
            "predicted_by_kind": self.predicted_by_kind_bytes,
            "error_fraction": None if not predicted else self.required_bytes / predicted - 1.0,
            "method": method_text(m),
            "extrapolated_from_layers": _listed(m.extrapolated_from_layers),
            "extrapolated_from_micro_batches": _listed(m.extrapolated_from_micro_batches),
            "micro_batches_run": m.micro_batches_run,
            "runs": m.runs,
            "wall_s": m.wall_s,
        }


def _listed(pair: tuple[int, int] | None) -> list[int] | None:
    return None if pair is None else list(pair)


def method_text(m: StageMeasurement) -> str:
    parts = []
    if m.extrapolated_from_layers is not None:
        a, b = m.extrapolated_from_layers
        parts.append(f"layers extrapolated from {a} and {b} to {m.layers}")
    else:
        parts.append(f"{m.layers} layers")
    if m.extrapolated_from_micro_batches is not None:
        a, b = m.extrapolated_from_micro_batches
        parts.append(f"micro-batches extrapolated from {a} and {b}")
    else:
        parts.append(f"{m.micro_batches_run} micro-batches run")
    return f"{', '.join(parts)} ({m.runs} run{'s' if m.runs > 1 else ''})"


RESERVE_TEXT = (
    "required = measured tensor peak + the planner's non-tensor reserve "
    "(planner/cost/memory.py): FRAMEWORK_RESERVE_BYTES on GPUs (CUDA context, cuBLAS "
    "workspaces, NCCL buffers: outside the caching allocator, invisible to tensor tracking) or "
    "CPU_WORKER_RESERVE_BYTES on CPU workers, plus ALLOCATOR_FRAGMENTATION of the measured "
    "activations (caching-allocator slack), the same terms the planner adds"
)


@dataclass(frozen=True, kw_only=True)
class MemcheckReport:
    plan: dict[str, Any]  # what was measured: model, layout, micro-batches
    stages: tuple[StageMemory, ...]
    notes: tuple[str, ...]
    wall_s: float

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "stages": [s.to_json() for s in self.stages],
            "fits": self.fits,
            "wall_s": self.wall_s,
            "reserve": RESERVE_TEXT,
            "notes": list(self.notes),
        }


def _rank_gpus(plan: Plan, pp_rank: int) -> Iterator[Any]:
    return (plan.cluster.nodes[e.node].gpu for e in plan.ranks if e.pp == pp_rank)


def _predicted(plan: Plan, pp_rank: int) -> tuple[float | None, dict[str, float] | None]:
    for s in plan.prediction.get("stages", []) if isinstance(plan.prediction, dict) else []:
        if isinstance(s, dict) and s.get("pp_rank") == pp_rank:
            return s.get("memory_bytes"), s.get("memory")
    return None, None


def stage_memory(plan: Plan, pp_rank: int, measured: StageMeasurement) -> StageMemory:
    cuda = targets_cuda(plan, pp_rank)
    framework = memory.FRAMEWORK_RESERVE_BYTES if cuda else memory.CPU_WORKER_RESERVE_BYTES
    activations = measured.by_kind_bytes.get(Kind.ACTIVATIONS.value, 0)
    reserve = round(framework + memory.ALLOCATOR_FRAGMENTATION * activations)
    predicted, by_kind = _predicted(plan, pp_rank)
    return StageMemory(
        pp_rank=pp_rank,
        measured=measured,
        reserve_bytes=reserve,
        capacity_bytes=min(g.capacity_bytes for g in _rank_gpus(plan, pp_rank)),
        predicted_bytes=predicted,
        predicted_by_kind_bytes=by_kind,
    )


def _worker_init() -> None:
    # Fake tensors compute nothing; one thread keeps parallel jobs off each other's cores.
    torch.set_num_threads(1)


def run_memcheck(
    plan: Plan,
    *,
    steps: int = MIN_STEPS,
    exact: bool = False,
    pp_ranks: tuple[int, ...] | None = None,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> MemcheckReport:
    """Measure every pipeline rank of `plan` (or `pp_ranks`), each in a fresh spawned process
    (`jobs` at a time), and compare with the plan's prediction."""
    ranks = tuple(range(plan.config.pp)) if pp_ranks is None else pp_ranks
    for r in ranks:
        if not 0 <= r < plan.config.pp:
            raise ConfigError(f"pipeline rank {r} is outside the plan's 0..{plan.config.pp - 1}")
    if steps < MIN_STEPS:
        raise SpecError(f"--steps {steps}: must be >= {MIN_STEPS} (one warm-up, one measured)")
    if jobs < 1:
        raise SpecError(f"--jobs {jobs}: must be a positive integer")
    t0 = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(ranks)),
        mp_context=context,
        initializer=_worker_init,
        max_tasks_per_child=1,
    ) as pool:
        futures = [pool.submit(measure_stage, plan, r, steps=steps, exact=exact) for r in ranks]
        stages = []
        for r, future in zip(ranks, futures, strict=True):
            measured = future.result()
            stages.append(stage_memory(plan, r, measured))
            if progress is not None:
                progress(f"pp rank {r}: {method_text(measured)}, {measured.wall_s:.1f} s")
    notes = dict.fromkeys(n for s in stages for n in s.measured.notes)
    cfg = plan.config
    summary = {
        "model": plan.model.name,
        "config": {name: getattr(cfg, name) for name in cfg.__dataclass_fields__},
        "num_micro_batches": plan.num_micro_batches,
        "dtype": plan.training.dtype.value,
    }
    return MemcheckReport(
        plan=summary,
        stages=tuple(stages),
        notes=tuple(notes),
        wall_s=time.perf_counter() - t0,
    )
