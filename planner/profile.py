"""The profile format (profile.json, `schema_version` 1): what the profiler measured.

Owns: the typed records (each refuses negative, NaN or infinite numbers), load/save with
schema checks, the content hash and the alpha-beta fit of link samples. Does not own:
measuring (profiler/), merging node profiles (profiler/merge.py), whether a profile describes
the hardware being planned (planner/profile_match.py), or how the cost model uses the
numbers (planner/cost/).

Definitions (the profiler writes to these, the cost model reads by them):
- ComputeRecord times are per call of one block on one device, for one micro-batch, with the
  block built at its tensor-parallel-sharded shapes (`ModelSpec.tp_shard(tp)`); the block's TP
  collectives are *not* included (they are priced from the link measurements), except in a
  record with `tp_collectives_included`, timed under the executor's DTensor TP.
  `backward_s` includes the recompute forward when `recompute` is not none, since that is what
  backward costs under checkpointing. `activation_bytes` is what the block keeps for backward
  (saved-tensor hooks, de-duplicated by storage), `parameter_bytes` the block's weights.
- OptimizerRecord times are one optimizer step (AdamW.step) over one block's
  parameters, plain or as DTensors (`distributed`).
- DpSyncRecord times are one FSDP unit's gradient synchronisation as the executor runs it.
- OverlapRecord times are a block's forward + backward alone, an all-reduce alone and both
  together; its `efficiency` replaces the runtime's estimated overlap efficiency.
- `corrections` (optional): calibration factors and their provenance
  (planner/cost/corrections.py), applied by the cost model to every estimate from this profile.
- Collective samples: `bytes` is the per-rank buffer size as nccl-tests' "size" (the all-reduce
  input, the all-gather output); `seconds` the median time. Fit: t = alpha + bytes / beta.
  `busbw` follows nccl-tests' PERFORMANCE.md: algbw * 2(n-1)/n for all-reduce, (n-1)/n for
  all-gather, reduce-scatter and all-to-all (`CollectiveOp.busbw_factor`; the op names and
  every link formula live in planner/cost/collectives.py, re-exported here).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from planner.cost.collectives import CollectiveOp, message_s
from planner.cost.corrections import ProfileCorrections
from planner.cost.dp_sync import overlap_efficiency
from planner.errors import FormatError
from planner.fileio import atomic_write_text, read_json_file
from planner.parallel import Recompute
from planner.serialize import dumps, from_jsonable
from planner.specs import (
    DeviceKind,
    Dtype,
    ModelSpec,
    is_number,
)

SCHEMA_VERSION = 1


class BlockKind(str, Enum):
    EMBEDDING = "embedding"
    TRANSFORMER_BLOCK = "transformer_block"
    HEAD_AND_LOSS = "head_and_loss"


def _check_numbers(owner: str, positive: bool, **values: float) -> None:
    """FormatError unless every value is finite and > 0 (`positive`) or >= 0 (times, spreads)."""
    for name, value in values.items():
        if not is_number(value) or value < 0 or (positive and value == 0):
            allowed = "> 0" if positive else ">= 0"
            raise FormatError(f"{owner}.{name}={value!r} must be a finite number {allowed}")


def _check_counts(owner: str, minimum: int, **values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise FormatError(f"{owner}.{name}={value!r} must be an integer >= {minimum}")


@dataclass(frozen=True, kw_only=True)
class ComputeRecord:
    block: BlockKind
    device_name: str
    tp: int
    micro_batch: int
    seq_len: int
    recompute: Recompute
    forward_s: float
    forward_spread_s: float
    backward_s: float
    backward_spread_s: float
    activation_bytes: int
    parameter_bytes: int
    repeats: int
    peak_memory_bytes: int | None = None
    # True: timed as the executor runs tp > 1 (DTensor TP over a group of the profiled node),
    # so the times include the block's TP collectives and DTensor's dispatch; None (older
    # profiles, tp = 1): the plain sharded block, collectives priced from the links.
    tp_collectives_included: bool | None = field(default=None, metadata={"json_omit_none": True})

    def __post_init__(self) -> None:
        owner = "compute record"
        _check_counts(owner, 1, tp=self.tp, micro_batch=self.micro_batch, seq_len=self.seq_len)
        _check_counts(owner, 1, repeats=self.repeats)
        _check_numbers(
            owner,
            False,
            forward_s=self.forward_s,
            forward_spread_s=self.forward_spread_s,
            backward_s=self.backward_s,
            backward_spread_s=self.backward_spread_s,
        )
        _check_counts(
            owner, 0, activation_bytes=self.activation_bytes, parameter_bytes=self.parameter_bytes
        )
        if self.peak_memory_bytes is not None:
            _check_counts(owner, 0, peak_memory_bytes=self.peak_memory_bytes)


@dataclass(frozen=True, kw_only=True)
class OptimizerRecord:
    """One optimizer step (the executor's AdamW.step) over the parameters of one
    block at its tensor-parallel-sharded shapes, on one device. `distributed`: the parameters
    are DTensors, as FSDP2 / replicate (dp > 1) and DTensor TP (tp > 1) make them, whose every
    elementwise op pays DTensor's dispatch; else plain tensors. `parameter_tensors` is how many
    tensors the step walks (the for-loop AdamW pays a fixed cost per tensor and op)."""

    block: BlockKind
    device_name: str
    tp: int
    distributed: bool
    step_s: float
    step_spread_s: float
    parameter_bytes: int
    parameter_tensors: int
    repeats: int

    def __post_init__(self) -> None:
        owner = "optimizer record"
        _check_counts(owner, 1, tp=self.tp, repeats=self.repeats)
        _check_counts(
            owner, 0, parameter_bytes=self.parameter_bytes, parameter_tensors=self.parameter_tensors
        )
        _check_numbers(owner, False, step_s=self.step_s, step_spread_s=self.step_spread_s)


@dataclass(frozen=True, kw_only=True)
class DpSyncRecord:
    """The data-parallel gradient synchronisation of one block's FSDP unit as the executor runs
    it (ZeRO-0: `replicate` over `group_size` workers of one node, tp = 1): `sync_s` is the
    backward's extra time with gradient sync on over the same backward with it off, i.e. the
    all-reduce plus the wrapper's copy-in, divide and copy-out around it; on CPU workers,
    where nothing overlaps, that is what each unit adds to a step."""

    block: BlockKind
    device_name: str
    group_size: int
    sync_s: float
    sync_spread_s: float
    gradient_bytes: int
    repeats: int
    # The wrapper's own cost per micro-batch with sync off (its forward/backward hooks: the
    # unit's state machine, gradient accumulation into its buffers), over the plain block's
    # forward and backward. None in profiles measured before it was recorded.
    forward_overhead_s: float | None = field(default=None, metadata={"json_omit_none": True})
    backward_overhead_s: float | None = field(default=None, metadata={"json_omit_none": True})

    def __post_init__(self) -> None:
        owner = "dp sync record"
        _check_counts(owner, 2, group_size=self.group_size)
        _check_counts(owner, 1, repeats=self.repeats)
        _check_counts(owner, 0, gradient_bytes=self.gradient_bytes)
        _check_numbers(owner, False, sync_s=self.sync_s, sync_spread_s=self.sync_spread_s)


@dataclass(frozen=True, kw_only=True)
class OverlapRecord:
    """Compute beside a collective on one device: one block's forward + backward alone
    (`compute_s`), an all-reduce of `collective_bytes` over `group_size` workers of one node
    alone (`collective_s`), and both issued together, the collective first, on its own stream
    (`together_s`); medians of `repeats`. `efficiency` is the overlap efficiency the cost model
    prices (planner/cost/dp_sync.py `overlap_efficiency`)."""

    device_name: str
    group_size: int
    collective_bytes: int
    compute_s: float
    collective_s: float
    together_s: float
    repeats: int

    def __post_init__(self) -> None:
        owner = "overlap record"
        _check_counts(owner, 2, group_size=self.group_size)
        _check_counts(owner, 1, repeats=self.repeats, collective_bytes=self.collective_bytes)
        _check_numbers(
            owner,
            True,
            compute_s=self.compute_s,
            collective_s=self.collective_s,
            together_s=self.together_s,
        )

    @property
    def efficiency(self) -> float:
        return overlap_efficiency(self.compute_s, self.collective_s, self.together_s)


@dataclass(frozen=True, kw_only=True)
class LinkSample:
    bytes: int
    seconds: float

    def __post_init__(self) -> None:
        _check_counts("link sample", 1, bytes=self.bytes)
        _check_numbers("link sample", False, seconds=self.seconds)


@dataclass(frozen=True, kw_only=True)
class P2PRecord:
    src: int
    dst: int
    bandwidth_bytes_per_s: float
    latency_s: float
    samples: tuple[LinkSample, ...] = ()

    def __post_init__(self) -> None:
        owner = f"p2p record {self.src}->{self.dst}"
        _check_counts(owner, 0, src=self.src, dst=self.dst)
        if self.src == self.dst:
            raise FormatError(f"{owner}: src and dst must differ")
        _check_numbers(owner, True, bandwidth_bytes_per_s=self.bandwidth_bytes_per_s)
        _check_numbers(owner, False, latency_s=self.latency_s)


@dataclass(frozen=True, kw_only=True)
class CollectiveRecord:
    op: CollectiveOp
    gpu_ids: tuple[int, ...]
    layout: str
    samples: tuple[LinkSample, ...]
    alpha_s: float
    beta_bytes_per_s: float
    busbw_bytes_per_s: float

    def __post_init__(self) -> None:
        owner = f"collective record {getattr(self.op, 'value', self.op)} {list(self.gpu_ids)}"
        if not self.gpu_ids or len(set(self.gpu_ids)) != len(self.gpu_ids):
            raise FormatError(f"{owner}: gpu_ids must list distinct GPUs")
        _check_counts(owner, 0, **{f"gpu_ids[{i}]": g for i, g in enumerate(self.gpu_ids)})
        _check_numbers(owner, True, beta_bytes_per_s=self.beta_bytes_per_s)
        _check_numbers(owner, False, alpha_s=self.alpha_s, busbw_bytes_per_s=self.busbw_bytes_per_s)

    @property
    def group_size(self) -> int:
        return len(self.gpu_ids)

    def time_s(self, nbytes: float) -> float:
        return float(message_s(nbytes, self.beta_bytes_per_s, self.alpha_s))


@dataclass(frozen=True, kw_only=True)
class ProfileGpu:
    gpu_id: int
    host: str
    local_index: int
    device_name: str
    memory_bytes: int

    def __post_init__(self) -> None:
        owner = f"profile gpu {self.gpu_id}"
        _check_counts(owner, 0, gpu_id=self.gpu_id, local_index=self.local_index)
        _check_counts(owner, 1, memory_bytes=self.memory_bytes)


@dataclass(frozen=True, kw_only=True)
class ProfileMeta:
    hosts: tuple[str, ...]
    device_kind: str
    torch_version: str
    dtype: Dtype
    date: str
    method: str
    model: ModelSpec | None = None
    driver_version: str | None = None
    topology: str | None = None

    def __post_init__(self) -> None:
        kinds = [k.value for k in DeviceKind]
        if self.device_kind not in kinds:
            raise FormatError(
                f"profile meta.device_kind={self.device_kind!r} is not allowed; use one of "
                + "|".join(kinds)
            )


@dataclass(frozen=True, kw_only=True)
class Profile:
    schema_version: int
    meta: ProfileMeta
    gpus: tuple[ProfileGpu, ...]
    compute: tuple[ComputeRecord, ...] = ()
    p2p: tuple[P2PRecord, ...] = ()
    collectives: tuple[CollectiveRecord, ...] = ()
    # Fitted by `meshplan calibrate` (planner/cost/corrections.py, its own `schema`); absent in
    # a raw profile, and left out of its JSON then, so older profiles keep their bytes and hash.
    corrections: ProfileCorrections | None = field(default=None, metadata={"json_omit_none": True})
    # Measured optimizer steps per block (profiles before this field have none: the cost model
    # then prices the step from bytes and memory bandwidth alone).
    optimizer: tuple[OptimizerRecord, ...] | None = field(
        default=None, metadata={"json_omit_none": True}
    )
    # Measured DP synchronisation per FSDP unit (CPU profiles of one node; absent before).
    dp_sync: tuple[DpSyncRecord, ...] | None = field(
        default=None, metadata={"json_omit_none": True}
    )
    # Compute beside a collective per device type (profiles of one node with 2+ workers;
    # absent before): the measured overlap efficiency.
    overlap: tuple[OverlapRecord, ...] | None = field(
        default=None, metadata={"json_omit_none": True}
    )

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise FormatError(
                f"profile schema_version={self.schema_version} is not supported; this meshplan reads {SCHEMA_VERSION}"
            )
        ids = [g.gpu_id for g in self.gpus]
        if len(set(ids)) != len(ids):
            raise FormatError("profile lists a gpu_id more than once")

    def p2p_matrix(self) -> dict[tuple[int, int], P2PRecord]:
        return {(r.src, r.dst): r for r in self.p2p}


def fit_alpha_beta(samples: tuple[LinkSample, ...] | list[LinkSample]) -> tuple[float, float]:
    """Least-squares fit of t = alpha + bytes / beta (Hockney's alpha-beta model).

    Returns (alpha_s, beta_bytes_per_s). alpha is clamped at 0 (a negative intercept is noise);
    beta must come out positive, i.e. time must grow with size.
    """
    if len(samples) < 2:
        raise FormatError("an alpha-beta fit needs at least two message sizes")
    xs = [float(s.bytes) for s in samples]
    ys = [float(s.seconds) for s in samples]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise FormatError("an alpha-beta fit needs at least two distinct message sizes")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope <= 0:
        raise FormatError("link samples do not grow with message size; cannot fit a bandwidth")
    alpha = max(0.0, my - slope * mx)
    if alpha == 0.0:
        slope = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    return alpha, 1.0 / slope


def save_profile(profile: Profile, path: str | Path, option: str = "--out") -> None:
    """Write atomically: a failed write never leaves a half-written profile."""
    atomic_write_text(path, dumps(profile), option)


def profile_from_dict(data: object, origin: str = "profile") -> Profile:
    if not isinstance(data, dict):
        raise FormatError(f"{origin}: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FormatError(
            f"{origin}: schema_version={version!r} is not supported; this meshplan reads {SCHEMA_VERSION}"
        )
    return from_jsonable(Profile, data, "profile")


def load_profile(path: str | Path) -> Profile:
    return profile_from_dict(read_json_file(path, "profile"), str(path))


def profile_sha256(profile: Profile) -> str:
    """Hash of the canonical JSON, recorded in plans as provenance."""
    return hashlib.sha256(dumps(profile).encode()).hexdigest()


# --- does a profile describe the hardware being planned?
