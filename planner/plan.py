"""The plan format (plan.json, `schema_version` 1): what the planner decided, for the executor.

Owns: the typed plan, building it from specs + configuration + prediction, and load/save.
Does not own: making predictions (planner/cost/) or choosing the configuration (planner/search.py).

A plan is self-contained: the executor and the launch emitter need nothing else. `prediction`
is the JSON of the cost model's estimate (see `meshplan estimate --json`), kept as a plain
object so this format does not depend on the cost model's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner import __version__
from planner.errors import FormatError
from planner.fileio import atomic_write_text, read_json_file
from planner.parallel import ParallelConfig
from planner.serialize import dumps, from_jsonable
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """Model chunk `chunk` runs on pipeline rank `pp_rank` and holds blocks [first_layer, end_layer)."""

    chunk: int
    pp_rank: int
    first_layer: int
    end_layer: int
    has_embedding: bool
    has_head: bool


@dataclass(frozen=True, kw_only=True)
class RankEntry:
    """Mesh rank `rank` at mesh coordinate (pp, dp, cp, tp) runs on global GPU `gpu_id`."""

    rank: int
    gpu_id: int
    node: int
    local_gpu: int
    pp: int
    dp: int
    tp: int
    # omitted at 0, so plans without context parallelism keep their bytes
    cp: int = field(default=0, metadata={"json_omit_default": True})


@dataclass(frozen=True, kw_only=True)
class Provenance:
    planner_version: str
    source: str
    profile_sha256: str | None = None


@dataclass(frozen=True, kw_only=True)
class Plan:
    schema_version: int
    model: ModelSpec
    training: TrainingSpec
    cluster: ClusterSpec
    config: ParallelConfig
    num_micro_batches: int
    stages: tuple[StagePlan, ...]
    ranks: tuple[RankEntry, ...]
    provenance: Provenance
    prediction: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise FormatError(
                f"plan schema_version={self.schema_version} is not supported; this meshplan reads {SCHEMA_VERSION}"
            )
        n = self.cluster.num_gpus
        if len(self.ranks) != n or sorted(r.gpu_id for r in self.ranks) != list(range(n)):
            raise FormatError(f"plan rank map must use each of the cluster's {n} GPUs exactly once")

    def gpu_to_rank(self) -> dict[int, int]:
        """Inverse rank map: global GPU id (torchrun's global rank) -> mesh rank."""
        return {r.gpu_id: r.rank for r in self.ranks}


def build_plan(
    *,
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    config: ParallelConfig,
    prediction: dict[str, Any],
    source: str,
    profile_sha256: str | None = None,
) -> Plan:
    """Assemble a validated plan; the split and rank map are written out explicitly."""
    config.validate(model, training, cluster)
    ranges = config.layer_ranges(model)
    last = config.num_chunks - 1
    stages = tuple(
        StagePlan(
            chunk=k,
            pp_rank=k % config.pp,
            first_layer=a,
            end_layer=b,
            has_embedding=k == 0,
            has_head=k == last,
        )
        for k, (a, b) in enumerate(ranges)
    )
    ranks = []
    for rank, gpu in enumerate(config.placement()):
        node, local = cluster.gpu_location(gpu)
        p, d, c, t = config.mesh_coord(rank)
        ranks.append(
            RankEntry(rank=rank, gpu_id=gpu, node=node, local_gpu=local, pp=p, dp=d, tp=t, cp=c)
        )
    explicit = ParallelConfig(
        **{
            **_config_fields(config),
            "stage_layers": config.layers_per_chunk(model),
            "rank_to_gpu": config.placement(),
        }
    )
    return Plan(
        schema_version=SCHEMA_VERSION,
        model=model,
        training=training,
        cluster=cluster,
        config=explicit,
        num_micro_batches=config.num_micro_batches(training),
        stages=stages,
        ranks=tuple(ranks),
        provenance=Provenance(
            planner_version=__version__, source=source, profile_sha256=profile_sha256
        ),
        prediction=prediction,
    )


def _config_fields(config: ParallelConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def plan_to_json(plan: Plan) -> str:
    return dumps(plan)


def save_plan(plan: Plan, path: str | Path, option: str = "--out") -> None:
    """Write atomically, so a failed run never leaves a half-written plan (or its temp file)."""
    atomic_write_text(path, plan_to_json(plan), option)


def plan_from_dict(data: object, origin: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise FormatError(f"{origin}: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FormatError(
            f"{origin}: schema_version={version!r} is not supported; this meshplan reads {SCHEMA_VERSION}"
        )
    plan = from_jsonable(Plan, data, "plan")
    plan.config.validate(plan.model, plan.training, plan.cluster)
    return plan


def load_plan(path: str | Path) -> Plan:
    return plan_from_dict(read_json_file(path, "plan"), str(path))
