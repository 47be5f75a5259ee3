"""Pipeline event simulation (Narayanan et al. 2021 Sec. 2.2; Huang et al. 2019)."""

from __future__ import annotations

import random

import pytest

from planner.cost import schedule as S


@pytest.mark.parametrize("pp,m", [(1, 1), (2, 4), (4, 8), (8, 8), (4, 33)])
def test_1f1b_uniform_equals_formula(pp: int, m: int) -> None:
    f, b = 1.0, 2.0
    r = S.simulate(
        "1f1b",
        pp=pp,
        virtual_stages=1,
        num_micro_batches=m,
        fwd_s=(f,) * pp,
        bwd_s=(b,) * pp,
        p2p_s=(0.0,) * (pp - 1),
    )
    assert r.makespan_s == pytest.approx((m + pp - 1) * (f + b))


@pytest.mark.parametrize("pp,v,m", [(2, 2, 4), (4, 2, 8), (4, 3, 16), (8, 4, 16)])
def test_interleaved_bubble_shrinks_by_v(pp: int, v: int, m: int) -> None:
    # same work per rank t = v chunks x (f + b); the bubble is (p - 1) * t / v (Sec. 2.2.2)
    f, b = 1.0 / v, 2.0 / v
    t = v * (f + b)
    r = S.simulate(
        "interleaved",
        pp=pp,
        virtual_stages=v,
        num_micro_batches=m,
        fwd_s=(f,) * (pp * v),
        bwd_s=(b,) * (pp * v),
        p2p_s=(0.0,) * (pp * v - 1),
    )
    assert r.makespan_s == pytest.approx(m * t + (pp - 1) * t / v)


def test_gpipe_uniform() -> None:
    r = S.simulate(
        "gpipe",
        pp=4,
        virtual_stages=1,
        num_micro_batches=6,
        fwd_s=(1.0,) * 4,
        bwd_s=(2.0,) * 4,
        p2p_s=(0.0,) * 3,
    )
    assert r.makespan_s == pytest.approx((6 + 4 - 1) * 3.0)


def test_unbalanced_stage_dominates() -> None:
    # one slow middle stage never starves after the first forward: it is busy m * (3 + 6) from
    # the end of stage 0's first forward (1) until its last backward, then stage 0's backward (2)
    f = (1.0, 3.0, 1.0)
    b = (2.0, 6.0, 2.0)
    m = 10
    r = S.simulate(
        "1f1b", pp=3, virtual_stages=1, num_micro_batches=m, fwd_s=f, bwd_s=b, p2p_s=(0.0, 0.0)
    )
    assert r.makespan_s == pytest.approx(1.0 + m * 9.0 + 2.0)


def test_p2p_adds_to_critical_path() -> None:
    base = S.simulate(
        "1f1b",
        pp=4,
        virtual_stages=1,
        num_micro_batches=8,
        fwd_s=(1.0,) * 4,
        bwd_s=(2.0,) * 4,
        p2p_s=(0.0,) * 3,
    ).makespan_s
    slow = S.simulate(
        "1f1b",
        pp=4,
        virtual_stages=1,
        num_micro_batches=8,
        fwd_s=(1.0,) * 4,
        bwd_s=(2.0,) * 4,
        p2p_s=(0.1,) * 3,
    ).makespan_s
    assert slow >= base + 2 * 3 * 0.1 - 1e-12


def test_extrapolation_matches_exact_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    monkeypatch.setattr(S, "EXACT_OPS_BUDGET", 200)  # force the extrapolation on small cases
    if True:
        for sched, v in (("1f1b", 1), ("interleaved", 2)):
            for pp in (2, 4, 8):
                c = pp * v
                # per-rank uniform chunks (what balanced splits give): exact
                per_rank = [rng.uniform(0.5, 2.0) for _ in range(pp)]
                f = tuple(per_rank[k % pp] for k in range(c))
                b = tuple(2 * x for x in f)
                p = tuple(0.05 for _ in range(c - 1))
                m = 20 * pp
                kw = dict(pp=pp, virtual_stages=v, num_micro_batches=m, fwd_s=f, bwd_s=b, p2p_s=p)
                exact = S.simulate(sched, exact=True, **kw).makespan_s
                assert S.simulate(sched, **kw).makespan_s == pytest.approx(exact, rel=1e-9)
                # arbitrary chunk times: within 1 %
                f = tuple(rng.uniform(0.5, 2.0) for _ in range(c))
                b = tuple(2 * x + rng.uniform(0, 1) for x in f)
                p = tuple(rng.uniform(0, 0.3) for _ in range(c - 1))
                kw = dict(pp=pp, virtual_stages=v, num_micro_batches=m, fwd_s=f, bwd_s=b, p2p_s=p)
                exact = S.simulate(sched, exact=True, **kw).makespan_s
                assert S.simulate(sched, **kw).makespan_s == pytest.approx(exact, rel=1e-2)


