"""Exposed data-parallel time of one pipeline rank: gradient sync and ZeRO parameter gathers.

Owns: the unit-level overlap model. Each FSDP unit (a transformer block; the chunk's root unit
holding embedding, final norm and head) issues its collectives on one communication stream, in
the order the runtime issues them; compute waits for a unit's gathered parameters and never for
a reduction. What ends after the compute it overlapped is exposed, and of the time that did
overlap, a share (1 - overlap efficiency) is exposed too, as the slowdown of compute beside a
collective. This is the bucket-ready-time model of PyTorch DDP (Li et al. 2020, VLDB, Sec. 3.2:
buckets reduced in reverse layer order as their gradients are ready) applied to FSDP2 units,
with FSDP2's one-ahead parameter prefetch (torch FSDP2 docs, "implicit prefetching").
Which collectives run when is read from `planner.runtime.RuntimeSemantics`.
Does not own: collective times (comm.py), or the pipeline schedule (schedule.py) whose per-rank
finish time this exposure is added to.

The last unit's reduction (the root, whose gradients are ready only when the whole backward is
done) can never overlap: that is why data-parallel time is never zero at dp > 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner.runtime import GradSync, RuntimeSemantics


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One compute segment: wait for `gather_s` of parameters before, reduce `reduce_s` after."""

    compute_s: float
    gather_s: float = 0.0
    reduce_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class StreamResult:
    """Compute finish, communication-stream finish, and collective time overlapping compute."""

    compute_end_s: float
    comm_end_s: float
    hidden_s: float
    compute_s: float

    def exposed_s(self, overlap_efficiency: float) -> float:
        """Waits for gathers + the tail after compute + the imperfect share of what hid."""
        waits = self.compute_end_s - self.compute_s
        tail = max(0.0, self.comm_end_s - self.compute_end_s)
        return waits + tail + (1.0 - overlap_efficiency) * self.hidden_s


def overlap_efficiency(compute_s: float, collective_s: float, together_s: float) -> float:
    """The overlap efficiency that this model's exposure (`StreamResult.exposed_s`) implies
    for a compute region and a collective timed alone and together: together they take the
    longer of the two plus (1 - efficiency) times the time they share, the shorter one, so
    efficiency = 1 - (together - max) / min, clamped to [0, 1] (measurement noise can put
    `together_s` a little below the longer one or above their sum)."""
    shared = min(compute_s, collective_s)
    if shared <= 0:
        return 1.0
    eff = 1.0 - (together_s - max(compute_s, collective_s)) / shared
    return min(1.0, max(0.0, eff))


def simulate_stream(units: Sequence[Unit]) -> StreamResult:
    """Units computed in order with one serial collective stream.

    The gather of unit j + 1 is issued when unit j starts (one-ahead prefetch); unit j's
    reduction when it ends. A unit starts when the previous one ended and its gather is done.
    """
    comm_free = 0.0
    busy: list[tuple[float, float]] = []

    def issue(at: float, duration: float) -> float:
        nonlocal comm_free
        start = max(at, comm_free)
        comm_free = start + duration
        if duration > 0:
            busy.append((start, comm_free))
        return comm_free

    clock, total = 0.0, 0.0
    computing: list[tuple[float, float]] = []
    gather_done = issue(0.0, units[0].gather_s) if units else 0.0
    for j, unit in enumerate(units):
        start = max(clock, gather_done)
        if j + 1 < len(units):
            gather_done = issue(start, units[j + 1].gather_s)
        clock = start + unit.compute_s
        total += unit.compute_s
        computing.append((start, clock))
        if unit.reduce_s > 0:
            issue(clock, unit.reduce_s)
    hidden = _overlap_s(busy, computing)
    return StreamResult(compute_end_s=clock, comm_end_s=comm_free, hidden_s=hidden, compute_s=total)


