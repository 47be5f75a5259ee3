"""The search end to end: exact top-k, fitting plans, determinism, infeasibility, the expert check."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import presets
from planner.cost.estimate import estimate, split_problem
from planner.errors import ConfigError, NoFeasiblePlan
from planner.ilp import solve_split
from planner.parallel import Schedule
from planner.plan import build_plan, plan_to_json
from planner.search import SearchOptions, enumerate_configs, search
from planner.specs import TrainingSpec


def _check_plans(result, model, training, cluster) -> None:
    times = [p.estimate.step_time_s for p in result.plans]
    assert times == sorted(times)
    for p in result.plans:
        c, e = p.config, p.estimate
        assert c.tp * c.pp * c.dp == cluster.num_gpus
        c.validate(model, training, cluster)
        assert e.fits and e.peak_memory_bytes <= e.memory_capacity_bytes
        assert all(s.memory_bytes <= s.capacity_bytes for s in e.stages)
        assert sum(c.stage_layers) == model.layers
        assert e.step_time_s >= p.step_lower_bound_s * (1 - 1e-12)
    assert result.candidates_pruned + result.candidates_evaluated <= result.candidates_considered


def test_branch_and_bound_finds_the_brute_force_top_k() -> None:
    """Every candidate split by its own ILP (no cache) and priced in full gives the same top 3
    as the pruned search. Memory-tight (4 GiB workers), so memory pruning and the dominance
    skipping are exercised too."""
    model = presets.load_model("gpt3-1.3b")
    cluster = presets.load_cluster("cpu-8", 2)
    training = TrainingSpec(global_batch=16, seq_len=512)
    result = search(model, training, cluster, SearchOptions(top_k=3))
    _check_plans(result, model, training, cluster)
    assert result.pruned_by["memory"] > 0 and result.pruned_by["bound"] > 0
    configs, _ = enumerate_configs(model, training, cluster, SearchOptions())
    priced = set()
    for cfg in configs:
        solved = solve_split(split_problem(model, training, cluster, cfg), 10)
        if solved.has_split:
            est = estimate(model, training, cluster, replace(cfg, stage_layers=solved.split))
            if est.fits:
                priced.add((est.step_time_s, est.peak_memory_bytes))
    expected = sorted(priced)[:3]
    got = [(p.estimate.step_time_s, p.estimate.peak_memory_bytes) for p in result.plans]
    assert got == expected


@settings(max_examples=8, deadline=None)
@given(
    model=st.sampled_from(["tiny-gpt", "tiny-llama", "gpt3-1.3b"]),
    node=st.sampled_from(["dgx-a100-80gb", "pcie-l40s", "cpu-8"]),
    nodes=st.integers(1, 2),
    batch_mult=st.sampled_from([1, 2, 4]),
)
def test_returned_plans_fit_and_multiply_to_the_world(model, node, nodes, batch_mult) -> None:
    m = presets.load_model(model)
    cluster = presets.load_cluster(node, nodes)
    training = TrainingSpec(
        global_batch=cluster.num_gpus * batch_mult, seq_len=min(512, m.max_seq_len)
    )
    try:
        result = search(m, training, cluster, SearchOptions(top_k=3))
    except NoFeasiblePlan as e:
        assert "binding constraint" in str(e)
        return
    _check_plans(result, m, training, cluster)


def test_same_inputs_same_plan_bytes() -> None:
    model = presets.load_model("gpt3-1.3b")
    cluster = presets.load_cluster("dgx-a100-80gb", 2)
    training = TrainingSpec(global_batch=64, seq_len=2048)
    texts = []
    for _ in range(2):
        best = search(model, training, cluster, SearchOptions(top_k=2)).plans[0]
        plan = build_plan(
            model=model,
            training=training,
            cluster=cluster,
            config=best.config,
            prediction=best.estimate.to_json(),
            source=best.estimate.source,
        )
        texts.append(plan_to_json(plan))
    assert texts[0] == texts[1]
    assert "search_time_s" not in texts[0]


def test_nothing_fits_names_memory_and_what_would_fit() -> None:
    model = presets.load_model("llama3-70b")
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    training = TrainingSpec(global_batch=16, seq_len=4096)
    with pytest.raises(NoFeasiblePlan) as err:
        search(model, training, cluster)
    msg = str(err.value)
    assert "binding constraint: memory" in msg and "GiB per GPU" in msg
    assert "nodes (" in msg and "\n" not in msg
    assert err.value.exit_code == 3


def test_no_valid_config_names_the_rule() -> None:
    model = presets.load_model("gpt3-13b")
    cluster = presets.load_cluster("dgx-a100-80gb", 1)
    training = TrainingSpec(global_batch=64, seq_len=2048)
    with pytest.raises(ConfigError, match="binding constraint: tp=3 must divide heads=40"):
        search(model, training, cluster, SearchOptions(fix={"tp": 3}))


def test_time_budget_stops_early_but_returns_the_best_so_far() -> None:
    model = presets.load_model("gpt3-1.3b")
    cluster = presets.load_cluster("dgx-a100-80gb", 2)
    training = TrainingSpec(global_batch=64, seq_len=2048)
    result = search(model, training, cluster, SearchOptions(top_k=3, max_time_s=1e-6))
    assert not result.complete and result.pruned_by["budget"] > 0
    assert len(result.plans) >= 1 and result.plans[0].estimate.fits
    full = search(model, training, cluster, SearchOptions(top_k=3))
    assert full.complete and full.pruned_by["budget"] == 0


def test_fix_pins_the_winner() -> None:
    model = presets.load_model("gpt3-1.3b")
    cluster = presets.load_cluster("dgx-a100-80gb", 2)
    training = TrainingSpec(global_batch=64, seq_len=2048)
    result = search(
        model,
        training,
        cluster,
        SearchOptions(top_k=2, fix={"pp": 2, "schedule": Schedule.INTERLEAVED}),
    )
    assert all(p.config.pp == 2 and p.config.schedule is Schedule.INTERLEAVED for p in result.plans)


def test_search_beats_the_expert_config_for_gpt3_175b() -> None:
    """Done-when: gpt3-175b, 128 x DGX A100-80GB, batch 1536, seq 2048: the chosen plan's
    predicted throughput is at least that of Narayanan et al. 2021's hand-tuned tp=8, pp=8,
    micro-batch 1, interleaved. The expert's remaining knobs (v, recompute, sequence
    parallel, ZeRO-1) are given their best fitting values (a search with those four pinned),
    and also the balanced split, so the comparison is against the strongest expert variant."""
    model = presets.load_model("gpt3-175b")
    cluster = presets.load_cluster("dgx-a100-80gb", 128)
    training = TrainingSpec(global_batch=1536, seq_len=2048)
    ours = search(model, training, cluster, SearchOptions(top_k=1)).plans[0]
    pinned = {"tp": 8, "pp": 8, "micro_batch": 1, "schedule": Schedule.INTERLEAVED}
    expert = search(model, training, cluster, SearchOptions(top_k=1, fix=pinned)).plans[0]
    balanced = estimate(model, training, cluster, replace(expert.config, stage_layers=None))
    assert expert.config.dp == 16 and expert.estimate.fits
    assert ours.estimate.tokens_per_s >= expert.estimate.tokens_per_s
    assert ours.estimate.tokens_per_s >= balanced.tokens_per_s
    assert ours.estimate.fits
    # Done-when of the runtime-parity issue: the executor (unfused norms, FSDP2's fp32
    # gradient accumulation) is not predicted above what Megatron published on A100s
    assert ours.estimate.mfu <= 0.55


def test_cli_json_and_plan_file(tmp_path, capsys) -> None:
    from cli.main import main
    from planner.plan import load_plan

    out = tmp_path / "plan.json"
    args = [
        "plan",
        "--model",
        "gpt3-1.3b",
        "--cluster",
        "dgx-a100-80gb",
        "--nodes",
        "1",
        "--global-batch",
        "32",
        "--seq-len",
        "2048",
        "--top",
        "3",
        "--json",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"plans", "candidates_considered", "candidates_pruned", "search_time_s"} <= set(data)
    assert 1 <= len(data["plans"]) <= 3
    first = data["plans"][0]
    assert set(first["config"]) >= {
        "tp",
        "pp",
        "dp",
        "micro_batch",
        "schedule",
        "virtual_stages",
        "recompute",
        "sequence_parallel",
        "zero",
    }
    assert {"step_time_s", "tokens_per_s", "mfu", "breakdown", "memory_breakdown", "fits"} <= set(
        first
    )
    plan = load_plan(out)
    assert plan.config.tp == first["config"]["tp"] and plan.provenance.source == "analytic"
    first_bytes = out.read_bytes()
    assert main(args) == 0
    capsys.readouterr()
    assert out.read_bytes() == first_bytes


def test_cli_errors_are_one_line(capsys) -> None:
    from cli.main import main

    base = ["plan", "--model", "gpt3-13b", "--cluster", "dgx-a100-80gb", "--nodes", "1"]
    base += ["--global-batch", "64", "--seq-len", "2048"]
    assert main([*base, "--fix", "tpp=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown field 'tpp'" in err[0]
    assert main([*base, "--allow", "everything"]) == 2
    assert "use any of tp,zero,gpipe" in capsys.readouterr().err
    # a pin that breaks a structural rule is bad input (2), not "nothing fits" (3)
    assert main([*base, "--fix", "tp=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no valid parallel configuration")


def test_cli_human_output_has_table_split_and_reason(capsys) -> None:
    from cli.main import main

    args = ["plan", "--model", "gpt3-1.3b", "--cluster", "dgx-a100-80gb", "--nodes", "2"]
    args += ["--global-batch", "64", "--seq-len", "2048", "--top", "3", "--fix", "pp=2"]
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps prose at the console width
    assert "analytic estimate" in out and "best configurations" in out
    assert "winner's layer split" in out and "is predicted fastest" in out
    assert "runner-up" in out and "candidates considered" in out
