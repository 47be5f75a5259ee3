"""Launch files: golden files for a 2-node and a 16-node plan, syntax checks, refusals."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import presets
from cli.launch_cmd import write_launch_dir
from executor.emit import EmitOptions, render
from planner.errors import SpecError
from planner.parallel import ParallelConfig
from planner.plan import build_plan, save_plan
from planner.specs import TrainingSpec

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "2node": (
        "llama3-8b",
        "dgx-h100",
        2,
        ParallelConfig(tp=8, pp=2, dp=1, micro_batch=1),
        64,
        4096,
    ),
    "16node": (
        "gpt3-175b",
        "dgx-a100-80gb",
        16,
        ParallelConfig(
            tp=8,
            pp=8,
            dp=2,
            micro_batch=1,
            schedule="interleaved",
            virtual_stages=2,
            recompute="full",
        ),
        128,
        2048,
    ),
}


def _plan(case: str):
    model, node, nodes, cfg, batch, seq = CASES[case]
    return build_plan(
        model=presets.load_model(model),
        training=TrainingSpec(global_batch=batch, seq_len=seq),
        cluster=presets.load_cluster(node, nodes),
        config=cfg,
        prediction={},
        source="analytic",
    )


OPTS = EmitOptions(
    rdzv_endpoint="node0.example:29500",
    steps=100,
    data="/data/tokens.bin",
    container="meshplan:0.1.0",
)


def _stable(text: str) -> str:
    """The gzip bytes of plan.json depend on the zlib build, so goldens hold a placeholder;
    test_launch_hardening.py checks that the parts reassemble to plan.json."""
    return re.sub(r"^( +plan\.json\.gz\.\d+: ).+$", r"\1<base64 gzip part>", text, flags=re.M)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_files(case):
    files = render(_plan(case), OPTS, launch_dir="/shared/launch")
    for name in ("node0.sh", "job.sbatch", "pytorchjob.yaml", "README.md"):
        golden = GOLDEN / f"{case}-{name}"
        text = _stable(files[name])
        if os.environ.get("MESHPLAN_REGEN_GOLDEN"):  # regenerate on purpose, then review the diff
            golden.write_text(text)
        assert golden.exists(), f"{golden} missing; run with MESHPLAN_REGEN_GOLDEN=1 and review it"
        assert text == golden.read_text(), f"{golden} differs; review, then MESHPLAN_REGEN_GOLDEN=1"
    nodes = CASES[case][2]
    assert sorted(n for n in files if n.startswith("node")) == sorted(
        f"node{i}.sh" for i in range(nodes)
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_scripts_parse_and_pin_node_order(case, tmp_path):
    files = render(_plan(case), OPTS)
    for name, text in files.items():
        if name.endswith((".sh", ".sbatch")):
            (tmp_path / name).write_text(text)
            subprocess.run(["bash", "-n", str(tmp_path / name)], check=True)
            if shutil.which("shellcheck"):
                subprocess.run(["shellcheck", "-S", "warning", str(tmp_path / name)], check=True)
    for i in range(CASES[case][2]):
        text = files[f"node{i}.sh"]
        assert f"MESHPLAN_NODE_INDEX={i}\n" in text and f"--node-rank={i}" in text
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
        assert "NCCL_DEBUG" not in text
    assert "MESHPLAN_NODE_INDEX=$SLURM_NODEID" in files["job.sbatch"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_pytorchjob_has_what_kubeflow_requires(case):
    plan = _plan(case)
    *config_maps, job = list(yaml.safe_load_all(render(plan, OPTS)["pytorchjob.yaml"]))
    assert config_maps and all(cm["kind"] == "ConfigMap" for cm in config_maps)
    assert all(key.startswith("plan.json.gz.") for cm in config_maps for key in cm["binaryData"])
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert specs["Master"]["replicas"] + specs.get("Worker", {}).get("replicas", 0) == len(
        plan.cluster.nodes
    )
    assert job["spec"]["nprocPerNode"] == "8"
    for spec in specs.values():
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch" and container["image"] == "meshplan:0.1.0"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_emit_replaces_own_dir_atomically_and_refuses_foreign(tmp_path):
    plan = _plan("2node")
    out = tmp_path / "launch"
    write_launch_dir(plan, out, OPTS)
    write_launch_dir(plan, out, EmitOptions(steps=5, rdzv_endpoint="h:1"))
    assert "--steps 5" in (out / "node0.sh").read_text()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SpecError, match="was not written by `meshplan emit`"):
        write_launch_dir(plan, foreign, OPTS)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_options_are_named():
    with pytest.raises(SpecError, match="--rdzv-endpoint='nohost' must be HOST:PORT"):
        EmitOptions(rdzv_endpoint="nohost")
    with pytest.raises(SpecError, match="--steps=0 must be >= 1"):
        EmitOptions(steps=0)


def test_cli_emit_refuses_bad_plan_without_writing(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"schema_version": 7}')
    out = tmp_path / "launch"
    r = subprocess.run(
        [sys.executable, "-m", "cli", "emit", str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "schema_version=7" in r.stderr
    assert not out.exists()
    good = tmp_path / "good.json"
    save_plan(_plan("2node"), good)
    r = subprocess.run(
        [sys.executable, "-m", "cli", "emit", str(good), "--out", str(out), "--json"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "node1.sh").exists() and "node1.sh" in r.stdout


def test_executor_places_processes_by_node_index_not_rendezvous_order():
    pytest.importorskip("torch")
    from executor.mesh import process_gpu_id

    plan = _plan("2node")
    # c10d may number node 1 first (RANK 0..7 there); MESHPLAN_NODE_INDEX wins.
    assert process_gpu_id(plan, {"MESHPLAN_NODE_INDEX": "1", "LOCAL_RANK": "3", "RANK": "3"}) == 11
    assert process_gpu_id(plan, {"RANK": "5"}) == 5
    with pytest.raises(ValueError, match="MESHPLAN_NODE_INDEX=2 is outside"):
        process_gpu_id(plan, {"MESHPLAN_NODE_INDEX": "2", "LOCAL_RANK": "0"})
