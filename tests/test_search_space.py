"""The search space, option parsing, and the bounds the search prunes with (on the real cost model)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

import presets
from planner.cost.estimate import estimate, split_problem
from planner.errors import SpecError
from planner.ilp import rank_layer_bounds, solve_split
from planner.parallel import Recompute, Schedule
from planner.search import _CheapBounds, needs_more_memory, step_lower_bound_s
from planner.search_space import SearchOptions, enumerate_configs, parse_allow, parse_fix
from planner.specs import TrainingSpec


@pytest.fixture(scope="module")
def gpt13b_64():
    model = presets.load_model("gpt3-13b")
    cluster = presets.load_cluster("dgx-a100-80gb", 8)
    training = TrainingSpec(global_batch=256, seq_len=2048)
    configs, _ = enumerate_configs(model, training, cluster, SearchOptions())
    return model, training, cluster, configs


def test_parse_fix_types_and_errors() -> None:
    fix = parse_fix(["tp=8,pp=4", "schedule=interleaved", "sequence-parallel=true", "zero=1"])
    assert fix == {
        "tp": 8,
        "pp": 4,
        "schedule": Schedule.INTERLEAVED,
        "sequence_parallel": True,
        "zero": 1,
    }
    with pytest.raises(SpecError, match="unknown field 'tpp'.*fixable: tp,pp"):
        parse_fix(["tpp=8"])
    with pytest.raises(SpecError, match="tp must be a positive integer"):
        parse_fix(["tp=abc"])
    with pytest.raises(SpecError, match="recompute=some: use one of none\\|selective\\|full"):
        parse_fix(["recompute=some"])
    with pytest.raises(SpecError, match="zero=4: use one of 0\\|1\\|2\\|3"):
        parse_fix(["zero=4"])
    with pytest.raises(SpecError, match="FIELD=VALUE"):
        parse_fix(["tp"])


def test_parse_allow() -> None:
    assert parse_allow("tp, zero") == frozenset({"tp", "zero"})
    assert parse_allow(None) == frozenset()
    with pytest.raises(SpecError, match="--allow 'dp' is not allowed; use any of tp,zero,gpipe"):
        parse_allow("tp,dp")


def test_space_defaults(gpt13b_64) -> None:
    model, training, cluster, configs = gpt13b_64
    assert len(configs) == len(set(configs)) > 1000
    for c in configs:
        c.validate(model, training, cluster)
        assert c.tp * c.pp * c.dp == cluster.num_gpus
        assert c.tp <= 8, "tensor parallelism stays inside a node by default"
        assert c.zero <= 1 or c.pp == 1
        assert c.schedule is not Schedule.GPIPE
        assert not c.sequence_parallel or c.tp > 1
    seen = {(c.schedule, c.virtual_stages) for c in configs if c.pp == 4}
    assert {(Schedule.INTERLEAVED, v) for v in (2, 5, 10)} <= seen


def test_allow_and_fix_widen_and_pin() -> None:
    model = presets.load_model("gpt3-6.7b")  # 32 heads: tp=16 shards it
    cluster = presets.load_cluster("dgx-a100-80gb", 8)
    training = TrainingSpec(global_batch=256, seq_len=2048)
    default, _ = enumerate_configs(model, training, cluster, SearchOptions())
    assert max(c.tp for c in default) == 8
    wide, _ = enumerate_configs(
        model, training, cluster, SearchOptions(allow=frozenset({"tp", "zero", "gpipe"}))
    )
    assert any(c.tp == 16 for c in wide)
    assert any(c.zero == 3 and c.pp > 1 for c in wide)
    assert any(c.schedule is Schedule.GPIPE for c in wide)
    pinned, _ = enumerate_configs(
        model, training, cluster, SearchOptions(fix={"tp": 16, "recompute": Recompute.FULL})
    )
    assert pinned and all(c.tp == 16 and c.recompute is Recompute.FULL for c in pinned)


def test_no_config_reasons_name_the_rule() -> None:
    model = presets.load_model("gpt3-13b")
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    training = TrainingSpec(global_batch=64, seq_len=2048)
    configs, reasons = enumerate_configs(model, training, cluster, SearchOptions(fix={"tp": 3}))
    assert not configs and "tp=3 must divide heads=40" in reasons[0]


def test_memory_dominance_holds_on_the_cost_model(gpt13b_64) -> None:
    """needs_more_memory(heavy, light) => heavy's per-rank block bounds are no larger, so
    heavy fits only if light does (what the search's skipping relies on)."""
    model, training, cluster, configs = gpt13b_64
    rng = random.Random(7)
    pairs = 0
    families: dict = {}
    for c in configs:
        families.setdefault((c.tp, c.pp, c.dp, c.schedule, c.virtual_stages), []).append(c)
    for members in sorted(families.values(), key=len, reverse=True)[:12]:
        sample = rng.sample(members, min(12, len(members)))
        for light in sample:
            for heavy in sample:
                if heavy is light or not needs_more_memory(heavy, light):
                    continue
                a = rank_layer_bounds(split_problem(model, training, cluster, heavy))
                b = rank_layer_bounds(split_problem(model, training, cluster, light))
                assert all(x <= y for x, y in zip(a, b, strict=True)), (heavy, light, a, b)
                pairs += 1
    assert pairs > 50


def test_shared_bound_equals_the_exact_bound(gpt13b_64) -> None:
    model, training, cluster, configs = gpt13b_64
    bounds = _CheapBounds(model, training, cluster, None, split_problem)
    for c in random.Random(3).sample(configs, 60):
        exact = step_lower_bound_s(split_problem(model, training, cluster, c))
        assert bounds.of(c) == pytest.approx(exact, rel=1e-12)


def test_lower_bound_never_exceeds_the_estimate(gpt13b_64) -> None:
    """The pruning is exact only if m * max rank time <= the event-simulated step time."""
    model, training, cluster, configs = gpt13b_64
    for c in random.Random(5).sample(configs, 40):
        problem = split_problem(model, training, cluster, c)
        lb = step_lower_bound_s(problem)
        assert lb <= estimate(model, training, cluster, c).step_time_s * (1 + 1e-12)
        sol = solve_split(problem, 10)
        if sol.has_split:
            planned = replace(c, stage_layers=sol.split)
            assert lb <= estimate(model, training, cluster, planned).step_time_s * (1 + 1e-12)


def test_ep_needs_moe_and_divides_dp_and_experts():
    from planner.errors import ConfigError
    from planner.parallel import ParallelConfig

    with pytest.raises(ConfigError, match="ep=2 needs a Mixture-of-Experts model"):
        ParallelConfig(tp=4, pp=1, dp=2, micro_batch=1, ep=2).validate(*_ep_setup(moe=False))
    with pytest.raises(ConfigError, match="ep=4 must divide dp=2"):
        ParallelConfig(tp=4, pp=1, dp=2, micro_batch=1, ep=4).validate(*_ep_setup(moe=True))
    ParallelConfig(tp=4, pp=1, dp=2, micro_batch=1, ep=2).validate(*_ep_setup(moe=True))


def _ep_setup(moe: bool):
    from planner.specs import ModelSpec, TrainingSpec

    model = ModelSpec(
        name="tiny-moe",
        layers=2,
        hidden=64,
        heads=4,
        kv_heads=4,
        ffn_hidden=128,
        vocab=256,
        max_seq_len=64,
        mlp="swiglu",
        norm="rmsnorm",
        position="rope",
        bias=False,
        moe={"experts": 4, "top_k": 2, "expert_ffn_hidden": 64} if moe else None,
    )
    return model, TrainingSpec(global_batch=4, seq_len=32), presets.load_cluster("dgx-a100-80gb", 1)