def test_every_op_runs_once() -> None:
    for sched, v in (("1f1b", 1), ("interleaved", 3), ("gpipe", 1)):
        orders = S.rank_orders(sched, 4, v, 8)
        for r, ops in enumerate(orders):
            assert len(ops) == 2 * 8 * v
            assert len(set(ops)) == len(ops)
            assert all(c % 4 == r for _, c, _ in ops)


def _random_case(rng: random.Random, pp: int, v: int) -> dict:
    c = pp * v
    f = tuple(rng.uniform(0.5, 2.0) for _ in range(c))
    return dict(
        pp=pp,
        virtual_stages=v,
        fwd_s=f,
        bwd_s=tuple(2 * x + rng.uniform(0, 1) for x in f),
        p2p_s=tuple(rng.choice((0.0, rng.uniform(0.01, 0.3))) for _ in range(c - 1)),
    )


@pytest.mark.parametrize("sched,v", [("1f1b", 1), ("interleaved", 2), ("gpipe", 1)])
def test_trace_is_the_simulation(sched: str, v: int) -> None:
    """The trace (what the report's timeline draws) is the simulated schedule itself: its last
    op ends at the makespan, each rank's at its finish time, every op runs once for its chunk
    time, after its producer plus the p2p time, and never overlaps its rank's other ops."""
    rng = random.Random(7)
    for pp in (1, 2, 4):
        m = 3 * pp
        kw = _random_case(rng, pp, v)
        plain = S.simulate(sched, num_micro_batches=m, **kw)
        traced = S.simulate(sched, num_micro_batches=m, trace=True, **kw)
        assert traced.makespan_s == plain.makespan_s
        assert traced.rank_finish_s == plain.rank_finish_s
        assert plain.trace == ()
        ops = [o for o in traced.trace if o.kind is not S.OpKind.P2P]
        assert max(o.end_s for o in ops) == traced.makespan_s
        for r in range(pp):
            mine = sorted((o.start_s, o.end_s) for o in ops if o.rank == r)
            assert mine[-1][1] == traced.rank_finish_s[r]
            assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:], strict=False))
        end = {(o.kind, o.chunk, o.micro_batch): o for o in ops}
        assert len(end) == len(ops) == 2 * pp * v * m
        last = pp * v - 1
        for o in ops:
            fwd = o.kind is S.OpKind.FORWARD
            assert o.rank == o.chunk % pp
            want = (kw["fwd_s"] if fwd else kw["bwd_s"])[o.chunk]
            assert o.end_s - o.start_s == pytest.approx(want, rel=1e-12)
            if fwd and o.chunk > 0:
                prev = end[(S.OpKind.FORWARD, o.chunk - 1, o.micro_batch)].end_s
                assert o.start_s >= prev + kw["p2p_s"][o.chunk - 1] - 1e-12
            elif not fwd:
                key = (S.OpKind.BACKWARD, o.chunk + 1, o.micro_batch)
                prev = end[key].end_s + kw["p2p_s"][o.chunk] if o.chunk < last else 0.0
                assert o.start_s >= prev - 1e-12
                assert o.start_s >= end[(S.OpKind.FORWARD, o.chunk, o.micro_batch)].end_s
        # a p2p wait comes just before the op it feeds: from its producer's end, for p2p_s
        waits = 0
        for w, op in zip(traced.trace, traced.trace[1:], strict=False):
            if w.kind is not S.OpKind.P2P:
                continue
            waits += 1
            fwd = op.kind is S.OpKind.FORWARD
            src, hop = (op.chunk - 1, op.chunk - 1) if fwd else (op.chunk + 1, op.chunk)
            assert (w.rank, w.chunk, w.micro_batch) == (op.rank, op.chunk, op.micro_batch)
            assert w.start_s == end[(op.kind, src, op.micro_batch)].end_s
            assert w.end_s == w.start_s + kw["p2p_s"][hop] and op.start_s >= w.end_s
        fed = [o for o in ops if o.chunk > 0]
        hops = sum(kw["p2p_s"][o.chunk - 1] > 0 for o in fed if o.kind is S.OpKind.FORWARD)
        hops += sum(
            kw["p2p_s"][o.chunk] > 0 for o in ops if o.kind is S.OpKind.BACKWARD and o.chunk < last
        )
        assert waits == hops


def test_trace_simulates_long_steps_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "EXACT_OPS_BUDGET", 200)  # the plain call would extrapolate
    kw = _random_case(random.Random(11), 4, 2)
    exact = S.simulate("interleaved", num_micro_batches=80, exact=True, **kw)
    traced = S.simulate("interleaved", num_micro_batches=80, trace=True, **kw)
    assert traced.makespan_s == exact.makespan_s
    assert traced.rank_finish_s == exact.rank_finish_s
    assert len([o for o in traced.trace if o.kind is not S.OpKind.P2P]) == 2 * 8 * 80
