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
