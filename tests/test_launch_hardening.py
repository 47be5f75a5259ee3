"""Hardening of `meshplan emit` / `meshplan launch`: working directories, re-emitting next to
user files, Slurm's spool copy, plans of any size on Kubernetes, and one-line option errors.

Launch scripts run against stub `torchrun`, `srun` and `scontrol` executables on PATH that
print what they were given, so these tests need neither a cluster nor torch.
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import presets
from cli.launch_cmd import owned_files, write_launch_dir
from cli.main import main
from executor import emit
from executor.emit import MARKER, EmitOptions, render
from planner.errors import SpecError
from planner.parallel import ParallelConfig
from planner.plan import Plan, build_plan, save_plan
from planner.specs import ClusterSpec, TrainingSpec

OPTS = EmitOptions(rdzv_endpoint="node0.example:29500", steps=100)
TORCHRUN = """\
echo "PWD=$(pwd -P)"
echo "NODE=${MESHPLAN_NODE_INDEX:-unset}"
for a in "$@"; do echo "ARG=$a"; done
"""
SRUN = 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n'
SCONTROL = "echo node-a\necho node-b\n"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _dgx(nodes: int) -> Plan:
    """llama3-8b on `nodes` DGX H100s: tp=8, pp=2 (pp=1 on one node)."""
    pp = 2 if nodes > 1 else 1
    return build_plan(
        model=presets.load_model("llama3-8b"),
        training=TrainingSpec(global_batch=max(4 * nodes, 8), seq_len=4096),
        cluster=presets.load_cluster("dgx-h100", nodes),
        config=ParallelConfig(tp=8, pp=pp, dp=nodes * 8 // (8 * pp), micro_batch=1),
        prediction={},
        source="analytic",
    )


def _cpu() -> Plan:
    return build_plan(
        model=presets.load_model("tiny-gpt"),
        training=TrainingSpec(global_batch=8, seq_len=64),
        cluster=presets.load_cluster("cpu-2", 1),
        config=ParallelConfig(tp=1, pp=1, dp=2, micro_batch=1),
        prediction={},
        source="analytic",
    )


def _bin(tmp_path: Path, **stubs: str) -> dict[str, str]:
    """An environment whose PATH starts with stub executables (name -> bash body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _torchrun_args(stdout: str) -> list[str]:
    return [line[4:] for line in stdout.splitlines() if line.startswith("ARG=")]


def _after(args: list[str], flag: str) -> str:
    return args[len(args) - 1 - args[::-1].index(flag) + 1]


def _one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------ working directory, re-emit


def test_node_script_leaves_relative_paths_to_the_callers_directory(tmp_path):
    launch = tmp_path / "shared" / "launch"
    launch.parent.mkdir()
    write_launch_dir(_dgx(2), launch, OPTS)
    work = tmp_path / "work"
    work.mkdir()
    script = os.path.relpath(launch / "node1.sh", work)
    run = subprocess.run(
        ["bash", script, "--metrics", "metrics.jsonl", "--checkpoint-dir", "ckpt"],
        cwd=work,
        env=_bin(tmp_path, torchrun=TORCHRUN),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert f"PWD={work.resolve()}" in run.stdout.splitlines()
    assert "NODE=1" in run.stdout.splitlines()
    args = _torchrun_args(run.stdout)
    assert Path(_after(args, "--plan")) == (launch / "plan.json").resolve()
    # Relative arguments reach the executor unchanged and resolve against the caller's cwd.
    assert _after(args, "--metrics") == "metrics.jsonl"
    assert _after(args, "--checkpoint-dir") == "ckpt"


def test_reemit_keeps_user_files_and_drops_only_stale_meshplan_files(tmp_path):
    out = tmp_path / "launch"
    write_launch_dir(_dgx(16), out, OPTS)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "ckpt" / "step_00000010").mkdir(parents=True)
    (out / "ckpt" / "step_00000010" / ".metadata").write_text("x")
    plan = _dgx(2)
    paths = write_launch_dir(plan, out, EmitOptions(steps=5, rdzv_endpoint="h:1"))
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (out / "ckpt" / "step_00000010" / ".metadata").is_file()
    assert not (out / "node2.sh").exists() and "--steps 5" in (out / "node0.sh").read_text()
    assert owned_files(out) == set(render(plan, OPTS)) == {p.name for p in paths} - {MARKER}
    leftovers = {p.name for p in out.iterdir()} - {p.name for p in paths}
    assert leftovers == {"metrics.jsonl", "ckpt"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_reemit_refuses_to_overwrite_a_file_meshplan_did_not_write(tmp_path):
    out = tmp_path / "launch"
    write_launch_dir(_dgx(2), out, OPTS)
    before = (out / "node0.sh").read_text()
    (out / "node5.sh").write_text("my own script\n")
    with pytest.raises(SpecError, match="node5.sh there was not written by `meshplan emit`"):
        write_launch_dir(_dgx(16), out, OPTS)
    assert (out / "node5.sh").read_text() == "my own script\n"
    assert (out / "node0.sh").read_text() == before and not (out / "node6.sh").exists()


def test_marker_without_file_list_claims_only_meshplans_names(tmp_path):
    out = tmp_path / "launch"
    out.mkdir()
    for name in ("node0.sh", "node1.sh", "node2.sh", "plan.json", "README.md"):
        (out / name).write_text("old\n")
    (out / "notes.txt").write_text("keep me\n")
    (out / MARKER).write_text("plan 0123456789\n")  # what emit wrote before the file list
    write_launch_dir(_dgx(2), out, OPTS)
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert not (out / "node2.sh").exists() and (out / "node1.sh").read_text() != "old\n"


def test_failed_reemit_leaves_whole_files_and_no_temporaries(tmp_path, monkeypatch):
    out = tmp_path / "launch"
    write_launch_dir(_dgx(16), out, OPTS)
    old = {p.name: p.read_text() for p in out.iterdir()}
    (out / "metrics.jsonl").write_text("mine\n")
    new = render(_dgx(2), EmitOptions(steps=5, rdzv_endpoint="h:1"), launch_dir=out.resolve())
    real, calls = os.replace, itertools.count()

    def flaky(src, dst):
        if next(calls) == 4:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(SpecError, match="--out .*: cannot write \\(No space left on device\\)"):
        write_launch_dir(_dgx(2), out, EmitOptions(steps=5, rdzv_endpoint="h:1"))
    monkeypatch.setattr(os, "replace", real)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert (out / "metrics.jsonl").read_text() == "mine\n"
    for p in out.iterdir():
        if p.name not in (MARKER, "metrics.jsonl"):
            assert p.read_text() in (old.get(p.name), new.get(p.name)), p.name
    # The marker still claims every meshplan file present, so the next emit cleans up.
    write_launch_dir(_dgx(2), out, EmitOptions(steps=5, rdzv_endpoint="h:1"))
    assert {p.name for p in out.iterdir()} == {*new, MARKER, "metrics.jsonl"}


# ------------------------------------------------------------------ Slurm


def _sbatch(tmp_path: Path, script: Path, submit: Path, *args: str) -> subprocess.CompletedProcess:
    """Run job.sbatch the way slurmd does: a copy in a spool directory, cwd = submit dir."""
    spool = tmp_path / "spool" / "job42"
    spool.mkdir(parents=True, exist_ok=True)
    shutil.copy(script, spool / "slurm_script")
    env = _bin(tmp_path, torchrun=TORCHRUN, srun=SRUN, scontrol=SCONTROL)
    env.update(SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_ID="42")
    env.pop("MESHPLAN_PLAN", None)
    return subprocess.run(
        ["bash", str(spool / "slurm_script"), *args],
        cwd=submit,
        env=env,
        capture_output=True,
        text=True,
    )


def test_sbatch_finds_the_plan_from_slurms_spool_copy(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    launch = shared / "launch"
    write_launch_dir(_dgx(2), launch, OPTS)
    run = _sbatch(tmp_path, launch / "job.sbatch", shared, "--metrics", "m.jsonl")
    assert run.returncode == 0, run.stderr
    args = _torchrun_args(run.stdout)
    assert Path(_after(args, "--plan")) == (launch / "plan.json").resolve()
    assert "--rdzv-endpoint=node-a:29500" in args and "NODE=0" in run.stdout.splitlines()
    assert _after(args, "--metrics") == "m.jsonl"
    assert f"PWD={shared.resolve()}" in run.stdout.splitlines()


def test_sbatch_after_the_launch_dir_moved_and_with_a_stale_copy_left(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    write_launch_dir(_dgx(2), shared / "launch", OPTS)
    moved = tmp_path / "moved"
    moved.mkdir()
    (shared / "launch").rename(moved / "launch")
    # Another plan now sits at the emit-time path; its plan.json must not be picked.
    write_launch_dir(_dgx(4), shared / "launch", OPTS)
    script = moved / "launch" / "job.sbatch"
    for submit in (moved / "launch", moved):
        run = _sbatch(tmp_path, script, submit)
        assert run.returncode == 0, run.stderr
        plan = Path(_after(_torchrun_args(run.stdout), "--plan"))
        assert plan == (moved / "launch" / "plan.json").resolve() and plan.is_file()


def test_sbatch_without_its_plan_fails_with_one_line(tmp_path):
    launch = tmp_path / "launch"
    write_launch_dir(_dgx(2), launch, OPTS)
    script = tmp_path / "job.sbatch"
    shutil.copy(launch / "job.sbatch", script)
    shutil.rmtree(launch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = _sbatch(tmp_path, script, elsewhere)
    assert run.returncode == 2 and not _torchrun_args(run.stdout)
    _one_error_line(run.stderr, "no plan.json of plan", "MESHPLAN_PLAN")


# ------------------------------------------------------------------ Kubernetes


@pytest.fixture(scope="module")
def big() -> tuple[Plan, dict[str, str]]:
    """2,048 nodes x 8 GPUs: plan.json is about 4 MB."""
    plan = _dgx(2048)
    return plan, render(plan, EmitOptions(steps=1000, container="registry.example.com/ml/mp:0.2"))


def _parts(docs: list[dict]) -> dict[str, bytes]:
    return {
        key: base64.b64decode(value)
        for doc in docs
        if doc["kind"] == "ConfigMap"
        for key, value in doc["binaryData"].items()
    }


def test_pytorchjob_carries_a_2048_node_plan_in_small_configmaps(big):
    plan, files = big
    assert len(files["plan.json"]) > 1 << 20
    *config_maps, job = list(yaml.load_all(files["pytorchjob.yaml"], Loader=_LOADER))
    assert len(config_maps) >= 2 and job["kind"] == "PyTorchJob"
    for doc in [*config_maps, job]:
        # Under client-side apply's 256 KiB annotation limit, hence under 1 MiB too.
        assert len(json.dumps(doc)) < 256 * 1024
    parts = _parts(config_maps)
    packed = b"".join(parts[key] for key in sorted(parts))  # the pod's glob order
    assert gzip.decompress(packed).decode() == files["plan.json"]
    names = [cm["metadata"]["name"] for cm in config_maps]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] + specs["Worker"]["replicas"] == 2048
    for spec in specs.values():
        volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
        assert [
            s["configMap"]["name"] for s in volumes["plan-parts"]["projected"]["sources"]
        ] == names


def test_pod_script_reassembles_and_checks_the_plan(big, tmp_path):
    _, files = big
    *config_maps, job = list(yaml.load_all(files["pytorchjob.yaml"], Loader=_LOADER))
    script = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    script = script["command"][2]
    mount, unpacked = tmp_path / "parts", tmp_path / "unpacked"
    mount.mkdir()
    unpacked.mkdir()
    for key, data in _parts(config_maps).items():
        (mount / key).write_bytes(data)
    local = script.replace(emit.PARTS_MOUNT, str(mount)).replace(emit.UNPACK_DIR, str(unpacked))
    env = {**_bin(tmp_path, torchrun=TORCHRUN), "PET_NODE_RANK": "7"}
    run = subprocess.run(["bash", "-c", local], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (unpacked / "plan.json").read_text() == files["plan.json"]
    assert "NODE=7" in run.stdout.splitlines()
    # A part from another plan: gunzip may succeed, the sha256 check must not.
    first = sorted(mount.iterdir())[0]
    first.write_bytes(gzip.compress(b'{"other": "plan"}', mtime=0))
    for extra in sorted(mount.iterdir())[1:]:
        extra.unlink()
    run = subprocess.run(["bash", "-c", local], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and not _torchrun_args(run.stdout)


def test_pods_resume_from_a_checkpoint_volume():
    plan = _dgx(2)
    files = render(plan, EmitOptions(checkpoint_pvc="team-ckpt", checkpoint_every=50))
    *_, job = list(yaml.load_all(files["pytorchjob.yaml"], Loader=_LOADER))
    pid = emit.plan_id(plan)
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        exec_line = container["command"][2].strip().splitlines()[-1]
        argv = shlex.split(exec_line)
        assert argv[:2] == ["exec", "torchrun"] and "--resume" in argv
        assert _after(argv, "--checkpoint-dir") == f"/checkpoints/meshplan-{pid}"
        assert _after(argv, "--checkpoint-every") == "50"
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims == {"checkpoints": "team-ckpt"}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["checkpoints"] == "/checkpoints"
    text = files["pytorchjob.yaml"]
    assert "kubectl apply --server-side" in text and "--server-side" in files["README.md"]
    assert "# hostNetwork: true" in text and "IPC_LOCK" in text and "rdma/" in text


def test_executor_accepts_the_pods_resume_flags():
    pytest.importorskip("torch")
    from executor.train import _parse

    files = render(_dgx(2), EmitOptions(checkpoint_every=50))
    *_, job = list(yaml.load_all(files["pytorchjob.yaml"], Loader=_LOADER))
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    argv = shlex.split(container["command"][2].strip().splitlines()[-1])
    _, opts = _parse(argv[argv.index("executor.train") + 1 :])
    assert opts.resume and opts.checkpoint_every == 50 and opts.checkpoint_dir.startswith("/")


# ------------------------------------------------------------------ cost of emitting


def test_render_serialises_the_plan_once_and_never_scans_nodes(monkeypatch, tmp_path):
    plan = _dgx(16)
    calls = itertools.count()
    real = emit.plan_to_json
    monkeypatch.setattr(emit, "plan_to_json", lambda p: (next(calls), real(p))[1])

    def scan(self, gpu_id):
        raise AssertionError("gpu_location walks every node: quadratic over ranks")

    monkeypatch.setattr(ClusterSpec, "gpu_location", scan)
    render(plan, OPTS)
    write_launch_dir(plan, tmp_path / "launch", OPTS)
    assert next(calls) == 2  # one per render, and write_launch_dir renders once


# ------------------------------------------------------------------ option errors


@pytest.fixture
def plan_file(tmp_path) -> Path:
    path = tmp_path / "plan.json"
    save_plan(_dgx(2), path)
    return path


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--rdzv-endpoint", "h:999999"], ["--rdzv-endpoint", "port 999999 must be 1..65535"]),
        (["--rdzv-endpoint", "h:0"], ["port 0 must be 1..65535"]),
        (["--rdzv-endpoint", "h$(x):29500"], ["host", "letters, digits"]),
        (["--rdzv-endpoint", "nohost"], ["must be HOST:PORT"]),
        (["--container", "mp:0.1 --privileged"], ["--container", "without whitespace"]),
        (["--container", "Meshplan!:latest"], ["--container", "not an image reference"]),
        (["--steps", "0"], ["--steps=0 must be >= 1"]),
        (["--steps", "-3"], ["--steps=-3 must be >= 1"]),
        (["--checkpoint-pvc", "Bad_Name"], ["--checkpoint-pvc", "Kubernetes object name"]),
        (["--checkpoint-every", "0"], ["--checkpoint-every=0 must be >= 1"]),
    ],
)
def test_emit_refuses_bad_options_with_one_line(plan_file, tmp_path, capsys, args, needles):
    out = tmp_path / "launch"
    assert main(["emit", str(plan_file), "--out", str(out), *args]) == 2
    _one_error_line(capsys.readouterr().err, *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    "image",
    [
        "meshplan:latest",
        "registry.example.com:5000/team/meshplan:0.1",
        "nvcr.io/nvidia/pytorch:24.05-py3",
        "localhost/img",
        "ghcr.io/org/img@sha256:" + "a" * 64,
    ],
)
def test_image_references_that_registries_accept(image):
    assert EmitOptions(container=image).container == image


def test_emit_out_into_a_file_or_missing_dir_is_one_line(plan_file, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep\n")
    assert main(["emit", str(plan_file), "--out", str(a_file)]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "is a file")
    assert a_file.read_text() == "keep\n"
    assert main(["emit", str(plan_file), "--out", str(tmp_path / "no" / "launch")]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_emit_out_unwritable_is_one_line(plan_file, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["emit", str(plan_file), "--out", str(locked / "launch")]) == 2
    finally:
        locked.chmod(0o700)
    _one_error_line(capsys.readouterr().err, "--out", "not writable")


def test_emit_makes_a_relative_data_path_absolute(plan_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["emit", str(plan_file), "--out", "launch", "--data", "tokens.bin"]) == 0
    assert f"--data {tmp_path / 'tokens.bin'}" in (tmp_path / "launch" / "node0.sh").read_text()


def test_cli_error_contract_in_a_real_process(plan_file, tmp_path):
    for args in (
        ["emit", str(plan_file), "--out", str(tmp_path / "l"), "--rdzv-endpoint", "h:999999"],
        ["launch", str(plan_file), "--steps", "0"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 2, r.stderr
        _one_error_line(r.stderr)


# ------------------------------------------------------------------ launch


@pytest.fixture
def cpu_plan(tmp_path) -> Path:
    path = tmp_path / "cpu-plan.json"
    save_plan(_cpu(), path)
    return path


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_launch_refuses_non_positive_steps(cpu_plan, capsys, steps):
    assert main(["launch", str(cpu_plan), "--steps", steps]) == 2
    _one_error_line(capsys.readouterr().err, f"--steps={steps} must be >= 1")


def test_launch_refuses_unwritable_metrics(cpu_plan, tmp_path, capsys):
    assert main(["launch", str(cpu_plan), "--metrics", str(tmp_path / "no" / "m.jsonl")]) == 2
    _one_error_line(capsys.readouterr().err, "--metrics", "does not exist")
    assert main(["launch", str(cpu_plan), "--metrics", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "--metrics", "is a directory")


def test_launch_refuses_a_gpu_plan_without_gpus(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "gpu-plan.json"
    save_plan(_dgx(1), path)
    assert main(["launch", str(path), "--steps", "1"]) == 2
    _one_error_line(capsys.readouterr().err, "8 processes", "H100", "0 usable CUDA device")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "no such file"),
        (b"", "the file is empty"),
        (b"\x01\x00" * 10, "holds 10 tokens; seq_len + 2 = 66"),
        (b"\x01\x00\x02", "not a whole number of uint16 tokens"),
        ("dir", "not a regular file"),
    ],
)
def test_launch_checks_the_token_file_first(cpu_plan, tmp_path, capsys, content, needle):
    pytest.importorskip("torch")
    data = tmp_path / "tokens.bin"
    if content == "dir":
        data.mkdir()
    elif content is not None:
        data.write_bytes(content)
    assert main(["launch", str(cpu_plan), "--data", str(data)]) == 2
    _one_error_line(capsys.readouterr().err, "--data", needle)


def test_launch_without_torch_names_the_local_install(cpu_plan, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    assert main(["launch", str(cpu_plan)]) == 2
    _one_error_line(capsys.readouterr().err, "pip install -e '.[torch]'")
