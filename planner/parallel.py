"""A parallel configuration: degrees, micro-batching, schedule, recompute, ZeRO, split, placement.

Owns: `MeshAxis` (the one vocabulary of mesh axes, shared with the executor), `ParallelConfig`
and its validation against a model, training and cluster, the balanced layer split, and the
default rank order.
Does not own: costs (planner/cost/), the search (planner/search.py), placement search
(planner/placement.py).

Conventions (fixed here, relied on by the cost model, the plan format and the executor):
- The mesh is (pp, dp, cp, tp), outermost first. Mesh rank r = ((p * dp + d) * cp + c) * tp + t
  (with cp = 1 this is (p * dp + d) * tp + t, the layout of plans written before cp existed).
- `rank_to_gpu[r]` is the global GPU id (ClusterSpec numbering) that holds mesh rank r.
  The default order is the identity: tp innermost, then cp, then dp, then pp, so a CP group
  sits on the GPUs next to its TP group (inside one node when tp * cp <= GPUs per node).
- Context parallelism (cp) splits every sequence over cp ranks that hold the same batch rows;
  gradients are averaged, and ZeRO shards, over the dp * cp ranks of a (pp, tp) coordinate
  (torchtitan's flattened `dp_shard_cp` mesh): `dp_cp`.
- With v virtual stages per pipeline rank there are pp * v model chunks; chunk k runs on
  pipeline rank k % pp (Megatron's interleaved assignment, Narayanan et al. 2021 Sec. 2.2).
- `stage_layers[k]` is the number of transformer blocks in chunk k. The embedding sits on
  chunk 0 and the final norm + head + loss on chunk pp*v - 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from planner.errors import ConfigError, SpecError
from planner.runtime import EXECUTOR_CP, CpAttention
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec


class MeshAxis(str, Enum):
    """Names of the device-mesh axes, outermost first: pipeline, data, context, tensor parallel."""

    PP = "pp"
    DP = "dp"
    CP = "cp"
    TP = "tp"


MESH_ORDER: tuple[MeshAxis, ...] = (MeshAxis.PP, MeshAxis.DP, MeshAxis.CP, MeshAxis.TP)


class Schedule(str, Enum):
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"
    GPIPE = "gpipe"


class Recompute(str, Enum):
    """`selective` recomputes attention internals only (Korthikanti et al. 2022 Sec. 5);
    `full` keeps only each block's input and recomputes the whole block in backward."""

    NONE = "none"
    SELECTIVE = "selective"
    FULL = "full"


def _as_enum(cls, name: str, value):
    try:
        return value if isinstance(value, cls) else cls(value)
    except ValueError:
        allowed = "|".join(m.value for m in cls)
        raise ConfigError(f"{name}={value!r} is not allowed; use one of {allowed}") from None


def balanced_split(layers: int, chunks: int) -> tuple[int, ...]:
    """Split `layers` blocks into `chunks` contiguous chunks differing by at most one (extras first)."""
    base, extra = divmod(layers, chunks)
    return tuple(base + (1 if k < extra else 0) for k in range(chunks))


