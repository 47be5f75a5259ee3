"""Link measurement: point-to-point bandwidth of every GPU pair and collectives per group.

Owns: the contention-free p2p schedule (a round-robin tournament inside each node, a
recursive-halving pairing of nodes across them), the collective groups (contiguous and strided,
per group size), the message-size sweeps, the timing loops (run inside every worker of an
initialised process group) and turning samples into `P2PRecord`/`CollectiveRecord`s with
planner.profile.fit_alpha_beta.
Does not own: the clock (device.py), process start-up (workers.py).

Conventions:
- p2p is a ping-pong (osu_latency style): rank a sends `size` bytes to b, b sends them back;
  the one-way time is half the round trip. It is one measurement of both directions, so the
  profile records (a, b) and (b, a) with the same numbers, and the method string says so.
- A round pairs every rank with at most one partner, so no GPU sends or receives twice at
  once; pairs of one round run concurrently (as pipeline neighbours do in training).
- Collective `bytes` is nccl-tests' "size": the all-reduce buffer, the all-gather output, the
  reduce-scatter input, the all-to-all send buffer (nccl-tests doc/PERFORMANCE.md). The time of a
  group is the slowest member's median; busbw (for display) is at the largest size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from planner.errors import FormatError
from planner.profile import CollectiveOp, CollectiveRecord, LinkSample, P2PRecord, fit_alpha_beta
from profiler import device as dev
from profiler.stats import median

Pair = tuple[int, int]
Progress = Callable[[], None]
ShouldStop = Callable[[], bool]


@dataclass(frozen=True, kw_only=True)
class LinkSettings:
    p2p_sizes_bytes: tuple[int, ...]
    collective_sizes_bytes: tuple[int, ...]
    ops: tuple[CollectiveOp, ...]
    warmup: int
    iters: int
    repeats: int
    dtype: torch.dtype


# ---------------------------------------------------------------- schedules (pure, no devices)


def round_robin(items: Sequence[int]) -> list[list[Pair]]:
    """Circle-method round-robin tournament: len-1 rounds (len rounds when odd) in which every
    item meets every other exactly once and no item plays twice in a round (the classical
    1-factorisation of the complete graph K_2n: fix one item, rotate the others)."""
    players: list[int | None] = list(items)
    if len(players) < 2:
        return []
    if len(players) % 2:
        players.append(None)
    n = len(players)
    rounds = []
    for _ in range(n - 1):
        pairs = []
        for i in range(n // 2):
            a, b = players[i], players[n - 1 - i]
            if a is not None and b is not None:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(sorted(pairs))
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def node_pairings(num_nodes: int) -> list[list[Pair]]:
    """Rounds of disjoint node pairs covering every pair of nodes once.

    A power-of-two node count uses the recursive-halving (butterfly) pattern: in round d node i
    meets i XOR d, for d = n/2, n/4, ..., 1 and then the remaining XOR distances, so the first
    rounds cross the widest cut as in recursive halving (Thakur, Rabenseifner and Gropp 2005,
    "Optimization of Collective Communication Operations in MPICH"); other counts use the
    round-robin tournament.
    """
    if num_nodes < 2:
        return []
    if num_nodes & (num_nodes - 1):
        return round_robin(range(num_nodes))
    distances = []
    d = num_nodes // 2
    while d >= 1:
        distances.append(d)
        d //= 2
    distances += [x for x in range(1, num_nodes) if x not in distances]
    return [sorted({(min(i, i ^ x), max(i, i ^ x)) for i in range(num_nodes)}) for x in distances]


def p2p_rounds(node_of_rank: Sequence[int]) -> list[list[Pair]]:
    """Every pair of ranks exactly once, in rounds where no rank appears twice.

    Intra-node: each node's round-robin rounds, all nodes in step. Inter-node: for each round of
    node pairs, the bipartite pairs between the two nodes' ranks split by shift
    c = (j - i) mod max(len) (a proper edge colouring of K_{m,n}), all node pairs in step.
    """
    nodes: dict[int, list[int]] = {}
    for rank, node in enumerate(node_of_rank):
        nodes.setdefault(node, []).append(rank)
    node_ids = sorted(nodes)
    rounds: list[list[Pair]] = []
    intra = [round_robin(nodes[n]) for n in node_ids]
    for k in range(max((len(r) for r in intra), default=0)):
        rounds.append(sorted(p for r in intra if k < len(r) for p in r[k]))
    for node_round in node_pairings(len(node_ids)):
        shifts = max(max(len(nodes[node_ids[a]]), len(nodes[node_ids[b]])) for a, b in node_round)
        for c in range(shifts):
            pairs = []
            for a, b in node_round:
                ra, rb = nodes[node_ids[a]], nodes[node_ids[b]]
                m = max(len(ra), len(rb))
                for i in range(len(ra)):
                    j = (i + c) % m
                    if j < len(rb):
                        pairs.append((min(ra[i], rb[j]), max(ra[i], rb[j])))
            if pairs:
                rounds.append(sorted(pairs))
    return rounds


def group_sizes(world: int) -> list[int]:
    """Powers of two from 2 up to the world size, plus the world size itself."""
    sizes, n = [], 2
    while n <= world:
        sizes.append(n)
        n *= 2
    if world >= 2 and world not in sizes:
        sizes.append(world)
    return sizes


def collective_layouts(world: int) -> list[tuple[int, str, list[tuple[int, ...]]]]:
    """(group size, layout, groups) to measure: contiguous groups [0..n-1], [n..2n-1], ... and,
    when it differs and n divides the world, strided groups {i, i+w/n, i+2w/n, ...}."""
    out = []
    for n in group_sizes(world):
        out.append((n, "contiguous", [tuple(range(s, s + n)) for s in range(0, world - n + 1, n)]))
        stride = world // n
        if world % n == 0 and stride > 1:
            out.append((n, "strided", [tuple(range(i, world, stride)) for i in range(stride)]))
    return out


# ---------------------------------------------------------------- measurement (inside workers)


def agreed_stop(should_stop: ShouldStop, device: torch.device) -> bool:
    """True on every rank when any rank's budget is spent (a MAX all-reduce of one flag), so all
    ranks leave a phase at the same item and no collective is left waiting."""
    flag = torch.tensor([1 if should_stop() else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _buffer(nbytes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.ones(max(1, nbytes // itemsize), dtype=dtype, device=device)


def _timed_loop(device: torch.device, fn: Callable[[], None], settings: LinkSettings) -> float:
    """Median over `repeats` of (time of `iters` back-to-back calls) / iters, after warm-up."""
    for _ in range(settings.warmup):
        fn()

    def loop() -> None:
        for _ in range(settings.iters):
            fn()

    return median([dev.time_region(device, loop) / settings.iters for _ in range(settings.repeats)])


def measure_p2p_local(
    rank: int,
    rounds: list[list[Pair]],
    settings: LinkSettings,
    device: torch.device,
    should_stop: ShouldStop,
    progress: Progress,
) -> tuple[list[tuple[int, int, int, float]], bool]:
    """This rank's p2p samples (a, b, bytes, one-way seconds; a is the lower rank, who times)
    and whether the budget cut the phase short."""
    samples = []
    for pairs in rounds:
        partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
        for size in settings.p2p_sizes_bytes:
            if agreed_stop(should_stop, device):
                return samples, True
            if rank in partner:
                peer = partner[rank]
                buf = _buffer(size, settings.dtype, device)
                nbytes = buf.numel() * buf.element_size()
                if rank < peer:

                    def ping(buf: torch.Tensor = buf, peer: int = peer) -> None:
                        dist.send(buf, peer)
                        dist.recv(buf, peer)

                    t = _timed_loop(device, ping, settings) / 2
                    samples.append((rank, peer, nbytes, t))
                else:

                    def pong(buf: torch.Tensor = buf, peer: int = peer) -> None:
                        dist.recv(buf, peer)
                        dist.send(buf, peer)

                    _timed_loop(device, pong, settings)
            progress()
    return samples, False


def _collective_fn(
    op: CollectiveOp,
    nbytes: int,
    n: int,
    group: dist.ProcessGroup,
    settings: LinkSettings,
    device: torch.device,
) -> tuple[Callable[[], None], int]:
    """The call for one op at nccl-tests size `nbytes`, and the size actually used (rounded to
    whole elements that split evenly over the n ranks)."""
    itemsize = torch.empty((), dtype=settings.dtype).element_size()
    per_rank = max(1, nbytes // itemsize // n)
    big = torch.ones(per_rank * n, dtype=settings.dtype, device=device)
    small = torch.ones(per_rank, dtype=settings.dtype, device=device)
    # torch >= 2.11 renamed the *_into_tensor / *_tensor calls to *_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if op is CollectiveOp.ALL_REDUCE:
        return (lambda: dist.all_reduce(big, group=group)), big.numel() * itemsize
    if op is CollectiveOp.ALL_GATHER:
        return (lambda: gather(big, small, group=group)), big.numel() * itemsize
    if op is CollectiveOp.REDUCE_SCATTER:
        return (lambda: scatter(small, big, group=group)), big.numel() * itemsize
    out = torch.empty_like(big)
    return (lambda: dist.all_to_all_single(out, big, group=group)), big.numel() * itemsize


def measure_collectives_local(
    rank: int,
    world: int,
    settings: LinkSettings,
    device: torch.device,
    should_stop: ShouldStop,
    progress: Progress,
) -> tuple[list[tuple[str, str, tuple[int, ...], int, float]], bool]:
    """This rank's collective samples (op, layout, group ranks, bytes, seconds) and whether the
    budget cut the phase short.

    Every rank creates every group in the same order (torch.distributed.new_group's rule); the
    groups of one layout run concurrently, as TP or DP groups do in training.
    """
    samples = []
    for n, layout, groups in collective_layouts(world):
        handles = [dist.new_group(list(g)) for g in groups]
        mine = next(((g, h) for g, h in zip(groups, handles, strict=True) if rank in g), None)
        for op in settings.ops:
            for size in settings.collective_sizes_bytes:
                if agreed_stop(should_stop, device):
                    return samples, True
                if mine is not None:
                    fn, nbytes = _collective_fn(op, size, n, mine[1], settings, device)
                    samples.append(
                        (op.value, layout, mine[0], nbytes, _timed_loop(device, fn, settings))
                    )
                progress()
    return samples, False


def p2p_item_count(rounds: list[list[Pair]], settings: LinkSettings) -> int:
    return len(rounds) * len(settings.p2p_sizes_bytes)


def collective_item_count(world: int, settings: LinkSettings) -> int:
    return len(collective_layouts(world)) * len(settings.ops) * len(settings.collective_sizes_bytes)


# ---------------------------------------------------------------- records (rank 0)


def _fit(samples: list[LinkSample]) -> tuple[float, float]:
    """fit_alpha_beta; where noise makes the smallest (latency-bound) sizes non-monotone, drop
    them one at a time until the fit is defined, rather than fail the whole profile."""
    ordered = sorted(samples, key=lambda s: s.bytes)
    while True:
        try:
            return fit_alpha_beta(ordered)
        except FormatError:
            if len(ordered) <= 2:
                raise
            ordered = ordered[1:]


def p2p_records(
    samples: list[tuple[int, int, int, float]], gpu_of_rank: Sequence[int]
) -> list[P2PRecord]:
    by_pair: dict[Pair, list[LinkSample]] = {}
    for a, b, nbytes, seconds in samples:
        by_pair.setdefault((a, b), []).append(LinkSample(bytes=nbytes, seconds=seconds))
    records = []
    for (a, b), pts in sorted(by_pair.items()):
        if len(pts) < 2:
            continue
        pts = sorted(pts, key=lambda s: s.bytes)
        alpha, beta = _fit(pts)
        for src, dst in ((a, b), (b, a)):
            records.append(
                P2PRecord(
                    src=gpu_of_rank[src],
                    dst=gpu_of_rank[dst],
                    bandwidth_bytes_per_s=beta,
                    latency_s=alpha,
                    samples=tuple(pts),
                )
            )
    return sorted(records, key=lambda r: (r.src, r.dst))


def collective_records(
    samples: list[tuple[str, str, tuple[int, ...], int, float]], gpu_of_rank: Sequence[int]
) -> list[CollectiveRecord]:
    """Group the samples of all ranks; a group's time at a size is its slowest member's."""
    by_group: dict[tuple[str, str, tuple[int, ...]], dict[int, float]] = {}
    for op, layout, group, nbytes, seconds in samples:
        sizes = by_group.setdefault((op, layout, tuple(group)), {})
        sizes[nbytes] = max(seconds, sizes.get(nbytes, 0.0))
    records = []
    for (op_name, layout, group), sizes in sorted(
        by_group.items(), key=lambda kv: (kv[0][0], len(kv[0][2]), kv[0][1], kv[0][2])
    ):
        if len(sizes) < 2:
            continue
        op = CollectiveOp(op_name)
        pts = tuple(LinkSample(bytes=b, seconds=s) for b, s in sorted(sizes.items()))
        alpha, beta = _fit(list(pts))
        largest = pts[-1]
        algbw = largest.bytes / largest.seconds
        records.append(
            CollectiveRecord(
                op=op,
                gpu_ids=tuple(gpu_of_rank[r] for r in group),
                layout=layout,
                samples=pts,
                alpha_s=alpha,
                beta_bytes_per_s=beta,
                busbw_bytes_per_s=algbw * op.busbw_factor(len(group)),
            )
        )
    return records
