"""Expert parallelism in the search: ep as a searched degree, --fix/--allow, plan outputs."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from cli_helpers import one_error

import presets
from cli.main import main
from planner.cost.estimate import estimate, split_problem
from planner.cost.memory import tp_rank_params
from planner.ilp import rank_layer_bounds, solve_split
from planner.parallel import ParallelConfig
from planner.search import _CheapBounds, needs_more_memory, search, step_lower_bound_s
from planner.search_space import SearchOptions, enumerate_configs, parse_fix
from planner.specs import ModelSpec, MoeSpec, TrainingSpec

PLAN = ["plan", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--nodes", "4",
        "--global-batch", "512", "--seq-len", "4096"]  # fmt: skip
FAST = ["--placement-budget-s", "0.5"]


def _tiny_moe() -> ModelSpec:
    return ModelSpec(
        name="tiny-moe",
        layers=4,
        hidden=64,
        heads=4,
        kv_heads=2,
        ffn_hidden=128,
        vocab=512,
        max_seq_len=128,
        mlp="swiglu",
        norm="rmsnorm",
        position="rope",
        bias=False,
        moe=MoeSpec(experts=4, top_k=2, expert_ffn_hidden=64),
    )


def _stage_weight_bytes(model: ModelSpec, cfg: ParallelConfig, rank: int) -> float:
    """bf16 weights of pipeline rank `rank` by hand: its blocks' non-expert parameters, its
    E/ep experts per block, the embedding on rank 0 and the head on the last; ZeRO-3 without
    pipelining shards the first over dp and the experts over the dp/ep expert-DP group."""
    p = tp_rank_params(model, cfg.tp, cfg.num_chunks, cfg.ep)
    layers = sum(n for k, n in enumerate(cfg.layers_per_chunk(model)) if k % cfg.pp == rank)
    dense = layers * p.per_block + (p.embedding if rank == 0 else 0)
    dense += p.head if rank == (cfg.num_chunks - 1) % cfg.pp else 0
    sharded = cfg.zero >= 3 and cfg.pp == 1
    return 2 * dense / (cfg.dp if sharded else 1) + 2 * layers * p.expert_per_block / (
        cfg.dp // cfg.ep if sharded else 1
    )


def _check_counts_every_parameter(model: ModelSpec, cfg: ParallelConfig, plan: dict) -> None:
    """The plan's weights per stage are the hand count, and the ranks of one replica (pp x ep at
    tp 1) hold the model's 46.7 B parameters exactly once."""
    for s in plan["stages"]:
        assert s["memory"]["weights"] == pytest.approx(
            _stage_weight_bytes(model, cfg, s["pp_rank"])
        )
    assert cfg.tp == 1
    p = tp_rank_params(model, 1, cfg.num_chunks, cfg.ep)
    held = model.layers * (p.per_block + cfg.ep * p.expert_per_block) + p.embedding + p.head
    assert held == model.param_count().total
    assert round(held / 1e9, 1) == 46.7


