"""Event simulation of pipeline schedules over real per-chunk forward/backward times.

Owns: the op order of 1F1B (Narayanan et al. 2021 Sec. 2.2.1, PipeDream-Flush), interleaved
1F1B with v virtual stages (Sec. 2.2.2, Megatron-LM's order) and GPipe (Huang et al. 2019),
and their makespan with p2p delays between chunks. Unbalanced chunks are priced exactly; for
uniform stages and no p2p 1F1B gives (m + p - 1) * (t_f + t_b), the interleaved schedule
shrinks the bubble to (p - 1)/v of a rank's per-micro-batch time. On request (`trace=True`) the
same simulation returns the trace of every op (rank, kind, chunk, micro-batch, start, end): the
one the report's timeline draws (cli/plan_report.py), so the picture is the estimate's schedule.
Does not own: per-chunk times (estimate.py) or memory.

The op lists are simulated as a DAG (each op waits for the previous op of its rank and for
its producer chunk on the neighbouring rank plus the p2p time). Sends are asynchronous. For
m well beyond the pipeline depth the schedule is periodic after its warm-up, so the makespan
is extrapolated from two exact simulations (tested equal to the full simulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# Simulate exactly while the step has at most this many ops (one op = one chunk's forward or
# backward of one micro-batch; ~0.6 us each); beyond, extrapolate the periodic steady state from
# two exact simulations of m1 and m1 + pp micro-batches, m1 as large as the budget allows
# (unit: ops). Per-rank-uniform chunks are periodic after the warm-up (exact); strongly
# heterogeneous chunks can have longer transients (error < 1 % in tests/test_cost_schedule.py).
EXACT_OPS_BUDGET = 20000
# Smallest m1, in multiples of pp (unit: pipeline depths).
PERIOD_START_FACTOR = 3


class OpKind(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    P2P = "p2p"


@dataclass(frozen=True, kw_only=True)
class TraceOp:
    """One interval of the simulated step on pipeline rank `rank`.

    forward / backward: chunk `chunk`'s pass of micro-batch `micro_batch` (whatever the
    per-chunk time holds: its compute and TP collectives). p2p: the activation (forward) or
    gradient (backward) that op waits for, in flight from its producer's end until it is ready
    on this rank; sends are asynchronous, so it occupies the link, not the rank. Only p2p
    transfers that take time are listed.
    """

    rank: int
    kind: OpKind
    chunk: int
    micro_batch: int
    start_s: float
    end_s: float


@dataclass(frozen=True, kw_only=True)
class SimResult:
    makespan_s: float
    rank_finish_s: tuple[float, ...]
    trace: tuple[TraceOp, ...] = ()  # in simulation order; empty unless asked for


def rank_orders(schedule: str, pp: int, v: int, m: int) -> list[list[tuple[bool, int, int]]]:
    """Per pipeline rank, the ordered ops (is_forward, global chunk, micro-batch)."""
    orders: list[list[tuple[bool, int, int]]] = []
    for r in range(pp):
        ops: list[tuple[bool, int, int]] = []
        if schedule == "gpipe":
            ops = [(True, r, j) for j in range(m)] + [(False, r, j) for j in range(m)]
        elif schedule == "interleaved":
            total = m * v

            def fwd(k: int, r: int = r) -> tuple[bool, int, int]:
                return (True, ((k // pp) % v) * pp + r, (k // (pp * v)) * pp + k % pp)

            def bwd(k: int, r: int = r) -> tuple[bool, int, int]:
                return (False, (v - 1 - (k // pp) % v) * pp + r, (k // (pp * v)) * pp + k % pp)

            warm = min((pp - r - 1) * 2 + (v - 1) * pp, total)
            ops = [fwd(k) for k in range(warm)]
            for i in range(total - warm):
                ops.append(fwd(warm + i))
                ops.append(bwd(i))
            ops += [bwd(k) for k in range(total - warm, total)]
        else:
            warm = min(pp - r - 1, m)
            ops = [(True, r, j) for j in range(warm)]
            for i in range(m - warm):
                ops.append((True, r, warm + i))
                ops.append((False, r, i))
            ops += [(False, r, j) for j in range(m - warm, m)]
        orders.append(ops)
    return orders


def _simulate_exact(
    schedule: str,
    pp: int,
    v: int,
    m: int,
    fwd_s: tuple[float, ...],
    bwd_s: tuple[float, ...],
    p2p_s: tuple[float, ...],
    trace: list[TraceOp] | None = None,
) -> SimResult:
    """Simulate every op; append each op (and each p2p wait) to `trace` when given."""
    chunks = pp * v
    orders = rank_orders(schedule, pp, v, m)
    f_end = [[-1.0] * m for _ in range(chunks)]
    b_end = [[-1.0] * m for _ in range(chunks)]
    ptr = [0] * pp
    free = [0.0] * pp
    remaining = sum(len(o) for o in orders)
    last = chunks - 1
    while remaining:
        progressed = False
        for r in range(pp):
            ops = orders[r]
            i, t = ptr[r], free[r]
            while i < len(ops):
                is_f, c, j = ops[i]
                dep = hop = 0.0
                if is_f:
                    if c > 0:
                        dep = f_end[c - 1][j]
                        if dep < 0:
                            break
                        hop = p2p_s[c - 1]
                        ready = dep + hop
                    else:
                        ready = 0.0
                    start = max(t, ready)
                    t = start + fwd_s[c]
                    f_end[c][j] = t
                else:
                    if c < last:
                        dep = b_end[c + 1][j]
                        if dep < 0:
                            break
                        hop = p2p_s[c]
                        ready = dep + hop
                    else:
                        ready = f_end[c][j]
                        if ready < 0:
                            break
                    start = max(t, ready)
                    t = start + bwd_s[c]
                    b_end[c][j] = t
                if trace is not None:
                    _record(trace, r, is_f, c, j, start, t, (dep, ready) if hop > 0 else None)
                i += 1
            if i != ptr[r]:
                progressed = True
                remaining -= i - ptr[r]
                ptr[r], free[r] = i, t
        if not progressed:
            raise AssertionError(f"{schedule} schedule deadlocked (pp={pp}, v={v}, m={m})")
    return SimResult(makespan_s=max(free), rank_finish_s=tuple(free), trace=tuple(trace or ()))


def _record(
    trace: list[TraceOp],
    r: int,
    is_f: bool,
    c: int,
    j: int,
    start: float,
    end: float,
    wait: tuple[float, float] | None,
) -> None:
    """Append one simulated op, and before it the p2p transfer it waited for (`wait`: the
    producer's end and the time the input is ready here), if that took time."""
    if wait is not None:
        trace.append(
            TraceOp(rank=r, kind=OpKind.P2P, chunk=c, micro_batch=j, start_s=wait[0], end_s=wait[1])
        )
    kind = OpKind.FORWARD if is_f else OpKind.BACKWARD
    trace.append(TraceOp(rank=r, kind=kind, chunk=c, micro_batch=j, start_s=start, end_s=end))


def simulate(
    schedule: str,
    *,
    pp: int,
    virtual_stages: int,
    num_micro_batches: int,
    fwd_s: tuple[float, ...],
    bwd_s: tuple[float, ...],
    p2p_s: tuple[float, ...],
    exact: bool = False,
    trace: bool = False,
) -> SimResult:
    """Makespan of one step's pipeline (forward+backward of all micro-batches).

    `fwd_s[k]`, `bwd_s[k]`: per-micro-batch times of chunk k (k = 0..pp*v-1, on rank k % pp);
    `p2p_s[k]`: the transfer time between chunk k and k+1 (used in both directions).
    GPipe's steady state is not periodic in the same way, so it is always simulated exactly.
    `trace`: also return every op's interval (`SimResult.trace`); the step is then simulated
    exactly, and its makespan is the last op's end.
    """
    v, m = virtual_stages, num_micro_batches
    if len(fwd_s) != pp * v or len(bwd_s) != pp * v or len(p2p_s) != max(pp * v - 1, 0):
        raise ValueError("simulate needs pp*v chunk times and pp*v-1 p2p times")
    ops_per_micro_batch = 2 * pp * v
    m1 = max(PERIOD_START_FACTOR, (EXACT_OPS_BUDGET // ops_per_micro_batch) // pp - 1) * pp
    if exact or trace or schedule == "gpipe" or m <= m1 + pp:
        ops: list[TraceOp] | None = [] if trace else None
        return _simulate_exact(schedule, pp, v, m, fwd_s, bwd_s, p2p_s, ops)
    a = _simulate_exact(schedule, pp, v, m1, fwd_s, bwd_s, p2p_s)
    b = _simulate_exact(schedule, pp, v, m1 + pp, fwd_s, bwd_s, p2p_s)
    k = (m - m1 - pp) / pp
    finish = tuple(
        fb + k * (fb - fa) for fa, fb in zip(a.rank_finish_s, b.rank_finish_s, strict=True)
    )
    return SimResult(makespan_s=max(finish), rank_finish_s=finish)
