"""Launch files for a plan: per-node torchrun scripts, a Slurm batch file, a Kubeflow PyTorchJob.

Owns: checking emit options and the plan against its cluster, rendering the files (a pure
function of plan and options; the PyTorchJob's YAML is executor/emit_k8s.py's), launch.json.
Does not own: writing the directory and its marker file (cli/launch_cmd.py). Does not import
torch: emitting works on a laptop.

Rank order: torchrun numbers processes node-major (global rank = node_rank * nproc + local
rank) only when node ranks are pinned, and the c10d rendezvous may number nodes in arrival
order. So every launcher here also exports MESHPLAN_NODE_INDEX (the plan's node index); the
executor computes its GPU id from it and LOCAL_RANK and maps GPU ids to mesh coordinates with
the plan's rank map, whatever order the rendezvous chose.

Paths: no launcher changes the working directory, so relative paths passed to a launch script
(`--metrics m.jsonl`, `--data`, `--checkpoint-dir`) mean the caller's directory. Each launcher
finds plan.json on its own: node<i>.sh beside itself; job.sbatch, which Slurm runs from a spool
copy, by content (the plan's sha256) among the emit-time and submit directories; the
PyTorchJob from gzip parts in ConfigMaps, so a plan of any size fits Kubernetes' object limits.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from planner.errors import SpecError
from planner.plan import Plan, plan_to_json
from planner.specs import DeviceKind

ENTRY_MODULE = "executor.train"
MARKER = ".meshplan-launch"
DEFAULT_PORT = 29500
# torchrun's default when unset is 1 thread per process (with a warning); on CPU clusters we
# give each process an equal share of the host's cores instead (executor/train.py does too).
GPU_OMP_THREADS = 4
# Gzipped plan bytes per ConfigMap. Base64 makes ~171 KiB: under the 256 KiB that client-side
# `kubectl apply` may keep in its last-applied annotation, and far under a ConfigMap's 1 MiB.
PLAN_PART_BYTES = 128 * 1024
PARTS_MOUNT = "/etc/meshplan"
UNPACK_DIR = "/tmp/meshplan"
CHECKPOINT_MOUNT = "/checkpoints"
# Checkpoints of node<i>.sh and job.sbatch without --checkpoint-dir: beside plan.json.
DEFAULT_CHECKPOINT_SUBDIR = "checkpoints"
LAUNCH_RECORD = "launch.json"
LAUNCH_RECORD_FORMAT = 1

_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
# The image-reference grammar of github.com/distribution/reference, which docker, containerd
# and the kubelet parse: [DOMAIN[:PORT]/]PATH[:TAG][@DIGEST].
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_REF = re.compile(
    rf"(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*(?::[\w][\w.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)
_K8S_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True, kw_only=True)
class EmitOptions:
    """What the launch files pass to the executor and launcher; checked when built."""

    rdzv_endpoint: str | None = None
    data: str | None = None
    steps: int | None = None
    container: str = "meshplan:latest"
    metrics: str | None = None
    checkpoint_pvc: str = "meshplan-checkpoints"
    checkpoint_every: int = 100
    # Host path of node<i>.sh's and job.sbatch's checkpoints (None: `checkpoints/` beside
    # plan.json); the pods' is /checkpoints/<checkpoint_name> on the claim (None: meshplan-<plan id>).
    checkpoint_dir: str | None = None
    checkpoint_name: str | None = None
    # torchrun's worker restarts, and the PyTorchJob's pod restarts (runPolicy.backoffLimit).
    max_restarts: int = 3

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise SpecError(f"--steps={self.steps} must be >= 1")
        if self.checkpoint_every < 1:
            raise SpecError(f"--checkpoint-every={self.checkpoint_every} must be >= 1")
        if self.max_restarts < 0:
            raise SpecError(f"--max-restarts={self.max_restarts} must be >= 0")
        if self.checkpoint_dir is not None and not self.checkpoint_dir.strip():
            raise SpecError("--checkpoint-dir must be a non-empty path")
        name = self.checkpoint_name
        if name is not None and (len(name) > 253 or not _K8S_NAME.fullmatch(name)):
            raise SpecError(
                f"--checkpoint-name={name!r} must be lower-case letters, digits, '-' and '.' "
                "(a directory on the checkpoint claim), at most 253 characters"
            )
        if self.rdzv_endpoint is not None:
            _check_endpoint(self.rdzv_endpoint)
        _check_image(self.container)
        if len(self.checkpoint_pvc) > 253 or not _K8S_NAME.fullmatch(self.checkpoint_pvc):
            raise SpecError(
                f"--checkpoint-pvc={self.checkpoint_pvc!r} must be a Kubernetes object name: "
                "lower-case letters, digits, '-' and '.', at most 253 characters"
            )

    @property
    def rdzv_port(self) -> int:
        return int(self.rdzv_endpoint.rpartition(":")[2]) if self.rdzv_endpoint else DEFAULT_PORT


def _check_endpoint(endpoint: str) -> None:
    host, _, port = endpoint.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):
        raise SpecError(f"--rdzv-endpoint={endpoint!r} must be HOST:PORT")
    if not _HOST.fullmatch(host):
        raise SpecError(
            f"--rdzv-endpoint={endpoint!r}: host {host!r} may hold only letters, digits, '.' "
            "and '-' (or be an [IPv6] address)"
        )
    if not 1 <= int(port) <= 65535:
        raise SpecError(f"--rdzv-endpoint={endpoint!r}: port {port} must be 1..65535")


def _check_image(image: str) -> None:
    if not image or any(c.isspace() for c in image):
        raise SpecError(
            f"--container={image!r} must be one image reference without whitespace, "
            "e.g. registry.example.com/team/meshplan:0.1"
        )
    if not _IMAGE_REF.fullmatch(image):
        raise SpecError(
            f"--container={image!r} is not an image reference: [REGISTRY[:PORT]/]NAME[:TAG]"
            "[@sha256:DIGEST], NAME of lower-case letters, digits, '.', '_', '-' and '/'"
        )


def check_plan(plan: Plan) -> None:
    """Refuse plans the launchers cannot realise, with one clear line (linear in ranks)."""
    cfg = plan.config
    n = sum(node.gpus for node in plan.cluster.nodes)
    if cfg.world_size != n:
        raise SpecError(f"plan: {cfg.degrees_text()} = {cfg.world_size} != the cluster's {n} GPUs")
    per_node = plan.cluster.uniform_gpus_per_node
    if per_node is None:
        counts = sorted({node.gpus for node in plan.cluster.nodes})
        raise SpecError(
            f"launch files need the same GPU count on every node (plan's cluster has {counts})"
        )
    for r in plan.ranks:
        # Uniform nodes: the location is arithmetic (ClusterSpec.gpu_location scans the nodes).
        node, local = divmod(r.gpu_id, per_node)
        if (node, local) != (r.node, r.local_gpu):
            raise SpecError(
                f"plan: rank {r.rank} says node {r.node} GPU {r.local_gpu}, but GPU id {r.gpu_id} is node {node} GPU {local}"
            )


def plan_id(plan: Plan | str) -> str:
    """The first 10 hex digits of plan.json's sha256; pass plan.json's text where you have it
    (serialising a plan costs about 0.3 s per 1,000 nodes)."""
    text = plan if isinstance(plan, str) else plan_to_json(plan)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class _Job:
    """Everything the files are rendered from, computed once per render: serialising the plan
    is the expensive part (4 MB at 2,048 nodes)."""

    plan: Plan
    opts: EmitOptions
    plan_json: str
    sha256: str
    nodes: int
    per_node: int
    device: str
    launch_dir: Path | None

    @property
    def pid(self) -> str:
        return self.sha256[:10]

    @property
    def layout(self) -> str:
        c = self.plan.config
        return f"tp={c.tp} pp={c.pp} dp={c.dp}" + (f" cp={c.cp}" if c.cp > 1 else "")


def _job(plan: Plan, opts: EmitOptions, launch_dir: Path | None) -> _Job:
    text = plan_to_json(plan)
    return _Job(
        plan=plan,
        opts=opts,
        plan_json=text,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        nodes=len(plan.cluster.nodes),
        per_node=plan.cluster.uniform_gpus_per_node or 0,
        device="cpu" if plan.cluster.nodes[0].gpu.kind is DeviceKind.CPU else "cuda",
        launch_dir=launch_dir,
    )


class _Sh(str):
    """A shell word that is already quoted (it expands a variable): `_join` keeps it as is."""


def _join(words: Iterable[str]) -> str:
    return " ".join(w if isinstance(w, _Sh) else shlex.quote(w) for w in words)


def _train_args(job: _Job, plan_path: str) -> list[str]:
    args = ["-m", ENTRY_MODULE, "--plan", plan_path, "--device", job.device]
    o = job.opts
    for flag, value in (("--steps", o.steps), ("--data", o.data), ("--metrics", o.metrics)):
        if value is not None:
            args += [flag, str(value)]
    return args


def _torchrun(job: _Job, endpoint: str, rdzv_id: str, node_rank: str) -> list[str]:
    """torchrun's options; the last three arguments are shell words (quoted by the caller)."""
    return [
        "torchrun",
        f"--nnodes={job.nodes}",
        f"--nproc-per-node={job.per_node}",
        _Sh(f"--node-rank={node_rank}"),
        "--rdzv-backend=c10d",
        _Sh(f"--rdzv-endpoint={endpoint}"),
        _Sh(f"--rdzv-id={rdzv_id}"),
        f"--max-restarts={job.opts.max_restarts}",
    ]