def ulysses_fits(model: ModelSpec, tp: int, cp: int) -> bool:
    """Ulysses gives each CP rank heads/(tp*cp) query heads and needs whole K/V heads too: cp
    must divide the KV heads of a TP rank (Jacobs et al. 2023 Sec. 3.3: the degree is bounded
    by the head count; GQA's KV heads bound it first)."""
    return (model.kv_heads // tp) % cp == 0 and (model.heads // tp) % cp == 0


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """One point of the configuration space. See the module docstring for the conventions."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    schedule: Schedule = Schedule.ONE_F_ONE_B
    virtual_stages: int = 1
    recompute: Recompute = Recompute.NONE
    sequence_parallel: bool = False
    zero: int = 0
    stage_layers: tuple[int, ...] | None = None
    rank_to_gpu: tuple[int, ...] | None = None
    # Expert parallelism: each MoE block's experts are split over `ep` consecutive data-parallel
    # ranks (dp index d = d_outer * ep + e; Megatron-LM and torchtitan draw EP from DP the same
    # way). Not a mesh axis of its own: the world is still tp * pp * dp.
    ep: int = field(default=1, metadata={"json_omit_default": True})
    # Context parallelism: each sequence is split over `cp` ranks (a mesh axis between dp and
    # tp); the load-balanced causal layout gives CP rank c the sequence chunks c and 2cp-1-c of
    # 2cp (planner/cost/cp.py, executor/cp.py).
    cp: int = field(default=1, metadata={"json_omit_default": True})
    # How attention runs over the CP shards (planner/runtime.py CpAttention): one the executor
    # runs (all_gather_kv, or ulysses when cp divides the heads and KV heads per TP rank).
    cp_attention: CpAttention = field(
        default=CpAttention.ALL_GATHER_KV, metadata={"json_omit_default": True}
    )

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "micro_batch", "virtual_stages", "ep", "cp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        object.__setattr__(self, "schedule", _as_enum(Schedule, "schedule", self.schedule))
        object.__setattr__(self, "recompute", _as_enum(Recompute, "recompute", self.recompute))
        object.__setattr__(
            self, "cp_attention", _as_enum(CpAttention, "cp_attention", self.cp_attention)
        )
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero={self.zero!r} is not allowed; use one of 0|1|2|3")
        if self.schedule is not Schedule.INTERLEAVED and self.virtual_stages != 1:
            raise ConfigError(
                f"virtual_stages={self.virtual_stages} needs schedule=interleaved (got {self.schedule.value})"
            )
        if self.schedule is Schedule.INTERLEAVED and self.pp < 2:
            raise ConfigError("schedule=interleaved needs pp >= 2")
        if self.sequence_parallel and self.tp < 2:
            raise ConfigError("sequence_parallel needs tp >= 2")
        if self.stage_layers is not None:
            object.__setattr__(self, "stage_layers", tuple(self.stage_layers))
            if len(self.stage_layers) != self.num_chunks:
                raise ConfigError(
                    f"stage_layers has {len(self.stage_layers)} entries; pp*virtual_stages = "
                    f"{self.pp}*{self.virtual_stages} = {self.num_chunks} needed"
                )
            if any(n < 1 for n in self.stage_layers):
                raise ConfigError(
                    f"stage_layers={list(self.stage_layers)}: every stage needs >= 1 layer"
                )
        if self.rank_to_gpu is not None:
            object.__setattr__(self, "rank_to_gpu", tuple(self.rank_to_gpu))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def dp_cp(self) -> int:
        """Ranks a gradient is averaged over and ZeRO shards over: dp * cp."""
        return self.dp * self.cp

    def degrees_text(self) -> str:
        """The world size as its factors, for messages: tp*pp*dp (= ...), with cp when > 1."""
        if self.cp == 1:
            return f"tp*pp*dp = {self.tp}*{self.pp}*{self.dp}"
        return f"tp*pp*dp*cp = {self.tp}*{self.pp}*{self.dp}*{self.cp}"

    @property
    def num_chunks(self) -> int:
        return self.pp * self.virtual_stages

    def num_micro_batches(self, training: TrainingSpec) -> int:
        return training.global_batch // (self.dp * self.micro_batch)

    def layers_per_chunk(self, model: ModelSpec) -> tuple[int, ...]:
        return self.stage_layers or balanced_split(model.layers, self.num_chunks)

    def layer_ranges(self, model: ModelSpec) -> tuple[tuple[int, int], ...]:
        """[start, end) transformer-block indices per chunk."""
        out, start = [], 0
        for n in self.layers_per_chunk(model):
            out.append((start, start + n))
            start += n
        return tuple(out)

    def placement(self) -> tuple[int, ...]:
        return self.rank_to_gpu or tuple(range(self.world_size))

    def mesh_coord(self, rank: int) -> tuple[int, int, int, int]:
        """(pp, dp, cp, tp) coordinate of mesh rank `rank`."""
        p, rest = divmod(rank, self.dp * self.cp * self.tp)
        d, rest = divmod(rest, self.cp * self.tp)
        c, t = divmod(rest, self.tp)
        return p, d, c, t

    def mesh_rank(self, p: int, d: int, c: int, t: int) -> int:
        return ((p * self.dp + d) * self.cp + c) * self.tp + t

    def group_gpus(self, axis: MeshAxis, rank: int) -> tuple[int, ...]:
        """GPU ids of the group along `axis` that mesh rank `rank` belongs to, in axis order."""
        p, d, c, t = self.mesh_coord(rank)
        gpus = self.placement()
        if axis is MeshAxis.TP:
            return tuple(gpus[self.mesh_rank(p, d, c, i)] for i in range(self.tp))
        if axis is MeshAxis.CP:
            return tuple(gpus[self.mesh_rank(p, d, i, t)] for i in range(self.cp))
        if axis is MeshAxis.DP:
            return tuple(gpus[self.mesh_rank(p, i, c, t)] for i in range(self.dp))
        return tuple(gpus[self.mesh_rank(i, d, c, t)] for i in range(self.pp))

    def validate(self, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec) -> None:
        """Raise ConfigError naming the first rule this configuration breaks."""
        try:
            training.check_model(model)
        except SpecError as e:
            raise ConfigError(str(e)) from None
        n = cluster.num_gpus
        if self.world_size != n:
            names, values = self.degrees_text().split(" = ")
            raise ConfigError(
                f"{names} must equal the cluster's GPU count: {values} = {self.world_size} != {n}"
            )
        rule = model.tp_divisible(self.tp)
        if rule:
            raise ConfigError(rule)
        if self.sequence_parallel and training.seq_len % self.tp:
            raise ConfigError(
                f"sequence_parallel needs tp={self.tp} to divide seq_len={training.seq_len}"
            )
        if model.layers < self.num_chunks:
            raise ConfigError(
                f"layers >= pp*virtual_stages is required: {model.layers} < "
                f"{self.pp}*{self.virtual_stages} = {self.num_chunks}"
            )
        if self.stage_layers is not None and sum(self.stage_layers) != model.layers:
            raise ConfigError(
                f"stage_layers sum to {sum(self.stage_layers)}; the model has {model.layers} layers"
            )
        per_replica = self.dp * self.micro_batch
        if training.global_batch % per_replica:
            raise ConfigError(
                f"global_batch must be a multiple of dp*micro_batch: {training.global_batch} % "
                f"({self.dp}*{self.micro_batch}) = {training.global_batch % per_replica}"
            )
        m = self.num_micro_batches(training)
        if self.schedule is not Schedule.GPIPE and m < self.pp:
            raise ConfigError(
                f"{self.schedule.value} needs micro-batches >= pp: global_batch/(dp*micro_batch) = "
                f"{training.global_batch}/({self.dp}*{self.micro_batch}) = {m} < pp={self.pp}"
            )
        if self.schedule is Schedule.INTERLEAVED and m % self.pp:
            raise ConfigError(
                f"interleaved needs micro-batches ({m}) to be a multiple of pp ({self.pp})"
            )
        if self.zero > 0 and self.dp_cp < 2:
            over = "dp" if self.cp == 1 else "dp*cp"
            raise ConfigError(f"zero={self.zero} shards over {over} and needs {over} >= 2")
        self._validate_cp(model, training)
        if self.ep > 1:
            if model.moe is None:
                raise ConfigError(f"ep={self.ep} needs a Mixture-of-Experts model; use ep=1")
            if self.cp > 1:
                # the executor's EP mesh (pp, edp, ep, tp) has no cp axis yet
                raise ConfigError(f"ep={self.ep} with cp={self.cp} is not supported yet; use cp=1")
            if self.dp % self.ep:
                raise ConfigError(
                    f"ep={self.ep} must divide dp={self.dp} (expert-parallel groups are drawn "
                    "from the data-parallel ranks)"
                )
            if model.moe.experts % self.ep:
                raise ConfigError(f"ep={self.ep} must divide moe.experts={model.moe.experts}")
        if self.rank_to_gpu is not None and sorted(self.rank_to_gpu) != list(range(n)):
            raise ConfigError(f"rank_to_gpu must use every GPU id 0..{n - 1} exactly once")

    def _validate_cp(self, model: ModelSpec, training: TrainingSpec) -> None:
        """Context parallelism's rules: the load-balanced layout cuts each sequence into 2*cp
        equal chunks, and sequence parallelism then shards a rank's 2 chunks over tp."""
        kind = self.cp_attention
        if kind not in EXECUTOR_CP.supported:
            runs = "|".join(k.value for k in EXECUTOR_CP.supported)
            raise ConfigError(
                f"cp_attention={kind.value} is priced but not run by the executor; use {runs}"
            )
        if self.cp == 1:
            if kind is not CpAttention.ALL_GATHER_KV:
                raise ConfigError(f"cp_attention={kind.value} needs cp > 1")
            return
        if kind is CpAttention.ULYSSES and not ulysses_fits(model, self.tp, self.cp):
            raise ConfigError(
                f"cp_attention=ulysses needs cp={self.cp} to divide the heads and KV heads per "
                f"TP rank ({model.heads}/{self.tp}, {model.kv_heads}/{self.tp}); use all_gather_kv"
            )
        s = training.seq_len
        if s % (2 * self.cp):
            raise ConfigError(
                f"cp={self.cp} needs seq_len divisible by 2*cp (load-balanced causal chunks): "
                f"{s} % {2 * self.cp} = {s % (2 * self.cp)}"
            )
        if self.sequence_parallel and (s // self.cp) % self.tp:
            raise ConfigError(
                f"sequence_parallel with cp={self.cp} needs tp={self.tp} to divide "
                f"seq_len/cp = {s // self.cp}"
            )