def _overlap_s(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total overlap of two sorted lists of disjoint intervals (one sweep)."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


@dataclass(frozen=True, kw_only=True)
class RankSyncInputs:
    """One pipeline rank's per-micro-batch compute and per-unit collective times (seconds).

    `blocks` counts the rank's transformer blocks over all its chunks, `last_chunk_blocks`
    those of the chunk it runs last (pp > 1: its reduction is the one nothing follows).
    `root_*` are the root unit's: embedding forward/backward on the first pipeline rank,
    head on the last, zero elsewhere; `root_first_chunk` says it sits in the rank's first
    chunk (the embedding's), not its last (the head's).
    """

    blocks: int
    last_chunk_blocks: int
    chunks: int
    micro_batches: int
    zero: int
    pp: int
    block_fwd_s: float
    block_bwd_s: float
    root_fwd_s: float
    root_bwd_s: float
    block_reduce_s: float
    root_reduce_s: float
    block_gather_s: float
    root_gather_s: float
    root_first_chunk: bool = True


def _micro_batch(
    x: RankSyncInputs, *, gather_fwd: bool, gather_bwd: bool, reduce: bool
) -> list[Unit]:
    """Forward then backward of one micro-batch as units: root (embedding) first, the blocks,
    the head; backward in reverse, the root's reduction after the last unit."""
    half = 0.5  # the root's compute splits into its embedding and head ends
    fwd = [Unit(compute_s=half * x.root_fwd_s, gather_s=x.root_gather_s if gather_fwd else 0.0)]
    fwd += [
        Unit(compute_s=x.block_fwd_s, gather_s=x.block_gather_s if gather_fwd else 0.0)
        for _ in range(x.blocks)
    ]
    fwd.append(Unit(compute_s=half * x.root_fwd_s))
    bwd = [Unit(compute_s=half * x.root_bwd_s)]
    bwd += [
        Unit(
            compute_s=x.block_bwd_s,
            gather_s=x.block_gather_s if gather_bwd else 0.0,
            reduce_s=x.block_reduce_s if reduce else 0.0,
        )
        for _ in range(x.blocks)
    ]
    bwd.append(Unit(compute_s=half * x.root_bwd_s, reduce_s=x.root_reduce_s if reduce else 0.0))
    return fwd + bwd


def _steady_exposed(mid: list[Unit], last: list[Unit], m: int, efficiency: float) -> float:
    """Exposure of m micro-batches (m - 1 alike, then the last), from at most three simulated:
    every middle micro-batch after the first repeats the same overlap pattern."""
    one = simulate_stream(last).exposed_s(efficiency)
    if m == 1:
        return one
    two = simulate_stream(mid + last).exposed_s(efficiency)
    if m == 2:
        return two
    three = simulate_stream(mid + mid + last).exposed_s(efficiency)
    return three + (m - 3) * (three - two)


def exposed_dp_s(x: RankSyncInputs, runtime: RuntimeSemantics, *, overlaps: bool) -> float:
    """Seconds the rank's step grows by data-parallel collectives (0 at dp = 1: zero times).

    `overlaps` is False on CPU workers, where gloo runs collectives on the computing cores.
    """
    eff = runtime.overlap_efficiency if overlaps else 0.0
    zero = 2 if (x.zero == 1 and runtime.zero1_runs_as_zero2) else x.zero
    m = x.micro_batches
    if runtime.grad_sync(x.pp) is GradSync.AFTER_BACKWARD:
        return _after_backward_exposed(x, zero, eff, runtime)
    every = zero >= 2 and runtime.sharded_grads_reduce_every_micro_batch
    # ZeRO-1/2 keep parameters gathered from forward to backward; ZeRO-3 re-gathers in backward.
    mid = _micro_batch(x, gather_fwd=zero >= 1, gather_bwd=zero == 3, reduce=every)
    last = _micro_batch(x, gather_fwd=zero >= 1, gather_bwd=zero == 3, reduce=True)
    if not runtime.root_unit_last:
        # the root's reduction overlaps like any block (a DDP bucket of its own)
        mid, last = _without_root_tail(mid), _without_root_tail(last)
    return _steady_exposed(mid, last, m, eff)


def _without_root_tail(units: list[Unit]) -> list[Unit]:
    *head, tail = units
    if not head:
        return units
    moved = Unit(compute_s=head[-1].compute_s, gather_s=head[-1].gather_s,
                 reduce_s=head[-1].reduce_s + tail.reduce_s)  # fmt: skip
    return [*head[:-1], moved, Unit(compute_s=tail.compute_s, gather_s=tail.gather_s)]


def _after_backward_exposed(
    x: RankSyncInputs, zero: int, eff: float, runtime: RuntimeSemantics
) -> float:
    """Reduction after the last backward (torch pipelining REDUCE_GRAD, Megatron 2021).

    Torch pipelining reduces each chunk after that chunk's last backward; the last
    micro-batch's backward visits the rank's chunks from the highest to chunk 0, so chunk c's
    reduction can run beside the backward of the chunks after it and the last one's is fully
    exposed (with one chunk per rank, 1F1B, all of it is). Megatron 2021 all-reduces one
    buffer after the flush: all exposed. ZeRO gathers are prefetched under each micro-batch's
    compute: every micro-batch with ZeRO-3, only the first with ZeRO-1/2 (pipelining keeps
    parameters gathered across micro-batches, stage.py `set_reshard_after_backward(False)`).
    """
    v = x.chunks
    per_chunk = [x.last_chunk_blocks] + [
        (x.blocks - x.last_chunk_blocks) // max(1, v - 1) for _ in range(v - 1)
    ]
    reduces = [n * x.block_reduce_s for n in per_chunk]
    reduces[-1 if x.root_first_chunk else 0] += x.root_reduce_s
    if runtime.reduce_per_chunk:
        # chunk order of the last backward: the rank's last chunk first, chunk 0 last
        units = [
            Unit(compute_s=n * x.block_bwd_s, reduce_s=reduces[i]) for i, n in enumerate(per_chunk)
        ]
        exposed = simulate_stream(units).exposed_s(eff)
    else:
        exposed = sum(reduces)
    if zero >= 1:
        gathered = _micro_batch(x, gather_fwd=True, gather_bwd=zero == 3, reduce=False)
        per_mb = simulate_stream(gathered).exposed_s(eff)
        exposed += per_mb * (x.micro_batches if zero == 3 else 1)
    return exposed