def _resume_args(job: _Job, checkpoint_dir: str) -> list[str]:
    """Checkpoint every N steps and continue from the newest complete one on every start."""
    every = str(job.opts.checkpoint_every)
    return ["--checkpoint-dir", _Sh(checkpoint_dir), "--checkpoint-every", every, "--resume"]


def _checkpoint_lines(job: _Job, plan_dir: str) -> list[str]:
    """CHECKPOINT_DIR: $MESHPLAN_CHECKPOINT_DIR, else --checkpoint-dir, else beside plan.json
    (`plan_dir` is a shell expression, used inside double quotes)."""
    given = job.opts.checkpoint_dir
    default = (
        shlex.quote(given) if given is not None else f'"{plan_dir}/{DEFAULT_CHECKPOINT_SUBDIR}"'
    )
    return [
        f"DEFAULT_CHECKPOINT_DIR={default}",
        'CHECKPOINT_DIR="${MESHPLAN_CHECKPOINT_DIR:-$DEFAULT_CHECKPOINT_DIR}"',
    ]


def _omp_line(job: _Job) -> str:
    if job.device == "cpu":
        p = job.per_node
        return f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( $(nproc) / {p} > 0 ? $(nproc) / {p} : 1 ))}}"'
    return f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{GPU_OMP_THREADS}}}"'


