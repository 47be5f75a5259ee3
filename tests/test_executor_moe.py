"""Mixture-of-Experts executor tests on CPU/gloo: parameter counts, routing and the
load-balancing loss on one process; expert-parallel layouts (with FSDP, TP, pipelining, a DCP
resume) against a single process; an ep=2 plan run by `python -m executor.train` under torchrun.

Tolerance: the same 1e-5 on fp32 losses as tests/test_executor_parallel.py. Layouts compute the
same sums in other orders (an expert's GEMM over rows from several ranks, FSDP's reductions,
tp partial sums), a few float32 ulps per step that 5 AdamW steps keep far below 1e-5; a
routing change (a token's top-k flipping) moves the loss by far more, so the tolerance also
checks that every layout routes every token alike.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from executor_shapes import GPT, LLAMA
from test_e2e_quickstart import _free_port
from test_executor_parallel import SPAWN_TIMEOUT_S, _max_diff, _plan, _reference, _report, _spawn
from torch.distributed.tensor import DTensor

from executor.data import local_batch, make_source
from executor.device import make_runtime
from executor.mesh import build_mesh, init_distributed
from executor.model import Transformer, TransformerBlock, canonical_name, init_weights, loss_fn
from executor.moe import AUX_LOSS_COEF, MoE, aux_loss, route
from executor.parallelize import parallelize
from executor.train import _local_step
from planner.plan import Plan, load_plan
from planner.specs import Dtype, MoeSpec

# 4 experts of top-2 with a shared expert and Qwen2-MoE's gate; block 0 dense (dense-first).
MOE = MoeSpec(
    experts=4,
    top_k=2,
    expert_ffn_hidden=16,
    shared_experts=1,
    shared_expert_gate=True,
    dense_layers=1,
)
LLAMA_MOE = replace(LLAMA, name="tiny-llama-moe", moe=MOE)
GPT_MOE = replace(
    GPT,
    name="tiny-gpt-moe",
    moe=MoeSpec(experts=4, top_k=1, expert_ffn_hidden=16, layer_interval=2),
)

SHAPES = {
    "llama-moe": LLAMA_MOE,
    "gpt-moe-top1-interleaved-bias": GPT_MOE,
    "mixtral-like": replace(LLAMA, moe=MoeSpec(experts=8, top_k=2, expert_ffn_hidden=24)),
    "deepseek-like-2-shared": replace(
        LLAMA, moe=MoeSpec(experts=8, top_k=3, expert_ffn_hidden=8, shared_experts=2)
    ),
    "gpt-moe-shared-bias": replace(
        GPT, moe=MoeSpec(experts=4, top_k=2, expert_ffn_hidden=16, shared_experts=2)
    ),
}


@pytest.mark.parametrize("name", SHAPES)
def test_moe_param_count_matches_planner_exactly(name: str) -> None:
    spec = SHAPES[name]
    with torch.device("meta"):
        model = Transformer(spec)
    pc = spec.param_count()
    assert sum(p.numel() for p in model.parameters()) == pc.total
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert routed == pc.routed_experts
    kinds = [isinstance(b.feed_forward, MoE) for b in model.layers.values()]
    assert kinds == [spec.moe.is_moe_layer(i) for i in range(spec.layers)]


def test_routing_renormalises_top_k_and_keeps_top_1_probability() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    probs, w2, ids2 = route(logits, 2)
    assert torch.allclose(w2.sum(-1), torch.ones(2)) and ids2[:, 0].tolist() == [0, 2]
    _, w1, _ = route(logits, 1)
    assert torch.allclose(w1[:, 0], probs.max(-1).values)  # Switch: no renormalisation


def test_aux_loss_is_coefficient_when_balanced_and_larger_when_not() -> None:
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert float(aux_loss(uniform, balanced)) == pytest.approx(AUX_LOSS_COEF)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    # Every token to expert 0 at p = 0.7: alpha * 4 * (1 * 0.7) = 2.8 alpha.
    assert float(aux_loss(skewed, torch.tensor([[0]] * 8))) == pytest.approx(2.8 * AUX_LOSS_COEF)


def test_aux_loss_trains_the_router_and_is_recorded_once_under_full_recompute() -> None:
    from executor.activation_checkpoint import apply_ac

    block = TransformerBlock(LLAMA_MOE, 1)
    init_weights(block, seed=0, prefix="layers.1.")
    apply_ac(block, "full")
    moe = block.feed_forward
    assert isinstance(moe, MoE)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    block(x).sum().backward()  # an output whose gradient w.r.t. routing is not what trains
    assert len(moe.pop_aux_losses()) == 1
    with_aux = moe.router.weight.grad.clone()
    moe.router.weight.grad = None
    moe.aux_grad_scale = 0.0
    block(x).sum().backward()
    assert not torch.allclose(with_aux, moe.router.weight.grad)


def test_single_process_moe_loss_falls() -> None:
    torch.manual_seed(0)
    model = Transformer(LLAMA_MOE)
    init_weights(model, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(model(tokens), tokens)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses


def test_mfu_counts_the_active_experts_only() -> None:
    from executor.metrics import model_flops_per_token

    spec = SHAPES["mixtral-like"]
    pc = spec.param_count()
    dense_part = 6.0 * (pc.blocks - pc.routed_experts + spec.vocab * spec.hidden)
    attention = 12.0 * spec.layers * spec.heads * spec.head_dim * 16
    assert model_flops_per_token(spec, 16) == dense_part + 6.0 * pc.routed_active + attention
    assert pc.routed_active * spec.moe.experts == pc.routed_experts * spec.moe.top_k


@pytest.mark.slow
def test_expert_parallel_layouts_match_single_process(tmp_path: Path) -> None:
    """4 processes: ep2 over dp4 (ZeRO-3, and ZeRO-0 with full recompute: the all-to-alls run
    again in backward), ep2 with tp2 (+SP), ep2 with pp2 (1F1B),
    and resumes from step 3's DCP checkpoint under the same and another plan, each against
    one process."""
    ref = _reference(_plan(tmp_path, "ref", LLAMA_MOE, 1, tp=1, pp=1, dp=1, micro_batch=2))
    ckpt = str(tmp_path / "ckpt")
    cases = [
        dict(
            name="ep2-dp4-zero3",
            plan=_plan(
                tmp_path, "ep2dp4", LLAMA_MOE, 4, tp=1, pp=1, dp=4, ep=2, micro_batch=2, zero=3
            ),
            opts=dict(checkpoint_dir=ckpt, checkpoint_every=3),
        ),
        dict(
            name="ep2-dp4-zero0-full-recompute",
            plan=_plan(
                tmp_path,
                "z0",
                LLAMA_MOE,
                4,
                tp=1,
                pp=1,
                dp=4,
                ep=2,
                micro_batch=2,
                zero=0,
                recompute="full",
            ),
        ),
        dict(
            name="ep2-tp2-sp",
            plan=_plan(
                tmp_path,
                "tp2",
                LLAMA_MOE,
                4,
                tp=2,
                pp=1,
                dp=2,
                ep=2,
                micro_batch=2,
                zero=2,
                sequence_parallel=True,
            ),
        ),
        dict(
            name="ep2-pp2-1f1b",
            plan=_plan(
                tmp_path, "pp2", LLAMA_MOE, 4, tp=1, pp=2, dp=2, ep=2, micro_batch=2, zero=1
            ),
        ),
        dict(
            name="resume-ep2-dp4",
            plan=_plan(
                tmp_path, "ep2dp4", LLAMA_MOE, 4, tp=1, pp=1, dp=4, ep=2, micro_batch=2, zero=3
            ),
            opts=dict(checkpoint_dir=ckpt, resume=True),
        ),
        # DCP reshards on load: the experts saved as ep2 x edp2 shards load as ep2 x tp2.
        dict(
            name="resume-ep2-tp2-from-ep2-dp4",
            plan=_plan(
                tmp_path, "rtp2", LLAMA_MOE, 4, tp=2, pp=1, dp=2, ep=2, micro_batch=2, zero=1
            ),
            opts=dict(checkpoint_dir=ckpt, resume=True),
        ),
    ]
    got = _spawn(4, cases, tmp_path)
    diffs = {}
    for c in cases:
        want = ref[3:] if c["name"].startswith("resume") else ref
        diffs[c["name"]] = _max_diff(c["name"], got[c["name"]], want)
    _report(diffs)
    assert got["resume-ep2-dp4"] == got["ep2-dp4-zero3"][3:]


def _one_step_grads(plan: Plan) -> dict[str, torch.Tensor]:
    """Full gradients of this rank's parameters after train.py's forward/backward of step 0."""
    rt = make_runtime("cpu", local_rank=0, local_world_size=1, dtype=plan.training.dtype)
    mesh = build_mesh(plan, "cpu")
    model = parallelize(plan, mesh, rt, seed=0)
    t = plan.training
    source = make_source(
        "synthetic", vocab=plan.model.vocab, seq_len=t.seq_len, batch=t.global_batch, seed=0
    )
    x, y = local_batch(source, 0, dp=plan.config.dp, dp_rank=mesh.dp_rank, device=rt.device)
    _local_step(model, x, y, plan.num_micro_batches, plan.config.tp, plan.config.zero, rt)
    grads = {}
    for module in model.modules:
        for name, p in module.named_parameters():
            g = p.grad
            grads[canonical_name(name)] = g.full_tensor() if isinstance(g, DTensor) else g
    return grads


def _grad_worker(gpu_id: int, world: int, plans: list[str], out: str) -> None:
    """Each plan in a fresh process group; the ranks at dp = tp = 0 save their gradients."""
    torch.set_num_threads(1)
    for i, path in enumerate(plans):
        plan = load_plan(path)
        init_distributed(plan, "gloo", gpu_id=gpu_id, store=dist.FileStore(f"{out}.{i}", world))
        try:
            grads = _one_step_grads(plan)
            if dist.get_rank() in {e.rank for e in plan.ranks if e.dp == 0 and e.tp == 0}:
                torch.save(grads, f"{out}.{i}.{dist.get_rank()}.pt")
        finally:
            dist.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_gradients_match_single_process(tmp_path: Path) -> None:
    """AdamW hides a gradient scale (losses match even with expert gradients ep times too
    large), so compare one step's gradients of every parameter with one process's."""
    ref_plan = _plan(tmp_path, "ref", LLAMA_MOE, 1, tp=1, pp=1, dp=1, micro_batch=2)
    _grad_worker(0, 1, [str(ref_plan)], str(tmp_path / "ref"))
    want = torch.load(tmp_path / "ref.0.0.pt")
    plans = [
        # ep = 1: experts are ordinary parameters of their block's FSDP unit.
        _plan(tmp_path, "g-ep1-dp4", LLAMA_MOE, 4, tp=1, pp=1, dp=4, micro_batch=2, zero=2),
        _plan(tmp_path, "g-dp4", LLAMA_MOE, 4, tp=1, pp=1, dp=4, ep=2, micro_batch=2, zero=3),
        _plan(tmp_path, "g-dp4-z0", LLAMA_MOE, 4, tp=1, pp=1, dp=4, ep=2, micro_batch=2, zero=0),
        _plan(tmp_path, "g-tp2", LLAMA_MOE, 4, tp=2, pp=1, dp=2, ep=2, micro_batch=2, zero=0),
        _plan(
            tmp_path,
            "g-tp2-sp",
            LLAMA_MOE,
            4,
            tp=2,
            pp=1,
            dp=2,
            ep=2,
            micro_batch=2,
            zero=3,
            sequence_parallel=True,
        ),
        _plan(tmp_path, "g-pp2", LLAMA_MOE, 4, tp=1, pp=2, dp=2, ep=2, micro_batch=2, zero=2),
    ]
    # ep = 1 with tp = 2 (experts TP-sharded DTensors) in processes of its own: a later process
    # group whose tp sub-mesh repeats an earlier group's layout meets DTensor's stale
    # per-layout caches (a test-only effect: real runs start one plan per process).
    alone = _plan(tmp_path, "g-ep1-tp2", LLAMA_MOE, 2, tp=2, pp=1, dp=1, micro_batch=2)
    runs = [(4, plans, tmp_path / "g"), (2, [alone], tmp_path / "h")]
    for world, group, out in runs:
        _spawn_grads(world, [str(p) for p in group], str(out))
    for _, group, out in runs:
        for i, plan_path in enumerate(group):
            got: dict[str, torch.Tensor] = {}
            for f in tmp_path.glob(f"{out.name}.{i}.*.pt"):
                got |= torch.load(f)
            assert set(got) == set(want), plan_path.name
            bad = [n for n in want if not torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-7)]
            ratios = {n: float(got[n].norm() / want[n].norm()) for n in bad}
            assert not bad, f"{plan_path.name}: gradients differ (norm ratios) {ratios}"


def _spawn_grads(world: int, plans: list[str], out: str) -> None:
    ctx = mp.start_processes(
        _grad_worker, args=(world, plans, out), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-process gradient run did not finish in {SPAWN_TIMEOUT_S} s")


@pytest.mark.slow
def test_ep2_plan_emitted_and_run_trains(tmp_path: Path) -> None:
    """`meshplan plan --fix ep=2` of a tiny MoE on 4 CPU workers writes plan.json with ep=2,
    `meshplan emit` and the emitted launch/node0.sh run it as the quick start runs it
    (torchrun -> `python -m executor.train --plan plan.json`, 4 processes): the loss falls and
    the load-balancing loss is logged."""
    (tmp_path / "moe.yaml").write_text(
        "{family: gpt, layers: 2, hidden: 64, heads: 4, ffn_hidden: 256, vocab: 512,"
        " max_seq_len: 128, moe: {experts: 4, top_k: 1, expert_ffn_hidden: 16}}\n"
    )
    (tmp_path / "cluster.yaml").write_text(
        "name: cpu-4\nnode_types:\n  w4:\n    gpu: cpu-worker\n    gpus: 4\n"
        "    intra_link: {name: loopback, bandwidth_gb_per_s: 2, latency_us: 30}\n"
        "    nic: {name: tcp, bandwidth_gb_per_s: 1, latency_us: 50}\n"
        "nodes:\n  - {type: w4}\n"
    )
    planned = subprocess.run(
        [sys.executable, "-m", "cli", "plan", "--model", "moe.yaml", "--cluster", "cluster.yaml",
         "--global-batch", "8", "--seq-len", "16", "--dtype", "fp32",
         "--fix", "ep=2,tp=1,pp=1,micro_batch=2,zero=2", "--out", "plan.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert json.loads((tmp_path / "plan.json").read_text())["config"]["ep"] == 2
    emit = subprocess.run(
        [sys.executable, "-m", "cli", "emit", "plan.json", "--out", "launch", "--steps", "8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert emit.returncode == 0, emit.stderr[-2000:]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MESHPLAN_RDZV_ENDPOINT": f"localhost:{_free_port()}"}
    metrics = tmp_path / "m.jsonl"
    run = subprocess.run(
        ["bash", str(tmp_path / "launch" / "node0.sh"), "--lr", "3e-3", "--metrics", str(metrics)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    # Two MoE layers, each near alpha (its value at balanced routing) at this tiny scale.
    assert all(AUX_LOSS_COEF < r["aux_loss"] < 4 * AUX_LOSS_COEF for r in rows), rows


def _memcheck_real_and_fake(plan_path: str) -> tuple[int, int]:
    from executor.memcheck import measure_rank

    torch.set_num_threads(1)
    plan = load_plan(plan_path)
    real = measure_rank(plan, 0, steps=2, fake=False)
    fake = measure_rank(plan, 0, steps=2)
    return real.peak[0], fake.peak[0]


@pytest.mark.slow
def test_memcheck_runs_an_ep2_plan_on_fake_tensors(tmp_path: Path) -> None:
    """memcheck (fake tensors, balanced routing) of an ep2 x tp2 plan measures what the same
    plan allocates on real tensors under the same balanced routing."""
    plan = _plan(tmp_path, "mc", LLAMA_MOE, 4, tp=2, pp=1, dp=2, ep=2, micro_batch=2, zero=3)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        real, fake = pool.submit(_memcheck_real_and_fake, str(plan)).result(timeout=600)
    assert real > 0 and abs(fake - real) <= 0.001 * real, (real, fake)


@pytest.mark.parametrize("tp", [1, 2])
def test_profiler_times_the_moe_block_at_balanced_routing(tp: int) -> None:
    """The profile's transformer_block of an MoE model is its MoE block (block 1 here; block 0
    is dense) at the tp shard, every expert running T*k/E rows."""
    from planner.profile import BlockKind
    from profiler.compute import ComputeCase, ComputeSettings, build_block, measure_case

    case = ComputeCase(block=BlockKind.TRANSFORMER_BLOCK, tp=tp, micro_batch=2, recompute="none")
    block = build_block(LLAMA_MOE, case, torch.device("cpu"), Dtype.FP32)
    moe = block.feed_forward
    assert isinstance(moe, MoE) and moe.experts.w1.weight.shape[-1] == 16 // tp
    seen: list[list[int]] = []
    moe.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    settings = ComputeSettings(
        tps=(tp,),
        micro_batches=(2,),
        seq_len=16,
        recomputes=("none",),
        dtype=Dtype.FP32,
        warmup=0,
        repeats=1,
    )
    record = measure_case(LLAMA_MOE, case, settings, torch.device("cpu"), "cpu")
    assert record.parameter_bytes == 4 * LLAMA_MOE.tp_shard(tp).param_count().per_block
    block(torch.randn(2, 16, 32))
    assert seen[-1] == [16, 16, 16, 16]  # 2*16 tokens * top-2 / 4 experts
