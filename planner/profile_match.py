"""Whether a profile describes the hardware being planned, and which of its parts apply.

Owns: `check_profile_matches` (refuse a profile measured on other hardware, naming the field;
notes for a partial match) and the device-name matching it rests on (`describes`,
`device_name_for`). Does not own: the profile format (planner/profile.py) or how the cost
model uses the numbers (planner/cost/).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import replace

from planner.errors import SpecError
from planner.profile import Profile
from planner.specs import ClusterSpec, DeviceKind, GpuSpec, ModelSpec, TrainingSpec


def _tokens(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())


def describes(device_name: str, device_kind: str, gpu: GpuSpec) -> bool:
    """Whether a profiled device (torch's name, e.g. 'NVIDIA H100 80GB HBM3', of kind
    `device_kind`) is GPU type `gpu`. The kinds must agree; any CPU worker type describes any
    CPU. A GPU type describes a device when the names are equal (ignoring case) or the type's
    model token, its first token holding a digit ('h100' of 'H100-SXM-80GB'), is a whole token
    of the device name ('gh200' is not 'h100')."""
    if gpu.kind.value != device_kind:
        return False
    if gpu.kind is DeviceKind.CPU or device_name.lower() == gpu.name.lower():
        return True
    model = next((t for t in _tokens(gpu.name) if any(c.isdigit() for c in t)), None)
    return model is not None and model in _tokens(device_name)


def device_name_for(profile: Profile, gpu: GpuSpec) -> str | None:
    """The compute records' device name that describes `gpu` (first in sorted order), or None
    when the profile timed no device of that type."""
    names = sorted({r.device_name for r in profile.compute})
    return next((n for n in names if describes(n, profile.meta.device_kind, gpu)), None)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0..2, 5'."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)


def _nodes(ids: list[int]) -> str:
    """'node 3' or 'nodes 0..2, 5'."""
    return f"node {ids[0]}" if len(ids) == 1 else f"nodes {_ranges(ids)}"


def _gpu_types(cluster: ClusterSpec) -> dict[str, tuple[GpuSpec, list[int]]]:
    """GPU type name -> (its spec, the nodes that have it), in node order."""
    types: dict[str, tuple[GpuSpec, list[int]]] = {}
    for i, node in enumerate(cluster.nodes):
        types.setdefault(node.gpu.name, (node.gpu, []))[1].append(i)
    return types


def _describe_types(types: dict[str, tuple[GpuSpec, list[int]]]) -> str:
    return "; ".join(f"{name} on {_nodes(nodes)}" for name, (_, nodes) in types.items())


def _check_layout(profile: Profile, cluster: ClusterSpec) -> dict[int, int]:
    """SpecError unless every profiled GPU id inside the cluster is the same GPU type, and the
    profile's hosts are the cluster's nodes (same id ranges, same local indices): p2p records
    and compute device names are applied by global GPU id. Returns node -> GPUs profiled."""
    kind, name = profile.meta.device_kind, cluster.name
    starts = cluster.node_starts
    node_of_host: dict[str, int] = {}
    host_of_node: dict[int, str] = {}
    counts: dict[int, int] = {}
    for g in sorted(profile.gpus, key=lambda g: g.gpu_id):
        if g.gpu_id >= cluster.num_gpus:
            continue
        node = bisect.bisect_right(starts, g.gpu_id) - 1
        gpu = cluster.nodes[node].gpu
        if not describes(g.device_name, kind, gpu):
            raise SpecError(
                f"profile gpu_id {g.gpu_id} is '{g.device_name}' but GPU {g.gpu_id} of cluster "
                f"'{name}' (node {node}) is {gpu.name}: measured records would be applied to "
                "another GPU type; list the cluster's nodes in the order they were profiled"
            )
        first = node_of_host.setdefault(g.host, node)
        if first != node:
            raise SpecError(
                f"profile host '{g.host}' has GPUs on cluster nodes {first} and {node} (node "
                f"{first} has {cluster.nodes[first].gpus} GPUs): links measured inside one "
                "host would price cross-node pairs; give the cluster nodes of the profiled size"
            )
        if host_of_node.setdefault(node, g.host) != g.host:
            raise SpecError(
                f"cluster node {node} holds GPUs profiled on hosts '{host_of_node[node]}' and "
                f"'{g.host}': links measured across hosts would price intra-node pairs; give "
                "the cluster nodes of the profiled size"
            )
        if g.local_index != g.gpu_id - starts[node]:
            raise SpecError(
                f"profile gpu_id {g.gpu_id} is local GPU {g.local_index} of host '{g.host}' but "
                f"local GPU {g.gpu_id - starts[node]} of cluster node {node}"
            )
        counts[node] = counts.get(node, 0) + 1
    return counts


def _check_cpu_workers(profile: Profile, cluster: ClusterSpec) -> None:
    """CPU block times hold only for as many workers per host as were timed: the workers of a
    host share its cores (profiler/workers.py gives each cpu_count // workers threads)."""
    if not profile.gpus:
        return
    host = min(profile.gpus, key=lambda g: g.gpu_id).host
    workers = sum(1 for g in profile.gpus if g.host == host)
    for i, node in enumerate(cluster.nodes):
        if node.gpu.kind is DeviceKind.CPU and node.gpus != workers:
            raise SpecError(
                f"profile timed CPU blocks with {workers} worker(s) sharing host '{host}', but "
                f"cluster node {i} runs {node.gpus}: each worker's share of the cores differs, "
                f"so the times do not apply; profile with --nproc {node.gpus}"
            )


def _compute_notes(
    profile: Profile,
    training: TrainingSpec,
    model: ModelSpec | None,
    types: dict[str, tuple[GpuSpec, list[int]]],
) -> list[str]:
    if not profile.compute:
        return ["compute: the profile has no compute records; block times are not measured"]
    measured = profile.meta.model
    if model is not None and (measured is None or replace(measured, name=model.name) != model):
        which = f"model '{measured.name}'" if measured is not None else "an unnamed model"
        return [f"compute: records are for {which}, not '{model.name}'; not used"]
    seqs = sorted({r.seq_len for r in profile.compute})
    if training.seq_len not in seqs:
        listed = ", ".join(str(s) for s in seqs)
        return [f"compute: records are for seq_len {listed}, not {training.seq_len}; not used"]
    have = {n: t for n, t in types.items() if device_name_for(profile, t[0]) is not None}
    if len(have) == len(types):
        return []
    missing = {n: t for n, t in types.items() if n not in have}
    used = f"measured for {_describe_types(have)}; " if have else ""
    return [f"compute: {used}not measured for {_describe_types(missing)}"]


def _link_notes(profile: Profile, cluster: ClusterSpec, counts: dict[int, int]) -> list[str]:
    if not (profile.p2p or profile.collectives):
        return ["links: the profile has no link measurements; links are not measured"]
    notes = []
    beyond = [g.gpu_id for g in profile.gpus if g.gpu_id >= cluster.num_gpus]
    if beyond:
        notes.append(
            f"links: profile GPUs {_ranges(beyond)} lie beyond the cluster's "
            f"{cluster.num_gpus} GPUs; their records are not used"
        )
    covered = sorted(counts)
    partial = [i for i in covered if counts[i] < cluster.nodes[i].gpus]
    others = [i for i in range(len(cluster.nodes)) if i not in counts]
    if others:
        notes.append(
            f"links: measured inside {_nodes(covered) if covered else 'no node'}; not measured "
            f"inside {_nodes(others)}"
        )
    if partial:
        notes.append(f"links: only some GPUs of {_nodes(partial)} were profiled")
    if len(cluster.nodes) > 1 and len(covered) <= 1:
        notes.append("links: cross-node links are not measured (the profile covers one node)")
    elif len(cluster.nodes) > 1 and others:
        notes.append(f"links: cross-node links are measured only among {_nodes(covered)}")
    if profile.collectives and others:
        notes.append(
            f"links: collectives were measured on groups within {_nodes(covered)}; "
            "groups that include other nodes are not measured"
        )
    return notes


def _memory_notes(profile: Profile, types: dict[str, tuple[GpuSpec, list[int]]]) -> list[str]:
    notes = []
    for name, (gpu, _) in types.items():
        sizes = [
            g.memory_bytes
            for g in profile.gpus
            if describes(g.device_name, profile.meta.device_kind, gpu)
        ]
        if sizes and min(sizes) < gpu.capacity_bytes:
            notes.append(
                f"memory: the profiled {name} devices report {min(sizes) / 2**30:.1f} GiB, less "
                f"than the {gpu.capacity_bytes / 2**30:.1f} GiB plans budget; set "
                "usable_memory_gib for the GPU in the cluster YAML or use --memory-headroom"
            )
    return notes


def check_profile_matches(
    profile: Profile,
    cluster: ClusterSpec,
    training: TrainingSpec,
    *,
    model: ModelSpec | None = None,
) -> tuple[str, ...]:
    """Raise SpecError when `profile` does not describe the planned hardware; else notes on
    the parts of it that do not apply (empty when it covers the cluster exactly).

    Refused: no cluster GPU of the profile's device kind; compute records timed in a dtype
    other than training.dtype; no cluster GPU type that any profiled device name describes
    (`describes`); a profiled GPU id that is another GPU type in the cluster, or profiled hosts
    that are not the cluster's nodes (ids and local indices); CPU compute timed with another
    number of workers per host than a cluster node runs. Noted: compute records absent, for
    another model (when `model` is given) or seq_len, or missing for some GPU types; links
    not measured inside or between some nodes, or measured beyond the cluster; profiled devices
    with less memory than the plans budget (GpuSpec.capacity_bytes).
    """
    kind = profile.meta.device_kind
    types = _gpu_types(cluster)
    if all(gpu.kind.value != kind for gpu, _ in types.values()):
        raise SpecError(
            f"profile device kind '{kind}' does not describe cluster '{cluster.name}' "
            f"({_describe_types(types)}): its block times and links would be applied to other "
            "hardware; profile the planned devices, or plan without --profile"
        )
    if profile.compute and profile.meta.dtype is not training.dtype:
        raise SpecError(
            f"profile dtype={profile.meta.dtype.value} does not match training "
            f"dtype={training.dtype.value}: its block times were measured in "
            f"{profile.meta.dtype.value}; profile with --dtype {training.dtype.value}, or plan "
            f"with --dtype {profile.meta.dtype.value}"
        )
    names = sorted({g.device_name for g in profile.gpus} | {r.device_name for r in profile.compute})
    if names and not any(describes(n, kind, gpu) for n in names for gpu, _ in types.values()):
        raise SpecError(
            f"profile GPU name(s) {', '.join(repr(n) for n in names)} describe no GPU type of "
            f"cluster '{cluster.name}' ({_describe_types(types)}); profile the planned GPUs, or "
            "name the GPU type after its model (e.g. 'H100-...') in the cluster YAML"
        )
    counts = _check_layout(profile, cluster)
    if kind == DeviceKind.CPU.value and profile.compute:
        _check_cpu_workers(profile, cluster)
    return (
        *_compute_notes(profile, training, model, types),
        *_link_notes(profile, cluster, counts),
        *_memory_notes(profile, types),
    )
