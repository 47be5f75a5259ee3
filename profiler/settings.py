"""What a profiling run measures and how hard it tries: the quick and full presets.

Owns: `ProfileSettings` (model, device kind, compute and link settings, budget) and
`make_settings`, which validates the user's choices and fills in the defaults of `--quick` and
of a full run. Does not own: measuring (compute.py, links.py) or running (run.py, workers.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import SpecError
from planner.parallel import Recompute
from planner.profile import CollectiveOp
from planner.specs import DeviceKind, Dtype, ModelSpec
from profiler import device as dev
from profiler.compute import ComputeSettings
from profiler.links import LinkSettings

KIB = 1024
MIB = 1024 * KIB

# --quick: sizes 64x apart, so latency- and bandwidth-bound regimes are both sampled and noise
# on a busy CPU is unlikely to reorder them; 3 repeats of 5 calls give a median.
QUICK_LINK_SIZES_BYTES = (4 * KIB, 256 * KIB, 16 * MIB)
QUICK_MICRO_BATCHES = (1, 2)
# Full runs: powers of 4 as nccl-tests' -f 4 sweep; the GPU sweep reaches 256 MiB, where NVLink
# and InfiniBand reach their asymptotic bandwidth; CPU/gloo stops at 16 MiB to stay short.
GPU_LINK_SIZES_BYTES = tuple(KIB * 4**k for k in range(10))
CPU_LINK_SIZES_BYTES = tuple(KIB * 4**k for k in range(8))
FULL_MICRO_BATCHES = (1, 2, 4, 8)
# Default sequence length: the model's, capped where a profile of one block stays affordable.
MAX_DEFAULT_SEQ_LEN = 4096


@dataclass(frozen=True, kw_only=True)
class ProfileSettings:
    model: ModelSpec
    device_kind: DeviceKind
    compute: ComputeSettings
    links: LinkSettings
    budget_s: float | None
    quick: bool
    measure_compute: bool = True
    measure_links: bool = True


def _positive_ints(option: str, values: tuple[int, ...]) -> tuple[int, ...]:
    if not values:
        raise SpecError(f"{option} needs at least one value")
    for v in values:
        if v < 1:
            raise SpecError(f"{option} {v}: must be a positive integer")
    return tuple(sorted(set(values)))


def default_tps(model: ModelSpec, devices_per_node: int) -> tuple[int, ...]:
    """Powers of two up to the GPUs of one node that divide the model (TP stays in a node)."""
    tps, t = [], 1
    while t <= max(1, devices_per_node):
        if model.tp_divisible(t) is None:
            tps.append(t)
        t *= 2
    return tuple(tps)


def make_settings(
    *,
    model: ModelSpec,
    device_kind: DeviceKind,
    devices_per_node: int,
    tps: tuple[int, ...] | None,
    micro_batches: tuple[int, ...] | None,
    seq_len: int | None,
    dtype: Dtype | None,
    quick: bool,
    budget_s: float | None,
) -> ProfileSettings:
    if budget_s is not None and budget_s <= 0:
        raise SpecError(f"--budget-s {budget_s}: must be a positive number of seconds")
    dtype = dtype or (Dtype.BF16 if device_kind is DeviceKind.GPU else Dtype.FP32)
    tps = _positive_ints("--tp", tps) if tps else default_tps(model, devices_per_node)
    mbs = _positive_ints(
        "--micro-batches",
        micro_batches or (QUICK_MICRO_BATCHES if quick else FULL_MICRO_BATCHES),
    )
    seq = seq_len if seq_len is not None else min(model.max_seq_len, MAX_DEFAULT_SEQ_LEN)
    if seq < 1:
        raise SpecError(f"--seq-len {seq}: must be a positive integer")
    if seq > model.max_seq_len:
        raise SpecError(
            f"--seq-len {seq} exceeds model '{model.name}' max_seq_len={model.max_seq_len}"
        )
    for tp in tps:
        rule = model.tp_divisible(tp)
        if rule:
            raise SpecError(f"--tp {tp}: model '{model.name}': {rule}")
    compute = ComputeSettings(
        tps=tps,
        micro_batches=mbs,
        seq_len=seq,
        recomputes=tuple(Recompute),
        dtype=dtype,
        warmup=1 if quick else 3,
        repeats=5 if quick else 10,
    )
    if quick:
        sizes = QUICK_LINK_SIZES_BYTES
    else:
        sizes = GPU_LINK_SIZES_BYTES if device_kind is DeviceKind.GPU else CPU_LINK_SIZES_BYTES
    links = LinkSettings(
        p2p_sizes_bytes=sizes,
        collective_sizes_bytes=sizes,
        ops=tuple(CollectiveOp),
        warmup=2 if quick else 5,
        iters=5 if quick else (20 if device_kind is DeviceKind.GPU else 10),
        repeats=3 if quick else 5,
        dtype=dev.TORCH_DTYPES[dtype],
    )
    return ProfileSettings(
        model=model,
        device_kind=device_kind,
        compute=compute,
        links=links,
        budget_s=budget_s,
        quick=quick,
    )