def node_script(job: _Job, node: int) -> str:
    if job.opts.rdzv_endpoint or job.nodes == 1:
        default = job.opts.rdzv_endpoint or f"localhost:{DEFAULT_PORT}"
        endpoint_line = f'RDZV_ENDPOINT="${{MESHPLAN_RDZV_ENDPOINT:-{default}}}"'
    else:
        endpoint_line = (
            'RDZV_ENDPOINT="${MESHPLAN_RDZV_ENDPOINT:?set MESHPLAN_RDZV_ENDPOINT=HOST:PORT of node 0, '
            'or re-emit with --rdzv-endpoint}"'
        )
    cmd = _torchrun(job, '"$RDZV_ENDPOINT"', f"meshplan-{job.pid}", str(node))
    cmd += _train_args(job, _Sh('"$HERE/plan.json"')) + _resume_args(job, '"$CHECKPOINT_DIR"')
    ckpt = _checkpoint_lines(job, "$HERE")
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# meshplan: node {node} of {job.nodes} for plan {job.pid} ({job.layout}). Run this on node {node}.",
            "# Arguments are passed on to the executor; relative paths in them (--metrics, --data,",
            "# --checkpoint-dir) are relative to the directory you run this script from.",
            "set -euo pipefail",
            "# plan.json lies beside this script; the subshell leaves the working directory alone.",
            'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
            f"export MESHPLAN_NODE_INDEX={node}",
            _omp_line(job),
            endpoint_line,
            "# Restarts (torchrun --max-restarts, or running this again) resume from the newest",
            "# complete checkpoint here; after a node loss see `meshplan replan`.",
            *ckpt,
            f'exec {_join(cmd)} "$@"',
            "",
        ]
    )


