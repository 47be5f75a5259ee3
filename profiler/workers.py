"""Worker processes of a profiling run: N local workers, or one per GPU under torchrun.

Owns: the body every worker runs (join the process group, agree on the GPU numbering, measure
compute on one worker per device type, measure links on all, gather to rank 0, assemble the
profile), starting N local workers with torch.multiprocessing (spawn) and relaying their
progress, and the `--distributed` entry that torchrun starts on each node.
Does not own: what is measured (compute.py, links.py), the settings (settings.py), writing
files and the summary (run.py), merging node files (merge.py).

GPU numbering: ranks are sorted by (node rank, local rank); global GPU id = position in that
order, which is planner.specs.ClusterSpec's numbering (node i's local GPU j has id
sum(gpus of nodes < i) + j) whatever rank order torchrun chose.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import queue as queue_mod
import socket
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from planner.errors import MeshplanError, SpecError
from planner.profile import (
    SCHEMA_VERSION,
    ComputeRecord,
    DpSyncRecord,
    OptimizerRecord,
    OverlapRecord,
    Profile,
    ProfileGpu,
    ProfileMeta,
)
from planner.serialize import dumps
from planner.specs import DeviceKind
from profiler import compute as compute_mod
from profiler import device as dev
from profiler import dp_sync as dp_sync_mod
from profiler import links
from profiler import optimizer as optimizer_mod
from profiler import overlap as overlap_mod
from profiler.progress import NullReporter, QueueReporter, Reporter, RichReporter
from profiler.settings import ProfileSettings

# Process-group timeout: compute on one worker per node can take long on big models while the
# others wait at a barrier; the default 10-30 minutes would abort a legitimate full profile.
PROCESS_GROUP_TIMEOUT = _dt.timedelta(hours=3)
# Share of --budget-s given to compute; links get the rest (both phases must leave something).
COMPUTE_BUDGET_SHARE = 0.5
# Parent's wait for queue events; short so a crashed worker is noticed quickly.
POLL_S = 0.1


class ProfileRunError(MeshplanError):
    """A profiling worker failed (environment or device trouble, not bad input)."""

    exit_code = 1


@dataclass(frozen=True, kw_only=True)
class WorkerPlace:
    rank: int
    world: int
    local_rank: int
    local_world: int
    node_rank: int
    host: str


@dataclass(frozen=True, kw_only=True)
class RankInfo:
    rank: int
    node_rank: int
    local_rank: int
    host: str
    device_name: str
    memory_bytes: int


def _threads_per_worker(local_world: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def method_text(settings: ProfileSettings, device: torch.device, threads: int) -> str:
    c, k = settings.compute, settings.links
    sizes = ",".join(str(s) for s in k.collective_sizes_bytes)
    return (
        f"compute: timed on all workers of a node at once (local rank 0 kept); "
        f"{c.warmup} warm-up + {c.repeats} timed fwd/bwd per case, median and IQR "
        f"(p75-p25), clock {dev.clock_name(device)}, {threads} intra-op thread(s) per worker; "
        "the first node of each device type measures; embedding and head are not checkpointed by the "
        "executor, so their one measurement is recorded under every recompute mode; activation "
        "bytes = tensors saved for backward (saved_tensors_hooks) de-duplicated by storage, "
        "parameters excluded; peak memory (GPU "
        "only) = max allocated during one fwd+bwd above the allocation before it; TP "
        "collectives excluded, except on a one-node profile, where tp > 1 blocks are timed under "
        "the executor's DTensor TP over the node's workers (collectives and DTensor dispatch "
        "included, tp_collectives_included). optimizer: the executor's AdamW.step over one block's "
        "parameters (plain and as DTensors), same warm-up and repeats, median and IQR. "
        "dp sync (CPU, one node): each block kind under the executor's replicate over the "
        "node's workers, backward with gradient sync on minus off (medians). "
        f"p2p: ping-pong, one-way = half the round trip, both directions recorded from one "
        f"measurement; pairs scheduled in rounds (round-robin in a node, recursive halving "
        f"across nodes). collectives: sizes {sizes} bytes (nccl-tests size), "
        f"{k.warmup} warm-up + {k.repeats} x {k.iters} iterations, median per-call time of the "
        f"slowest group member, concurrent groups per layout; alpha-beta least squares "
        f"(planner.profile.fit_alpha_beta). backend {'nccl' if device.type == 'cuda' else 'gloo'}."
        + (" quick mode." if settings.quick else "")
    )


def _unique_hosts(ranks: list[RankInfo]) -> list[RankInfo]:
    """Host labels must identify nodes; containers on different nodes may share a hostname."""
    nodes_of_host: dict[str, set[int]] = {}
    for r in ranks:
        nodes_of_host.setdefault(r.host, set()).add(r.node_rank)
    return [
        replace(r, host=f"{r.host}-node{r.node_rank}") if len(nodes_of_host[r.host]) > 1 else r
        for r in ranks
    ]


def _tp_meshes(
    place: WorkerPlace, settings: ProfileSettings, device: torch.device
) -> dict[int, Any]:
    """One TP DeviceMesh per profiled tp > 1 that divides the world, so TP blocks are timed as
    the executor runs them (DTensor, collectives included). Only for a one-node profile, where
    every rank measures compute and so every rank can join the groups; {} otherwise (the plain
    sharded blocks are timed and the collectives priced from the links)."""
    from torch.distributed.device_mesh import init_device_mesh

    if place.world != place.local_world:
        return {}
    out = {}
    for tp in settings.compute.tps:
        if tp > 1 and place.world % tp == 0:
            mesh = init_device_mesh(
                device.type, (place.world // tp, tp), mesh_dim_names=("r", "tp")
            )
            out[tp] = mesh["tp"]
    return out


def worker_body(
    place: WorkerPlace, settings: ProfileSettings, reporter: Reporter
) -> tuple[Profile | None, str]:
    """Everything one worker does; returns (the whole profile on rank 0 else None, the label of
    this worker's host in the profile). The process group must already be initialised."""
    started = time.time()
    info = dev.device_info(settings.device_kind, place.local_rank, place.local_world)
    device = dev.set_current(info)
    threads = _threads_per_worker(place.local_world)
    torch.set_num_threads(threads)
    mine = RankInfo(
        rank=place.rank,
        node_rank=place.node_rank,
        local_rank=place.local_rank,
        host=place.host,
        device_name=info.name,
        memory_bytes=info.memory_bytes,
    )
    everyone: list[Any] = [None] * place.world
    dist.all_gather_object(everyone, mine)
    ranks: list[RankInfo] = _unique_hosts(
        sorted(everyone, key=lambda r: (r.node_rank, r.local_rank))
    )
    gpu_of_rank = [0] * place.world
    for gpu_id, r in enumerate(ranks):
        gpu_of_rank[r.rank] = gpu_id
    node_of_rank = [r.node_rank for r in sorted(ranks, key=lambda r: r.rank)]
    my_host = next(r.host for r in ranks if r.rank == place.rank)

    budget = settings.budget_s
    compute_deadline = started + budget * COMPUTE_BUDGET_SHARE if budget else None
    links_deadline = started + budget if budget else None

    # Compute: every worker of the first node holding each device type times the same cases at
    # once, as training runs them (on CPU the workers share cores, caches and memory bandwidth;
    # one worker timed alone ran 1.2-1.6x faster than in training); local rank 0's numbers are kept.
    first_node_of_type: dict[str, int] = {}
    for r in ranks:
        first_node_of_type.setdefault(r.device_name, r.node_rank)
    measures = settings.measure_compute and first_node_of_type[info.name] == place.node_rank
    keeps = measures and place.local_rank == 0
    records: list[ComputeRecord] = []
    opt_records: list[OptimizerRecord] = []
    sync_records: list[DpSyncRecord] = []
    overlap_records: list[OverlapRecord] = []
    cut: list[str] = []
    if measures:
        cases = compute_mod.compute_cases(settings.model, settings.compute)
        if keeps:
            reporter.phase("compute", len(cases))
        done = 0
        meshes = _tp_meshes(place, settings, device)

        def compute_stop() -> bool:
            late = compute_deadline is not None and time.time() > compute_deadline
            # TP cases run collectives: every rank must leave at the same case
            return links.agreed_stop(lambda: late, device) if meshes else late

        for batch in compute_mod.measure_all(
            settings.model,
            settings.compute,
            device,
            info.name,
            should_stop=compute_stop,
            tp_meshes=meshes,
        ):
            done += 1
            if keeps:
                records.extend(batch)
                reporter.advance("compute")
        # the optimizer step on every measuring worker at once too, as training runs it
        steps = optimizer_mod.measure_optimizer(
            settings.model,
            settings.compute,
            device,
            info.name,
            should_stop=lambda: compute_deadline is not None and time.time() > compute_deadline,
        )
        if keeps:
            opt_records = steps
        if settings.device_kind is DeviceKind.CPU and place.world == place.local_world > 1:
            # every rank of the one node measures, so all can join the unit's all-reduce
            from torch.distributed.device_mesh import DeviceMesh

            syncs = dp_sync_mod.measure_dp_sync(
                settings.model,
                settings.compute,
                device,
                info.name,
                DeviceMesh(device.type, list(range(place.world))),
                should_stop=lambda: links.agreed_stop(
                    lambda: compute_deadline is not None and time.time() > compute_deadline,
                    device,
                ),
            )
            if keeps:
                sync_records = syncs
        if place.world == place.local_world > 1:
            # every rank of the one node measures, so all join the all-reduce beside the block
            overlaps = overlap_mod.measure_overlap(
                settings.model,
                settings.compute,
                device,
                info.name,
                should_stop=lambda: links.agreed_stop(
                    lambda: compute_deadline is not None and time.time() > compute_deadline,
                    device,
                ),
            )
            if keeps:
                overlap_records = overlaps
        if keeps and done < len(cases):
            cut.append(f"compute on {place.host} after {done} of {len(cases)} cases")
            reporter.note(
                f"[yellow]warning:[/] compute stopped by --budget-s or memory after "
                f"{done} of {len(cases)} cases"
            )
    dist.barrier()

    def links_stop() -> bool:
        return links_deadline is not None and time.time() > links_deadline

    p2p_samples: list[Any] = []
    coll_samples: list[Any] = []
    if settings.measure_links and place.world > 1:
        rounds = links.p2p_rounds(node_of_rank)
        reporter.phase("p2p", links.p2p_item_count(rounds, settings.links))
        p2p_samples, p2p_cut = links.measure_p2p_local(
            place.rank,
            rounds,
            settings.links,
            device,
            links_stop,
            lambda: reporter.advance("p2p"),
        )
        reporter.phase("collectives", links.collective_item_count(place.world, settings.links))
        coll_samples, coll_cut = links.measure_collectives_local(
            place.rank,
            place.world,
            settings.links,
            device,
            links_stop,
            lambda: reporter.advance("collectives"),
        )
        if (p2p_cut or coll_cut) and place.rank == 0:
            cut.append("links")
            reporter.note("[yellow]warning:[/] link measurements stopped by --budget-s")

    gathered: list[Any] = [None] * place.world if place.rank == 0 else []
    dist.gather_object(
        (records, p2p_samples, coll_samples, cut, opt_records, sync_records, overlap_records),
        gathered if place.rank == 0 else None,
        dst=0,
    )
    if place.rank != 0:
        return None, my_host
    all_records = [r for part in gathered for r in part[0]]
    all_p2p = [s for part in gathered for s in part[1]]
    all_coll = [s for part in gathered for s in part[2]]
    all_cut = [c for part in gathered for c in part[3]]
    all_opt = [o for part in gathered for o in part[4]]
    all_sync = [o for part in gathered for o in part[5]]
    all_overlap = [o for part in gathered for o in part[6]]
    gpus = tuple(
        ProfileGpu(
            gpu_id=gpu_id,
            host=r.host,
            local_index=r.local_rank,
            device_name=r.device_name,
            memory_bytes=r.memory_bytes,
        )
        for gpu_id, r in enumerate(ranks)
    )
    hosts = tuple(dict.fromkeys(r.host for r in ranks))
    cuda = settings.device_kind is DeviceKind.GPU
    meta = ProfileMeta(
        hosts=hosts,
        device_kind=settings.device_kind.value,
        torch_version=torch.__version__,
        dtype=settings.compute.dtype,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        method=method_text(settings, device, threads)
        + (f" stopped early (--budget-s or memory): {'; '.join(all_cut)}." if all_cut else ""),
        model=settings.model,
        driver_version=dev.driver_version() if cuda else None,
        topology=dev.topology_facts(settings.device_kind),
    )
    profile = Profile(
        schema_version=SCHEMA_VERSION,
        meta=meta,
        gpus=gpus,
        compute=tuple(all_records),
        p2p=tuple(links.p2p_records(all_p2p, gpu_of_rank)),
        collectives=tuple(links.collective_records(all_coll, gpu_of_rank)),
        optimizer=tuple(all_opt) or None,
        dp_sync=tuple(all_sync) or None,
        overlap=tuple(all_overlap) or None,
    )
    return profile, my_host


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_entry(rank: int, world: int, port: int, settings: ProfileSettings, events: Any) -> None:
    """Entry of one spawned local worker (module-level so spawn can pickle it)."""
    backend = "nccl" if settings.device_kind is DeviceKind.GPU else "gloo"
    if settings.device_kind is DeviceKind.GPU:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=PROCESS_GROUP_TIMEOUT,
    )
    try:
        place = WorkerPlace(
            rank=rank,
            world=world,
            local_rank=rank,
            local_world=world,
            node_rank=0,
            host=socket.gethostname(),
        )
        reporter: Reporter = QueueReporter(events) if rank == 0 else NullReporter()
        profile, _ = worker_body(place, settings, reporter)
        if profile is not None:
            events.put(("result", dumps(profile)))
    finally:
        dist.destroy_process_group()


