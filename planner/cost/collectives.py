"""The time of one collective or one message on a given link: the alpha-beta formulas, once.

Owns: `CollectiveOp` (the collectives the profiler measures and the cost model prices) with
its per-rank traffic factor (nccl-tests' busbw factor), and the alpha-beta times of a ring
all-reduce, a double-binary-tree all-reduce (NCCL takes the faster of the two), a ring
all-gather / reduce-scatter / all-to-all, and one point-to-point message. Every function
broadcasts numpy arrays or plain floats of bytes, bandwidth and latency, so the cost model
(planner/cost/comm.py, one group at a time) and the placement surrogate (planner/topology.py,
thousands of groups at once) price a collective with the same formula.
Does not own: which link a group runs on and how groups share NICs (planner/topology.py,
planner/cost/comm.py's ClusterArrays), measured collective fits (planner/profile.py holds
them, planner/cost/comm.py looks them up), or which collectives a block issues
(planner/cost/rankcosts.py). It imports nothing from planner/, so the profile format can use it.

Conventions: `nbytes` is the per-rank buffer as nccl-tests' "size" (the all-reduce input, the
all-gather output); `bw` the bottleneck link bandwidth in bytes/s; `lat` its per-step latency
in seconds. The latency term is paid at any size, also for a 0-byte message.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TypeAlias

import numpy as np

# Bytes, bandwidths, latencies and times: one number or an array of them (broadcast).
Floats: TypeAlias = "float | np.ndarray"


class CollectiveOp(str, Enum):
    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"

    def busbw_factor(self, group_size: int) -> float:
        """nccl-tests PERFORMANCE.md: busbw = algbw * factor, the factor being the ring's
        bytes sent per rank per buffer byte (`ring_s`'s bandwidth term): 2(n-1)/n for
        all-reduce, (n-1)/n for the others."""
        return traffic_factor(self, group_size)


def traffic_factor(op: CollectiveOp, n: int) -> float:
    """Bytes each rank sends per buffer byte in a ring of n ranks (Thakur, Rabenseifner & Gropp
    2005, Sec. 4; Patarasuk & Yuan 2009, Sec. 3): a reduce-scatter then an all-gather for
    all-reduce, one of them for the others (all-to-all sends (n-1)/n of its buffer too)."""
    return 2 * (n - 1) / n if op is CollectiveOp.ALL_REDUCE else (n - 1) / n


def ring_steps(op: CollectiveOp, n: int) -> int:
    """Latency-paying steps of a ring of n ranks: 2(n-1) for all-reduce, n-1 for the others."""
    return 2 * (n - 1) if op is CollectiveOp.ALL_REDUCE else n - 1


def ring_s(op: CollectiveOp, n: int, nbytes: Floats, bw: Floats, lat: Floats) -> Floats:
    """Ring time (Thakur et al. 2005, Sec. 4; nccl-tests PERFORMANCE.md):
    all-reduce 2(n-1) * lat + 2(n-1)/n * nbytes / bw, the others (n-1) * lat + (n-1)/n *
    nbytes / bw."""
    return ring_steps(op, n) * lat + traffic_factor(op, n) * nbytes / bw


def tree_all_reduce_s(n: int, nbytes: Floats, bw: Floats, lat: Floats) -> Floats:
    """Double-binary-tree all-reduce (Sanders, Speck & Traeff 2009; NCCL 2.4's trees): reduce
    up and broadcast down a tree of depth ceil(log2 n), one latency per level each way,
    pipelined so every rank sends and receives the buffer about twice:
    2 ceil(log2 n) * lat + 2 * nbytes / bw."""
    depth = math.ceil(math.log2(n))
    return 2 * depth * lat + 2 * nbytes / bw


def collective_s(op: CollectiveOp, n: int, nbytes: Floats, bw: Floats, lat: Floats) -> Floats:
    """Time of `op` over n ranks: the ring, and for all-reduce the faster of ring and tree, as
    NCCL picks per size (NCCL `src/graph/tuning.cc`: the tree's latency grows with log2 n, the
    ring's linearly). 0 for a group of one."""
    if n <= 1:
        return np.zeros(np.broadcast(nbytes, bw, lat).shape)
    ring = ring_s(op, n, nbytes, bw, lat)
    if op is CollectiveOp.ALL_REDUCE:
        return np.minimum(ring, tree_all_reduce_s(n, nbytes, bw, lat))
    return ring


def message_s(nbytes: Floats, bw: Floats, lat: Floats) -> Floats:
    """One message over one link (Hockney 1994, the alpha-beta model): lat + nbytes / bw.
    Also the time of a measured collective's fit (alpha = lat, beta = bw)."""
    return lat + nbytes / bw
