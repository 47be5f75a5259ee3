"""Merging node profiles into one cluster profile, and splitting a profile into node parts.

Owns: `merge_profiles` (checks that the parts fit together: one schema, one dtype, one device
kind, one model, no GPU listed twice, no gap in the global GPU ids, no link measured twice, links
only between listed GPUs), `split_by_host` (its inverse, used by the `--distributed` mode so each
node writes its own part) and reading the files named on the command line.
Does not own: measuring (the rest of profiler/) or the format itself (planner/profile.py).

Torch-free on purpose: merging runs anywhere the planner runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from planner.errors import FormatError, SpecError
from planner.profile import SCHEMA_VERSION, Profile, ProfileMeta, load_profile


def _ranges(ids: Iterable[int]) -> str:
    """[0,1,2,5,6] -> '0..2, 5..6'."""
    out, run = [], []
    for i in sorted(ids):
        if run and i != run[-1] + 1:
            out.append(run)
            run = []
        run.append(i)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in out)


def collect_paths(args: Sequence[str]) -> list[Path]:
    """Files named, plus every profile-*.json (else *.json) inside each directory named."""
    if not args:
        raise SpecError("profile merge needs at least one directory or file")
    paths: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(p.glob("profile-*.json")) or sorted(p.glob("*.json"))
            if not found:
                raise SpecError(f"{p}: no profile-*.json files in this directory")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise SpecError(f"{p}: no such file or directory")
    unique = list(dict.fromkeys(x.resolve() for x in paths))
    return unique


def load_sources(paths: Sequence[Path], out: Path | None = None) -> list[tuple[str, Profile]]:
    """Load each file (load_profile rejects other schema versions); the output file is skipped
    so re-running a merge into the same directory does not merge the old result."""
    skip = out.resolve() if out is not None else None
    return [(str(p), load_profile(p)) for p in paths if p.resolve() != skip]


def _same(sources: Sequence[tuple[str, Profile]], what: str, get) -> None:  # type: ignore[no-untyped-def]
    first_name, first = sources[0]
    for name, prof in sources[1:]:
        if get(prof) != get(first):
            a, b = _show(get(first)), _show(get(prof))
            same_name = " (same name, different fields)" if a == b else ""
            raise FormatError(
                f"{what} mismatch: {first_name} has {a}, {name} has {b}{same_name}; "
                "profile every node with the same settings"
            )


def _show(value: object) -> str:
    name = getattr(value, "name", None)
    val = getattr(value, "value", None)
    if isinstance(val, str):
        return val
    if isinstance(name, str):
        return f"model '{name}'"
    return repr(value)


def _joined(values: Iterable[str | None]) -> str | None:
    unique = list(dict.fromkeys(v for v in values if v))
    return "; ".join(unique) if unique else None


def merge_profiles(sources: Sequence[tuple[str, Profile]]) -> tuple[Profile, list[str]]:
    """One cluster profile from node profiles, and notes on what was dropped or is missing.

    Raises FormatError naming the files when the parts disagree or overlap.
    """
    if not sources:
        raise FormatError("no profiles to merge")
    for name, prof in sources:
        if prof.schema_version != SCHEMA_VERSION:
            raise FormatError(
                f"{name}: schema_version={prof.schema_version}; this meshplan reads {SCHEMA_VERSION}"
            )
    _same(sources, "dtype", lambda p: p.meta.dtype)
    _same(sources, "device kind", lambda p: p.meta.device_kind)
    _same(sources, "model", lambda p: p.meta.model)

    owner: dict[int, str] = {}
    place: dict[tuple[str, int], str] = {}
    gpus = []
    for name, prof in sources:
        for g in prof.gpus:
            if g.gpu_id in owner:
                hint = (
                    " (were the nodes profiled separately? run `meshplan profile --distributed` "
                    "under torchrun so GPU ids are global)"
                    if owner[g.gpu_id] != name
                    else ""
                )
                raise FormatError(
                    f"duplicate GPU: gpu_id {g.gpu_id} is in both {owner[g.gpu_id]} and {name}{hint}"
                )
            if (g.host, g.local_index) in place:
                raise FormatError(
                    f"duplicate GPU: host {g.host} local GPU {g.local_index} is in both "
                    f"{place[(g.host, g.local_index)]} and {name}"
                )
            owner[g.gpu_id] = name
            place[(g.host, g.local_index)] = name
            gpus.append(g)
    ids = set(owner)
    expected = set(range(len(ids)))
    if ids != expected:
        missing = sorted(set(range(max(ids) + 1)) - ids)
        raise FormatError(
            f"gap in GPU ids: {_ranges(missing)} missing (have {_ranges(ids)}); is a node's "
            "profile absent?"
        )

    notes: list[str] = []
    compute, seen_compute = [], set()
    dropped = 0
    for _, prof in sources:
        for rec in prof.compute:
            key = (rec.device_name, rec.block, rec.tp, rec.micro_batch, rec.seq_len, rec.recompute)
            if key in seen_compute:
                dropped += 1
                continue
            seen_compute.add(key)
            compute.append(rec)
    if dropped:
        notes.append(f"{dropped} compute record(s) measured on more than one node: kept the first")
    optimizer, seen_opt = [], set()
    for _, prof in sources:
        for o in prof.optimizer or ():
            key_o = (o.device_name, o.block, o.tp, o.distributed)
            if key_o not in seen_opt:
                seen_opt.add(key_o)
                optimizer.append(o)

    p2p, seen_pairs = [], {}
    colls, seen_colls = [], {}
    for name, prof in sources:
        for r in prof.p2p:
            if (r.src, r.dst) in seen_pairs:
                raise FormatError(
                    f"duplicate link: p2p {r.src}->{r.dst} is in both {seen_pairs[(r.src, r.dst)]} and {name}"
                )
            if r.src not in ids or r.dst not in ids:
                raise FormatError(f"{name}: p2p {r.src}->{r.dst} names a GPU no profile lists")
            seen_pairs[(r.src, r.dst)] = name
            p2p.append(r)
        for c in prof.collectives:
            key = (c.op, c.gpu_ids, c.layout)
            if key in seen_colls:
                raise FormatError(
                    f"duplicate link: {c.op.value} over GPUs {list(c.gpu_ids)} is in both "
                    f"{seen_colls[key]} and {name}"
                )
            if not set(c.gpu_ids) <= ids:
                raise FormatError(
                    f"{name}: {c.op.value} over {list(c.gpu_ids)} names a GPU no profile lists"
                )
            seen_colls[key] = name
            colls.append(c)
    n = len(ids)
    missing_pairs = n * (n - 1) - len(seen_pairs)
    if missing_pairs:
        notes.append(f"{missing_pairs} of {n * (n - 1)} GPU pairs have no p2p measurement")

    gpus.sort(key=lambda g: g.gpu_id)
    metas = [p.meta for _, p in sources]
    many = len(sources) > 1
    topology = (
        "\n".join(f"[{', '.join(m.hosts)}]\n{m.topology}" for m in metas if m.topology)
        if many
        else metas[0].topology
    ) or None
    meta = ProfileMeta(
        hosts=tuple(dict.fromkeys(g.host for g in gpus)),
        device_kind=metas[0].device_kind,
        torch_version=_joined(m.torch_version for m in metas) or metas[0].torch_version,
        dtype=metas[0].dtype,
        date=max(m.date for m in metas),
        method=_joined(m.method for m in metas) or metas[0].method,
        model=metas[0].model,
        driver_version=_joined(m.driver_version for m in metas),
        topology=topology,
    )
    merged = Profile(
        schema_version=SCHEMA_VERSION,
        meta=meta,
        gpus=tuple(gpus),
        compute=tuple(compute),
        p2p=tuple(sorted(p2p, key=lambda r: (r.src, r.dst))),
        collectives=tuple(colls),
        optimizer=tuple(optimizer) or None,
        dp_sync=tuple(r for _, prof in sources for r in prof.dp_sync or ()) or None,
        overlap=tuple(r for _, prof in sources for r in prof.overlap or ()) or None,
    )
    return merged, notes


def split_by_host(profile: Profile) -> dict[str, Profile]:
    """Node parts: each host's GPUs, the p2p records leaving them, the collectives whose first
    GPU is there, and each device type's compute records on the first host that has it.
    `merge_profiles` of the parts gives back the profile."""
    host_of = {g.gpu_id: g.host for g in profile.gpus}
    first_host_of_device: dict[str, str] = {}
    for g in sorted(profile.gpus, key=lambda g: g.gpu_id):
        first_host_of_device.setdefault(g.device_name, g.host)
    parts = {}
    for host in dict.fromkeys(g.host for g in profile.gpus):
        parts[host] = replace(
            profile,
            meta=replace(profile.meta, hosts=(host,)),
            gpus=tuple(g for g in profile.gpus if g.host == host),
            compute=tuple(
                r
                for r in profile.compute
                if first_host_of_device.get(r.device_name, profile.gpus[0].host) == host
            ),
            optimizer=tuple(
                o
                for o in profile.optimizer or ()
                if first_host_of_device.get(o.device_name, profile.gpus[0].host) == host
            )
            or None,
            dp_sync=tuple(
                d
                for d in profile.dp_sync or ()
                if first_host_of_device.get(d.device_name, profile.gpus[0].host) == host
            )
            or None,
            overlap=tuple(
                o
                for o in profile.overlap or ()
                if first_host_of_device.get(o.device_name, profile.gpus[0].host) == host
            )
            or None,
            p2p=tuple(r for r in profile.p2p if host_of[r.src] == host),
            collectives=tuple(c for c in profile.collectives if host_of[c.gpu_ids[0]] == host),
        )
    return parts