def run_local(settings: ProfileSettings, nproc: int, reporter: RichReporter) -> Profile:
    """Start `nproc` workers on this host, relay their progress, return rank 0's profile."""
    import torch.multiprocessing as mp

    from planner.profile import profile_from_dict

    if nproc < 1:
        raise SpecError(f"--nproc {nproc}: must be a positive integer")
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    port = free_port()
    procs = mp.start_processes(
        _local_entry,
        args=(nproc, port, settings, events),
        nprocs=nproc,
        join=False,
        start_method="spawn",
    )
    result: str | None = None
    try:
        while True:
            try:
                event = events.get(timeout=POLL_S)
            except queue_mod.Empty:
                if procs.join(timeout=0):
                    break
                continue
            if event[0] == "result":
                result = event[1]
                reporter.finish()
            else:
                reporter.handle(event)
    except mp.ProcessRaisedException as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise ProfileRunError(f"a profiling worker failed: {last}") from None
    except mp.ProcessExitedException as e:
        raise ProfileRunError(f"a profiling worker died: {e}") from None
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
    if result is None:
        raise ProfileRunError("the profiling workers finished without a result")
    return profile_from_dict(json.loads(result), "worker result")


def torchrun_place() -> WorkerPlace:
    """This process's place from torchrun's environment; SpecError outside torchrun."""
    env = os.environ
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR") if k not in env]
    if missing:
        raise SpecError(
            f"--distributed runs under torchrun; {', '.join(missing)} not set "
            "(start it as `torchrun --nnodes N --nproc-per-node G ... meshplan profile --distributed ...`)"
        )
    return WorkerPlace(
        rank=int(env["RANK"]),
        world=int(env["WORLD_SIZE"]),
        local_rank=int(env["LOCAL_RANK"]),
        local_world=int(env.get("LOCAL_WORLD_SIZE", "1")),
        node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", "0"))),
        host=socket.gethostname(),
    )


