"""Single-process executor tests: parameter counts, init, recompute modes, data order, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from executor_shapes import GPT, LLAMA

import presets
from executor.activation_checkpoint import apply_ac
from executor.data import MemmapTokens, SyntheticTokens, local_batch
from executor.model import HeadAndLoss, Transformer, TransformerBlock, init_weights
from executor.pp import prune_to_chunk
from planner.parallel import ParallelConfig, Recompute
from planner.plan import StagePlan, build_plan, save_plan
from planner.specs import Dtype, TrainingSpec

SHAPES = {
    "gpt": GPT,
    "gpt-tied": replace(GPT, tied_embeddings=True),
    "llama-gqa": LLAMA,
    "llama-tied": replace(LLAMA, tied_embeddings=True),
    "qwen-qkv-bias": replace(LLAMA, qkv_bias=True),
    "swiglu-bias": replace(LLAMA, bias=True),
    "explicit-head-dim": replace(LLAMA, head_dim=16),
    "llama2-7b": presets.load_model("llama2-7b"),
    "llama3-8b": presets.load_model("llama3-8b"),
}


@pytest.mark.parametrize("name", SHAPES)
def test_param_count_matches_planner_exactly(name: str) -> None:
    spec = SHAPES[name]
    with torch.device("meta"):
        model = Transformer(spec)
        block = TransformerBlock(spec, 0)
    pc = spec.param_count()
    assert sum(p.numel() for p in model.parameters()) == pc.total
    assert sum(p.numel() for p in block.parameters()) == pc.per_block


def test_init_depends_only_on_seed_and_name() -> None:
    full = Transformer(GPT)
    init_weights(full, seed=3)
    with torch.device("meta"):
        chunk = prune_to_chunk(
            Transformer(GPT),
            StagePlan(
                chunk=1, pp_rank=1, first_layer=1, end_layer=4, has_embedding=False, has_head=True
            ),
        )
    chunk.to_empty(device="cpu")
    init_weights(chunk, seed=3)
    ref = dict(full.named_parameters())
    got = dict(chunk.named_parameters())
    assert set(got) < set(ref) and "layers.0.attention.wq.weight" not in got
    for name, p in got.items():
        assert torch.equal(p, ref[name]), name
    other = Transformer(GPT)
    init_weights(other, seed=4)
    assert not torch.equal(
        other.layers["1"].attention.wq.weight, ref["layers.1.attention.wq.weight"]
    )


@pytest.mark.parametrize("mode", [Recompute.SELECTIVE, Recompute.FULL])
def test_recompute_modes_give_identical_gradients(mode: Recompute) -> None:
    def grads(recompute: Recompute) -> tuple[torch.Tensor, list[torch.Tensor]]:
        block = TransformerBlock(LLAMA, 2)
        init_weights(block, seed=0, prefix="layers.2.")
        apply_ac(block, recompute)
        x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
        block(x).square().mean().backward()
        return x.grad, [p.grad for p in block.parameters()]

    (gx_ref, gp_ref), (gx, gp) = grads(Recompute.NONE), grads(mode)
    assert torch.allclose(gx, gx_ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gp, gp_ref, strict=True))


def test_attention_is_causal_and_head_returns_logits() -> None:
    model = Transformer(LLAMA)
    init_weights(model, seed=0)
    tokens = torch.randint(64, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (1, 16, 64)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    loss = HeadAndLoss.loss_fn(a, tokens)
    assert loss.ndim == 0 and 3.0 < float(loss) < 5.0  # ~ln(64) = 4.16 at init


def test_data_order_is_independent_of_dp(tmp_path: Path) -> None:
    src = SyntheticTokens(vocab=64, seq_len=16, batch=8, seed=0)
    x1, y1 = local_batch(src, 5, dp=1, dp_rank=0, device=torch.device("cpu"))
    parts = [local_batch(src, 5, dp=4, dp_rank=d, device=torch.device("cpu")) for d in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x1)
    assert torch.equal(torch.cat([p[1] for p in parts]), y1)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    mm = MemmapTokens(path=path, vocab=64, seq_len=16, batch=8)
    rows = mm.global_batch(1)
    assert rows.shape == (8, 17) and int(rows[0, 0]) == 8 * 16 and int(rows[0, 16]) == 8 * 16 + 16


@pytest.mark.slow
def test_torchrun_entry_point_writes_metrics_and_checkpoints(tmp_path: Path) -> None:
    """The real entry point under torchrun, with a rank map that is not torchrun's order."""
    plan = build_plan(
        model=LLAMA,
        training=TrainingSpec(global_batch=8, seq_len=16, dtype=Dtype.FP32),
        cluster=presets.load_cluster("cpu-2"),
        config=ParallelConfig(
            tp=1, pp=2, dp=1, micro_batch=2, stage_layers=(3, 1), rank_to_gpu=(1, 0)
        ),
        prediction={},
        source="analytic",
    )
    save_plan(plan, tmp_path / "plan.json")
    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 64, 4096, dtype=np.uint16).tofile(tokens)
    metrics = tmp_path / "m.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "executor.train",
        "--plan",
        str(tmp_path / "plan.json"),
        "--steps",
        "3",
        "--data",
        str(tokens),
        "--metrics",
        str(metrics),
        "--device",
        "cpu",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--checkpoint-every",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"loss", "step_time_s", "tokens_per_s", "mfu", "peak_memory_bytes"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and 0 < r["mfu"] < 1
    assert (tmp_path / "ckpt" / "step_00000002" / ".metadata").is_file()


