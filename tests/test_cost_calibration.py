"""The committed analytic constants on both calibration sources, and the CLI path equal to the
calibration path (issue 14: fitted MAPE <= 8 % per source, no calibration row predicted OOM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli.main import main
from planner.cost import calibration as cal

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "calibration"
pytestmark = pytest.mark.skipif(
    not (SHARED / "llm_foundry.json").is_file(), reason="../shared/calibration/ not present"
)


def _cases() -> tuple[cal.CalibrationCase, ...]:
    ptdp = cal.ptdp_cases(json.loads((SHARED / "ptdp_table1.json").read_text()))
    foundry = cal.llm_foundry_cases(json.loads((SHARED / "llm_foundry.json").read_text()))
    return ptdp + foundry


def test_both_sources_within_8_percent_and_every_row_fits() -> None:
    cases = _cases()
    preds = [cal.predict(c) for c in cases]
    for source in (cal.PTDP, cal.LLM_FOUNDRY):
        errs = [p.error_pct(c) for p, c in zip(preds, cases, strict=True) if c.source == source]
        mape = sum(abs(e) for e in errs) / len(errs)
        assert mape <= 8.0, f"{source}: MAPE {mape:.1f} %"
    oom = [c.label for p, c in zip(preds, cases, strict=True) if not p.fits]
    assert not oom, f"calibration rows predicted not to fit: {oom}"


def _cli_args(case: cal.CalibrationCase, tmp: Path) -> list[str]:
    m, t, k = case.model, case.training, case.config
    model = {
        "layers": m.layers,
        "hidden": m.hidden,
        "heads": m.heads,
        "kv_heads": m.kv_heads,
        "ffn_hidden": m.ffn_hidden,
        "vocab": m.vocab,
        "max_seq_len": m.max_seq_len,
        "tied_embeddings": m.tied_embeddings,
        "position": m.position.value,
        "bias": m.bias,
        "mlp": m.mlp.value,
        "norm": m.norm.value,
    }
    node = case.cluster.nodes[0]
    link = lambda x: {  # noqa: E731
        "name": x.name,
        "bandwidth_gb_per_s": x.bandwidth_bytes_per_s / 1e9,
        "latency_us": x.latency_s * 1e6,
    }
    cluster = {
        "name": "calibration",
        "node_types": {
            "n": {
                "gpu": node.gpu.name,
                "gpus": node.gpus,
                "nics": node.nics,
                "intra_link": link(node.intra_link),
                "nic": link(node.nic),
            }
        },
        "nodes": [{"type": "n", "count": len(case.cluster.nodes)}],
    }
    (tmp / "model.yaml").write_text(yaml.safe_dump(model))
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    dtype = "fp8" if t.fp8_linears else t.dtype.value
    runtime = "megatron-2021" if case.source == cal.PTDP else "llm-foundry-fsdp1"
    args = [
        "estimate",
        "--model",
        str(tmp / "model.yaml"),
        "--cluster",
        str(tmp / "cluster.yaml"),
        "--global-batch",
        str(t.global_batch),
        "--seq-len",
        str(t.seq_len),
        "--tp",
        str(k.tp),
        "--pp",
        str(k.pp),
        "--micro-batch",
        str(k.micro_batch),
        "--schedule",
        k.schedule.value,
        "--virtual-stages",
        str(k.virtual_stages),
        "--recompute",
        k.recompute.value,
        "--zero",
        str(k.zero),
        "--dtype",
        dtype,
        "--grad-dtype",
        t.grad_dtype.value,
        "--memory-headroom",
        "0",
        "--runtime",
        runtime,
        "--no-sequence-parallel",
        "--json",
    ]
    return args + ([] if t.flash_attention else ["--no-flash-attention"])


@pytest.mark.parametrize("label", ["76.1B", "1008.0B", "r0044", "r0116", "r0134", "r0215"])
def test_cli_estimate_prints_the_calibration_prediction(
    label: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (case,) = [c for c in _cases() if c.label == label]
    assert main(_cli_args(case, tmp_path)) == 0
    data = json.loads(capsys.readouterr().out)
    got = (
        data["hardware_tflops_per_gpu"]
        if case.quantity == "hardware_tflops_per_gpu"
        else data["tokens_per_s"] / case.cluster.num_gpus
    )
    assert got == pytest.approx(cal.predict(case).value, rel=1e-9)
    assert data["calibrated_regime"] is True, data["calibrated_regime_reasons"]