def test_plan_mixtral_on_four_nodes_offers_expert_parallelism(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The top 5 on 32 H100s include ep > 1 plans whose memory counts all 46.7 B parameters.
    (The fastest is FSDP without EP: ZeRO-3 over 32 ranks hides its gathers under two
    micro-batches of 8 sequences and has no routing imbalance; see docs/design-moe.md.)"""
    model = presets.load_model("mixtral-8x7b")
    assert main([*PLAN, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    with_ep = [p for p in doc["plans"] if p["config"].get("ep", 1) > 1]
    assert with_ep
    for p in with_ep:
        c = p["config"]
        cfg = ParallelConfig(**{k: v for k, v in c.items() if k != "rank_to_gpu"})
        assert p["breakdown"]["ep_comm_s"] > 0
        _check_counts_every_parameter(model, cfg, p)
    dense_only = [p for p in doc["plans"] if "ep" not in p["config"]]
    assert all("ep_comm_s" not in p["breakdown"] for p in dense_only)


def test_plan_with_zero_1_picks_ep_8_and_writes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ZeRO-1 (no weight gathering), expert parallelism wins: ep 8 inside each node."""
    model = presets.load_model("mixtral-8x7b")
    out = tmp_path / "plan.json"
    assert main([*PLAN, *FAST, "--fix", "zero=1", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    best = doc["plans"][0]
    assert best["config"]["ep"] == 8
    plan = json.loads(out.read_text())
    assert plan["config"]["ep"] == 8
    cfg = ParallelConfig(**{k: v for k, v in best["config"].items() if k != "rank_to_gpu"})
    _check_counts_every_parameter(model, cfg, best)
    assert main([*PLAN, *FAST, "--fix", "zero=1", "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "tp·pp·dp·ep" in text and "a2a" in text and "ep=8" in text


def test_dense_plan_json_has_no_ep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    args = ["plan", "--model", "tiny-gpt", "--cluster", "dgx-h100", "--global-batch", "8"]
    assert main([*args, "--seq-len", "64", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all("ep" not in p["config"] for p in doc["plans"])
    assert "ep" not in json.loads(out.read_text())["config"]


def test_fix_ep_pins_it_and_a_bad_ep_is_one_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*PLAN, "--fix", "ep=4", "--top", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {p["config"]["ep"] for p in doc["plans"]} == {4}
    assert main([*PLAN, "--fix", "ep=3"]) == 2
    one_error(capsys, "ep=3")
    assert parse_fix(["ep=8"]) == {"ep": 8}


def test_ep_candidates_divide_dp_and_experts_inside_a_node_unless_allowed() -> None:
    model = presets.load_model("mixtral-8x7b")
    training = TrainingSpec(global_batch=512, seq_len=4096)
    cluster = presets.load_cluster("dgx-h100", 4)
    configs, _ = enumerate_configs(model, training, cluster, SearchOptions(fix={"micro_batch": 1}))
    eps = {(c.tp, c.dp, c.ep) for c in configs}
    assert all(dp % ep == 0 and 8 % ep == 0 and 8 % (ep * tp) == 0 for tp, dp, ep in eps)
    assert {ep for _, _, ep in eps} == {1, 2, 4, 8}
    wide, _ = enumerate_configs(
        model, training, cluster, SearchOptions(fix={"micro_batch": 1}, allow=frozenset({"ep"}))
    )
    assert any(c.ep * c.tp > 8 for c in wide)
    dense = presets.load_model("llama3-8b")
    configs, _ = enumerate_configs(dense, training, cluster, SearchOptions(fix={"micro_batch": 1}))
    assert {c.ep for c in configs} == {1}


@pytest.mark.parametrize("allow", [frozenset(), frozenset({"ep"})])
def test_search_finds_the_brute_force_top_k_with_ep(allow: frozenset[str]) -> None:
    """Every candidate of a tiny MoE on two 8-worker hosts split by its own ILP and priced in
    full gives the pruned search's top 3 (the shared bounds hold with ep, also across nodes)."""
    model = _tiny_moe()
    cluster = presets.load_cluster("cpu-8", 2)
    training = TrainingSpec(global_batch=16, seq_len=128)
    options = SearchOptions(top_k=3, allow=allow, fix={"micro_batch": 1})
    result = search(model, training, cluster, options)
    configs, _ = enumerate_configs(model, training, cluster, options)
    assert any(c.ep > 1 for c in configs)
    priced = set()
    for cfg in configs:
        solved = solve_split(split_problem(model, training, cluster, cfg), 10)
        if solved.has_split:
            est = estimate(model, training, cluster, replace(cfg, stage_layers=solved.split))
            if est.fits:
                priced.add((est.step_time_s, est.peak_memory_bytes))
    got = [(p.estimate.step_time_s, p.estimate.peak_memory_bytes) for p in result.plans]
    assert got == sorted(priced)[:3]


def test_memory_dominance_and_shared_bounds_hold_with_ep() -> None:
    """needs_more_memory within a (tp, pp, dp, schedule, v, ep) family and the shared step
    bound (keyed by ep) hold on the MoE cost model, with EP groups inside and across nodes."""
    model = presets.load_model("mixtral-8x7b")
    cluster = presets.load_cluster("dgx-h100", 2)
    training = TrainingSpec(global_batch=64, seq_len=4096)
    options = SearchOptions(allow=frozenset({"ep"}))
    configs, _ = enumerate_configs(model, training, cluster, options)
    rng = random.Random(3)
    families: dict = {}
    for c in configs:
        families.setdefault((c.tp, c.pp, c.dp, c.schedule, c.virtual_stages, c.ep), []).append(c)
    pairs = 0
    for key in sorted(families, key=str)[:: max(1, len(families) // 10)]:
        sample = rng.sample(families[key], min(6, len(families[key])))
        problems = {id(c): split_problem(model, training, cluster, c) for c in sample}
        for light in sample:
            for heavy in sample:
                if heavy is light or not needs_more_memory(heavy, light):
                    continue
                a = rank_layer_bounds(problems[id(heavy)])
                b = rank_layer_bounds(problems[id(light)])
                assert all(x <= y for x, y in zip(a, b, strict=True)), (heavy, light)
                pairs += 1
    assert pairs > 0
    bounds = _CheapBounds(model, training, cluster, None, split_problem)
    for cfg in rng.sample([c for c in configs if c.ep > 1], 30):
        exact = step_lower_bound_s(split_problem(model, training, cluster, cfg))
        assert bounds.of(cfg) <= exact * (1 + 1e-9), cfg