def test_wrong_process_count_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from executor.train import main

    plan = build_plan(
        model=GPT,
        training=TrainingSpec(global_batch=8, seq_len=16, dtype=Dtype.FP32),
        cluster=presets.load_cluster("cpu-2"),
        config=ParallelConfig(tp=1, pp=1, dp=2, micro_batch=2),
        prediction={},
        source="analytic",
    )
    save_plan(plan, tmp_path / "plan.json")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--plan", str(tmp_path / "plan.json"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the plan needs tp*pp*dp = 1*1*2 = 2 processes; 1 were")
    assert main(["--plan", str(tmp_path / "missing.json")]) == 2
    assert "plan file not found" in capsys.readouterr().err


@pytest.mark.gpu
def test_single_gpu_bf16_run_trains() -> None:
    """(1,1,1) on one GPU in bf16 autocast with full recompute: five finite losses."""
    import torch.distributed as dist

    from executor.mesh import init_distributed
    from executor.train import TrainOptions, train

    base = presets.load_cluster("dgx-h100")
    one = replace(base, name="one", nodes=(replace(base.nodes[0], gpus=1),))
    plan = build_plan(
        model=LLAMA,
        training=TrainingSpec(global_batch=8, seq_len=16, dtype=Dtype.BF16),
        cluster=one,
        config=ParallelConfig(tp=1, pp=1, dp=1, micro_batch=4, recompute="full"),
        prediction={},
        source="analytic",
    )
    init_distributed(plan, "nccl", gpu_id=0, store=dist.HashStore())
    try:
        losses = train(plan, TrainOptions(steps=5, device="cuda", lr=1e-3))
    finally:
        dist.destroy_process_group()
    assert all(np.isfinite(losses)) and len(losses) == 5


def test_fp8_linears_are_refused_without_an_fp8_gpu() -> None:
    from executor.device import make_runtime
    from executor.fp8 import check_fp8_supported
    from planner.specs import Dtype

    rt = make_runtime("cpu", local_rank=0, local_world_size=1, dtype=Dtype.BF16)
    with pytest.raises(
        ValueError, match="needs a CUDA GPU with FP8 tensor cores; this run is on cpu"
    ):
        check_fp8_supported(rt)