def _plan_candidates(job: _Job) -> list[str]:
    """Where job.sbatch looks for plan.json, as shell words, in order."""
    submit = '"${SLURM_SUBMIT_DIR:-$PWD}"'
    name = job.launch_dir.name if job.launch_dir else "launch"
    words = ['${MESHPLAN_PLAN:+"$MESHPLAN_PLAN"}']
    if job.launch_dir is not None:
        words.append(shlex.quote(str(job.launch_dir / "plan.json")))
    words += [f"{submit}/plan.json", f"{submit}/{shlex.quote(name)}/plan.json"]
    return words


def sbatch_script(job: _Job) -> str:
    gpu_line = [f"#SBATCH --gpus-per-node={job.per_node}"] if job.device == "cuda" else []
    # Expanded by the inner bash on each node: srun exports SLURM_NODEID, we export PLAN/HEAD_NODE.
    endpoint = f'"$HEAD_NODE":{job.opts.rdzv_port}'
    torchrun = _torchrun(job, endpoint, '"$SLURM_JOB_ID"', '"$SLURM_NODEID"')
    inner = "export MESHPLAN_NODE_INDEX=$SLURM_NODEID; exec " + _join(
        torchrun + _train_args(job, _Sh('"$PLAN"')) + _resume_args(job, '"$CHECKPOINT_DIR"')
    )
    ckpt = _checkpoint_lines(job, '$(dirname "$PLAN")')
    emitted = " the launch directory at emit time," if job.launch_dir else ""
    subdir = job.launch_dir.name if job.launch_dir else "launch"
    srun_cmd = shlex.quote(inner + ' "$@"')
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"#SBATCH --job-name=meshplan-{job.pid}",
            f"#SBATCH --nodes={job.nodes}",
            "#SBATCH --ntasks-per-node=1",
            *gpu_line,
            "#SBATCH --exclusive",
            "# Requeued on a node failure (on other hosts too); every start resumes from the newest",
            "# complete checkpoint, and the log keeps earlier attempts' output.",
            "#SBATCH --requeue",
            "#SBATCH --open-mode=append",
            f"# meshplan plan {job.pid}: {job.layout}; submit with `sbatch job.sbatch [EXECUTOR ARGS]`.",
            "# Slurm starts the job in the directory sbatch ran in: relative paths in the arguments",
            "# (--metrics, --data, --checkpoint-dir) mean that directory.",
            "set -euo pipefail",
            "# Slurm runs a spool copy of this file, so its own path says nothing about plan.json. The",
            f"# first of $MESHPLAN_PLAN,{emitted} $SLURM_SUBMIT_DIR and $SLURM_SUBMIT_DIR/{subdir}",
            "# holding a plan.json with the plan's sha256 is used, so a stale copy is never picked.",
            f"PLAN_SHA256={job.sha256}",
            "PLAN=",
            "TRIED=()",
            f"for candidate in {' '.join(_plan_candidates(job))}; do",
            '  TRIED+=("$candidate")',
            '  if [[ -f "$candidate" && "$(sha256sum < "$candidate" | cut -d " " -f 1)" == "$PLAN_SHA256" ]]; then',
            '    PLAN="$(cd "$(dirname "$candidate")" && pwd)/$(basename "$candidate")"',
            "    break",
            "  fi",
            "done",
            'if [[ -z "$PLAN" ]]; then',
            f'  echo "error: no plan.json of plan {job.pid} at ${{TRIED[*]}}; set MESHPLAN_PLAN=/path/to/plan.json" >&2',
            "  exit 2",
            "fi",
            "# sed reads every host name; `head -n 1` could kill scontrol with SIGPIPE under pipefail.",
            'HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
            *ckpt,
            "export PLAN HEAD_NODE CHECKPOINT_DIR",
            _omp_line(job),
            "# SLURM_NODEID follows the allocation's host order, so node i of the plan is the i-th host.",
            f'srun --nodes={job.nodes} --ntasks-per-node=1 bash -c {srun_cmd} meshplan "$@"',
            "",
        ]
    )


def _checkpoint_name(job: _Job) -> str:
    return job.opts.checkpoint_name or f"meshplan-{job.pid}"


