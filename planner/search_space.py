"""The configuration search space: options, `--allow` / `--fix` parsing and enumeration.

Owns: `SearchOptions`, `parse_allow`, `parse_fix`, `enumerate_configs` (every valid
ParallelConfig of the space described in planner/search.py's docstring) and `config_key`
(the fixed order that breaks ties deterministically).
Does not own: bounds, the branch and bound or ranking (planner/search.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from planner.cost import moe
from planner.errors import SpecError
from planner.parallel import ConfigError, ParallelConfig, Recompute, Schedule, ulysses_fits
from planner.runtime import EXECUTOR_CP, CpAttention
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

ALLOW_CHOICES: dict[str, str] = {
    "tp": "tensor parallelism across nodes (tp may be any divisor of the GPU count)",
    "zero": "ZeRO-2/3 together with pipeline parallelism",
    "gpipe": "the GPipe schedule (every micro-batch in flight)",
    "ep": "expert-parallel groups across nodes (ep may be any divisor of dp)",
    "cp": "context parallelism even when a plan fits without it (by default cp > 1 is "
    "searched only when nothing fits with cp = 1)",
}
FIXABLE: tuple[str, ...] = (
    "tp",
    "pp",
    "dp",
    "micro_batch",
    "schedule",
    "virtual_stages",
    "recompute",
    "sequence_parallel",
    "zero",
    "ep",
    "cp",
    "cp_attention",
)

RECOMPUTE_ORDER = {Recompute.NONE: 0, Recompute.SELECTIVE: 1, Recompute.FULL: 2}
SCHEDULE_ORDER = {Schedule.ONE_F_ONE_B: 0, Schedule.INTERLEAVED: 1, Schedule.GPIPE: 2}
CP_ATTENTION_ORDER = {k: i for i, k in enumerate(CpAttention)}


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """What to search. `fix` maps ParallelConfig field names to pinned values (see parse_fix)."""

    top_k: int = 5
    allow: frozenset[str] = frozenset()
    fix: Mapping[str, Any] = field(default_factory=dict)
    # Global wall-clock budget for the whole search (None: search to the end). Unit: s.
    max_time_s: float | None = None
    # Time limit of one split ILP; the ILPs here are small and solve in milliseconds. Unit: s.
    ilp_time_limit_s: float = 10.0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise SpecError(f"--top {self.top_k} must be >= 1")
        unknown = sorted(set(self.allow) - set(ALLOW_CHOICES))
        if unknown:
            raise SpecError(
                f"--allow {unknown[0]!r} is not allowed; use any of {','.join(ALLOW_CHOICES)}"
            )
        if self.max_time_s is not None and self.max_time_s <= 0:
            raise SpecError(f"--max-time-s {self.max_time_s} must be > 0")


def parse_allow(text: str | None) -> frozenset[str]:
    """`tp,zero` -> {"tp", "zero"}; unknown names raise SpecError listing the allowed ones."""
    if not text:
        return frozenset()
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in ALLOW_CHOICES:
            raise SpecError(
                f"--allow {name!r} is not allowed; use any of {','.join(ALLOW_CHOICES)}"
            )
    return frozenset(names)


def parse_fix(items: Iterable[str]) -> dict[str, Any]:
    """`["tp=8,pp=4", "schedule=interleaved"]` -> typed values; errors name field and values."""
    out: dict[str, Any] = {}
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            if "=" not in part:
                raise SpecError(
                    f"--fix {part!r}: use FIELD=VALUE with FIELD one of {','.join(FIXABLE)}"
                )
            key, value = (s.strip() for s in part.split("=", 1))
            key = key.replace("-", "_")
            if key not in FIXABLE:
                raise SpecError(
                    f"--fix {key}={value}: unknown field {key!r}; fixable: {','.join(FIXABLE)}"
                )
            out[key] = _parse_fix_value(key, value)
    return out


def _parse_fix_value(key: str, value: str) -> Any:
    if key == "schedule":
        return _enum_value(Schedule, key, value)
    if key == "recompute":
        return _enum_value(Recompute, key, value)
    if key == "cp_attention":
        return _enum_value(CpAttention, key, value)
    if key == "sequence_parallel":
        truth = {"true": True, "1": True, "yes": True, "on": True}
        falsity = {"false": False, "0": False, "no": False, "off": False}
        if value.lower() in truth | falsity:
            return {**truth, **falsity}[value.lower()]
        raise SpecError(f"--fix sequence_parallel={value}: use true|false")
    if key == "zero":
        if value not in ("0", "1", "2", "3"):
            raise SpecError(f"--fix zero={value}: use one of 0|1|2|3")
        return int(value)
    if not value.isdigit() or int(value) < 1:
        raise SpecError(f"--fix {key}={value}: {key} must be a positive integer")
    return int(value)


def _enum_value(cls: Any, key: str, value: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = "|".join(m.value for m in cls)
        raise SpecError(f"--fix {key}={value}: use one of {allowed}") from None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _gpus_per_node(cluster: ClusterSpec) -> int:
    g = 0
    for node in cluster.nodes:
        g = math.gcd(g, node.gpus)
    return g


def config_key(c: ParallelConfig) -> tuple[Any, ...]:
    """A total order of configurations used to break exact ties deterministically."""
    return (
        c.pp,
        c.tp,
        c.dp,
        c.micro_batch,
        SCHEDULE_ORDER[c.schedule],
        c.virtual_stages,
        RECOMPUTE_ORDER[c.recompute],
        c.sequence_parallel,
        c.zero,
        c.ep,
        c.cp,
        CP_ATTENTION_ORDER[c.cp_attention],
    )


def enumerate_configs(
    model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec, options: SearchOptions
) -> tuple[list[ParallelConfig], list[str]]:
    """Every valid configuration of the search space (deterministic order), and the reasons
    the rejected (tp, pp, dp) combinations broke (used when nothing is valid)."""
    fix, allow = options.fix, options.allow
    world, gpn, L, B = (
        cluster.num_gpus,
        _gpus_per_node(cluster),
        model.layers,
        training.global_batch,
    )
    out: list[ParallelConfig] = []
    reasons: list[str] = []
    moe.check_priceable(model)
    tps = _divisors(world) if "tp" in allow else _divisors(gpn)
    for tp, cp, kind in _tp_cp(fix, allow, tps, world, model, training):
        rule = model.tp_divisible(tp)
        if world % tp or rule:
            reasons.append(rule or f"tp={tp} must divide the GPU count {world}")
            continue
        if (world // tp) % cp:
            reasons.append(f"tp*cp={tp}*{cp} must divide the GPU count {world}")
            continue
        rest = world // (tp * cp)
        for pp in _pick(fix, "pp", [p for p in _divisors(rest) if p <= L]):
            if rest % pp:
                what = f"tp*pp={tp}*{pp}" if cp == 1 else f"tp*pp*cp={tp}*{pp}*{cp}"
                reasons.append(f"{what} must divide the GPU count {world}")
                continue
            dp = rest // pp
            if "dp" in fix and fix["dp"] != dp:
                reasons.append(f"dp={fix['dp']} needs tp*pp = {world}/{fix['dp']}, not {tp}*{pp}")
                continue
            if B % dp:
                reasons.append(f"global_batch={B} must be a multiple of dp={dp} (tp={tp}, pp={pp})")
                continue
            for mb in _pick(fix, "micro_batch", _divisors(B // dp)):
                for schedule, v in _schedules(fix, allow, pp, L):
                    for recompute in _pick(fix, "recompute", list(Recompute)):
                        for sp in _pick(
                            fix, "sequence_parallel", [False, True] if tp > 1 else [False]
                        ):
                            for zero in _pick(fix, "zero", _zeros(allow, pp, dp * cp)):
                                for ep in _pick(
                                    fix, "ep", _eps(model, dp, tp, gpn, allow) if cp == 1 else [1]
                                ):
                                    try:
                                        cfg = ParallelConfig(
                                            tp=tp,
                                            pp=pp,
                                            dp=dp,
                                            micro_batch=mb,
                                            schedule=schedule,
                                            virtual_stages=v,
                                            recompute=recompute,
                                            sequence_parallel=sp,
                                            zero=zero,
                                            ep=ep,
                                            cp=cp,
                                            cp_attention=kind,
                                        )
                                        cfg.validate(model, training, cluster)
                                    except ConfigError as e:
                                        reasons.append(str(e))
                                        continue
                                    out.append(cfg)
    return out, reasons


def _tp_cp(
    fix: Mapping[str, Any],
    allow: frozenset[str],
    tps: list[int],
    world: int,
    model: ModelSpec,
    training: TrainingSpec,
) -> list[tuple[int, int, CpAttention]]:
    """(tp, cp) pairs: with `allow cp`, cp over the divisors of GPUs/tp that the load-balanced
    layout can cut the sequence into (seq_len divisible by 2*cp), 1 always; else cp = 1."""
    out = []
    for tp in _pick(fix, "tp", tps):
        rest = world // tp if world % tp == 0 else 1
        cps = [1] + [c for c in _divisors(rest) if c > 1 and training.seq_len % (2 * c) == 0]
        for cp in _pick(fix, "cp", cps if "cp" in allow else [1]):
            for kind in _pick(fix, "cp_attention", _cp_attentions(model, tp, cp)):
                out.append((tp, cp, kind))
    return out


def _cp_attentions(model: ModelSpec, tp: int, cp: int) -> list[CpAttention]:
    """The CP attentions the executor runs that fit this model at (tp, cp): all-gather always,
    Ulysses when cp divides the heads and KV heads per TP rank."""
    if cp == 1:
        return [CpAttention.ALL_GATHER_KV]
    return [
        k
        for k in EXECUTOR_CP.supported
        if k is not CpAttention.ULYSSES or ulysses_fits(model, tp, cp)
    ]


def _pick(fix: Mapping[str, Any], name: str, default: list[Any]) -> list[Any]:
    """The fixed value alone (even outside the default range: a pin is an explicit request)."""
    return [fix[name]] if name in fix else default


def _schedules(
    fix: Mapping[str, Any], allow: frozenset[str], pp: int, layers: int
) -> list[tuple[Schedule, int]]:
    """(schedule, v) pairs; validate() then checks the micro-batch rules with exact messages."""
    out: list[tuple[Schedule, int]] = [(Schedule.ONE_F_ONE_B, 1)]
    if pp > 1:
        vs = [v for v in _divisors(layers // pp) if v >= 2]
        if "virtual_stages" in fix:
            vs = [fix["virtual_stages"]] if fix["virtual_stages"] >= 2 else []
        out += [(Schedule.INTERLEAVED, v) for v in vs]
    if "gpipe" in allow or fix.get("schedule") is Schedule.GPIPE:
        out.append((Schedule.GPIPE, 1))
    if "schedule" in fix:
        out = [s for s in out if s[0] is fix["schedule"]]
    if "virtual_stages" in fix:
        out = [s for s in out if s[1] == fix["virtual_stages"]]
    return out


def _eps(model: ModelSpec, dp: int, tp: int, gpn: int, allow: frozenset[str]) -> list[int]:
    """Expert-parallel degrees: the divisors of dp that divide the expert count (1 if dense),
    by default only those whose group (ep * tp consecutive GPUs) fits inside one node, where
    the all-to-all runs on the fast intra-node links (`allow ep`: across nodes too)."""
    if model.moe is None:
        return [1]
    eps = [e for e in _divisors(dp) if model.moe.experts % e == 0]
    return eps if "ep" in allow else [e for e in eps if gpn % (e * tp) == 0]


def _zeros(allow: frozenset[str], pp: int, dp: int) -> list[int]:
    if dp < 2:
        return [0]
    return [0, 1, 2, 3] if pp == 1 or "zero" in allow else [0, 1]