def run_distributed(settings: ProfileSettings, reporter_factory: Any) -> tuple[Profile | None, str]:
    """Entry under torchrun: every process calls this. Returns (this node's part of the profile
    on each node's local rank 0, None elsewhere; this node's host label).

    Rank 0 assembles the whole profile and broadcasts it; each node's local rank 0 keeps its
    part (merge.split_by_host) with its own driver and topology facts, and writes it.
    `reporter_factory(place)` gives each process its reporter (bars on local rank 0).
    """
    from planner.profile import profile_from_dict
    from profiler.merge import split_by_host

    place = torchrun_place()

    backend = "nccl" if settings.device_kind is DeviceKind.GPU else "gloo"
    if settings.device_kind is DeviceKind.GPU:
        torch.cuda.set_device(place.local_rank)
    dist.init_process_group(backend, init_method="env://", timeout=PROCESS_GROUP_TIMEOUT)
    try:
        profile, host = worker_body(place, settings, reporter_factory(place))
        box = [dumps(profile) if profile is not None else None]
        dist.broadcast_object_list(box, src=0)
    finally:
        dist.destroy_process_group()
    if place.local_rank != 0:
        return None, host
    whole = profile_from_dict(json.loads(box[0]), "rank 0 profile")
    part = split_by_host(whole)[host]
    cuda = settings.device_kind is DeviceKind.GPU
    meta = replace(
        part.meta,
        driver_version=dev.driver_version() if cuda else None,
        topology=dev.topology_facts(settings.device_kind),
    )
    return replace(part, meta=meta), host
