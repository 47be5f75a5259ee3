"""Launch files restart cleanly: torchrun restarts and resumes, Slurm requeues and resumes, the
PyTorchJob restarts pods and resumes, and launch.json records where for `meshplan replan`.

The scripts run against stub `torchrun`, `srun` and `scontrol` that print their arguments;
the PyTorchJob is parsed with yaml, launch.json with json.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import presets
from cli.launch_cmd import write_launch_dir
from executor.emit import LAUNCH_RECORD, EmitOptions, plan_id, render
from planner.errors import SpecError
from planner.parallel import ParallelConfig
from planner.plan import Plan, build_plan
from planner.specs import TrainingSpec

TORCHRUN = 'for a in "$@"; do echo "ARG=$a"; done\n'
SRUN = 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n'
SCONTROL = "echo node-a\necho node-b\n"


def _plan(nodes: int = 2) -> Plan:
    return build_plan(
        model=presets.load_model("llama3-8b"),
        training=TrainingSpec(global_batch=8, seq_len=4096),
        cluster=presets.load_cluster("dgx-h100", nodes),
        config=ParallelConfig(tp=8, pp=2, dp=nodes // 2, micro_batch=1),
        prediction={},
        source="analytic",
    )


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("torchrun", TORCHRUN), ("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MESHPLAN_CHECKPOINT_DIR", None)
    return {**env, **extra}


def _args(stdout: str) -> list[str]:
    return [line[4:] for line in stdout.splitlines() if line.startswith("ARG=")]


def _after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _torchrun_options(args: list[str]) -> list[str]:
    """torchrun's own options: everything before `-m executor.train`."""
    return args[: args.index("-m")]


def test_node_script_restarts_and_resumes_from_its_checkpoints(tmp_path: Path) -> None:
    launch = tmp_path / "launch"
    write_launch_dir(_plan(), launch, EmitOptions(rdzv_endpoint="h:1", max_restarts=5))
    run = subprocess.run(
        ["bash", str(launch / "node1.sh")], env=_env(tmp_path), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    args = _args(run.stdout)
    opts = _torchrun_options(args)
    assert "--max-restarts=5" in opts and "--rdzv-backend=c10d" in opts
    # The plan's node count, not an elastic range: the executor runs exactly this world size.
    assert "--nnodes=2" in opts
    assert _after(args, "--checkpoint-dir") == str((launch / "checkpoints").resolve())
    assert _after(args, "--checkpoint-every") == "100" and args[-1] == "--resume"
    # The environment and the user's own arguments win (argparse keeps the last value).
    env = _env(tmp_path, MESHPLAN_CHECKPOINT_DIR="/shared/ckpt")
    run = subprocess.run(
        ["bash", str(launch / "node0.sh"), "--checkpoint-every", "7"],
        env=env,
        capture_output=True,
        text=True,
    )
    args = _args(run.stdout)
    assert _after(args, "--checkpoint-dir") == "/shared/ckpt" and args[-2:] == [
        "--checkpoint-every",
        "7",
    ]


def test_sbatch_requeues_and_resumes(tmp_path: Path) -> None:
    launch = tmp_path / "launch"
    write_launch_dir(_plan(), launch, EmitOptions(checkpoint_dir="/lustre/run1/ckpt"))
    text = (launch / "job.sbatch").read_text()
    directives = [shlex.split(line)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in directives and "--open-mode=append" in directives
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(launch / "job.sbatch", spool / "slurm_script")
    env = _env(
        tmp_path, SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_ID="9"
    )
    run = subprocess.run(
        ["bash", str(spool / "slurm_script")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    args = _args(run.stdout)
    assert "--max-restarts=3" in _torchrun_options(args)
    assert _after(args, "--checkpoint-dir") == "/lustre/run1/ckpt" and "--resume" in args


def test_pytorchjob_restarts_pods_and_resumes_from_the_named_checkpoints() -> None:
    plan = _plan(4)
    opts = EmitOptions(checkpoint_name="run-1", max_restarts=6, checkpoint_every=25)
    *_, job = yaml.safe_load_all(render(plan, opts)["pytorchjob.yaml"])
    assert job["spec"]["runPolicy"]["backoffLimit"] == 6
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] + specs["Worker"]["replicas"] == 4
    for spec in specs.values():
        assert spec["restartPolicy"] == "OnFailure"
        script = spec["template"]["spec"]["containers"][0]["command"][2]
        (line,) = [x for x in script.splitlines() if x.startswith("exec torchrun")]
        argv = shlex.split(line)
        assert argv[2] == "--max-restarts=6" and argv[-1] == "--resume"
        assert _after(argv, "--checkpoint-dir") == "/checkpoints/run-1"
        assert _after(argv, "--checkpoint-every") == "25"
    default = yaml.safe_load_all(render(plan, EmitOptions())["pytorchjob.yaml"])
    *_, job = default
    script = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    pid = plan_id(render(plan, EmitOptions())["plan.json"])
    assert f"--checkpoint-dir /checkpoints/meshplan-{pid}" in script["command"][2]


def test_launch_record_holds_the_emit_options_and_checkpoint_places() -> None:
    plan = _plan()
    opts = EmitOptions(
        rdzv_endpoint="h:29400",
        steps=50,
        data="/data/t.bin",
        checkpoint_dir="/shared/ckpt",
        checkpoint_name="run-1",
        checkpoint_every=10,
        max_restarts=2,
    )
    files = render(plan, opts)
    doc = json.loads(files[LAUNCH_RECORD])
    assert doc["plan"] == plan_id(files["plan.json"])
    assert EmitOptions(**doc["options"]) == opts
    assert doc["host_checkpoint_dir"] == "/shared/ckpt"
    assert doc["pod_checkpoint_dir"] == "/checkpoints/run-1"
    default = json.loads(render(plan, EmitOptions())[LAUNCH_RECORD])
    assert (
        default["host_checkpoint_dir"] == "checkpoints"
        and default["options"]["checkpoint_dir"] is None
    )


@pytest.mark.parametrize(
    ("opts", "words"),
    [
        ({"max_restarts": -1}, "--max-restarts=-1 must be >= 0"),
        ({"checkpoint_name": "Run_1"}, "--checkpoint-name='Run_1'"),
        ({"checkpoint_dir": " "}, "--checkpoint-dir must be a non-empty path"),
    ],
)
def test_bad_restart_options_are_refused(opts: dict, words: str) -> None:
    with pytest.raises(SpecError, match=words.replace("'", ".").replace("=", "=")):
        EmitOptions(**opts)