def readme(job: _Job) -> str:
    c, plan, o = job.plan.config, job.plan, job.opts
    meet = (
        "The nodes meet at the rendezvous endpoint in the scripts; override it with "
        "`MESHPLAN_RDZV_ENDPOINT=host:port`."
        if job.nodes > 1
        else "It runs on this host."
    )
    return f"""# Launch files for meshplan plan {job.pid}

{plan.model.name} on {plan.cluster.num_gpus} {plan.cluster.nodes[0].gpu.name} devices ({job.nodes} node(s)): \
tp={c.tp} pp={c.pp} dp={c.dp}{f" cp={c.cp}" if c.cp > 1 else ""}, micro-batch {c.micro_batch}, {c.schedule.value}, recompute {c.recompute.value}, ZeRO {c.zero}.

Pick one way to start it:

- **By hand / any scheduler**: copy this directory to every node and run `./node<i>.sh` on
  node i (node0.sh on the first). {meet}
- **Slurm**: `sbatch job.sbatch` from a shared directory (the head node is found with `scontrol`).
  It finds plan.json by its sha256 in this directory or `$SLURM_SUBMIT_DIR`, or at `$MESHPLAN_PLAN`.
- **Kubernetes (Kubeflow training operator)**: `kubectl apply --server-side -f pytorchjob.yaml`
  (set the image first; it is `{o.container}` now). plan.json travels gzipped in ConfigMaps in
  that file. Create the ReadWriteMany PersistentVolumeClaim `{o.checkpoint_pvc}` first: pods save a
  checkpoint every {o.checkpoint_every} steps and a restarted pod resumes from the newest one.

Arguments to node<i>.sh and job.sbatch go to the executor (e.g. `--metrics m.jsonl`); relative
paths in them mean the directory you start the script from, not this one.

Every launcher sets MESHPLAN_NODE_INDEX so the executor places each process on the GPU the
plan's rank map gives it, whatever order the rendezvous numbers the nodes in.

Failures: every launcher checkpoints every {o.checkpoint_every} steps and resumes from the newest
complete checkpoint when it starts again (torchrun restarts workers up to {o.max_restarts} times,
Slurm requeues the job, the pods restart). After losing a node for good, `meshplan replan
plan.json --exclude node<i> --emit <new dir>` plans the survivors and writes launch files that
resume from the same checkpoints ({LAUNCH_RECORD} records where they are).

Re-running `meshplan emit` here replaces only the files listed in {MARKER}; other files
(metrics, checkpoints) are left alone.
"""


def render(plan: Plan, opts: EmitOptions, launch_dir: str | Path | None = None) -> dict[str, str]:
    """File name -> text of every launch file (a pure function, for golden-file tests).

    `launch_dir`, when given, is where the files will live; job.sbatch looks for plan.json
    there first. The plan is serialised once.
    """
    from executor.emit_k8s import pytorchjob_yaml

    check_plan(plan)
    job = _job(plan, opts, Path(launch_dir) if launch_dir is not None else None)
    files = {f"node{i}.sh": node_script(job, i) for i in range(job.nodes)}
    files["job.sbatch"] = sbatch_script(job)
    files["pytorchjob.yaml"] = pytorchjob_yaml(job)
    files["plan.json"] = job.plan_json
    files["README.md"] = readme(job)
    files[LAUNCH_RECORD] = launch_record(job)
    return files


def launch_record(job: _Job) -> str:
    """launch.json: the emit options and where this plan's launchers checkpoint, for
    `meshplan replan` (which checkpoint a new plan resumes from) and `replan --emit`."""
    o = job.opts
    options = {
        "rdzv_endpoint": o.rdzv_endpoint,
        "data": o.data,
        "steps": o.steps,
        "container": o.container,
        "metrics": o.metrics,
        "checkpoint_pvc": o.checkpoint_pvc,
        "checkpoint_every": o.checkpoint_every,
        "checkpoint_dir": o.checkpoint_dir,
        "checkpoint_name": _checkpoint_name(job),
        "max_restarts": o.max_restarts,
    }
    doc = {
        "format": LAUNCH_RECORD_FORMAT,
        "plan": job.pid,
        "options": options,
        "host_checkpoint_dir": o.checkpoint_dir or DEFAULT_CHECKPOINT_SUBDIR,
        "pod_checkpoint_dir": f"{CHECKPOINT_MOUNT}/{_checkpoint_name(job)}",
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
