"""Launch files for a plan: per-node torchrun scripts, a Slurm batch file, a Kubeflow PyTorchJob.

Owns: rendering those files from a Plan, checking the plan against its cluster first, and
writing the launch directory atomically (a temporary directory renamed into place, so a failed
emit never leaves a half-written launch/). Does not import torch: emitting works on a laptop.

Rank order: torchrun numbers processes node-major (global rank = node_rank * nproc + local
rank) only when node ranks are pinned, and the c10d rendezvous may number nodes in arrival
order. So every launcher here also exports MESHPLAN_NODE_INDEX (the plan's node index); the
executor computes its GPU id from it and LOCAL_RANK and maps GPU ids to mesh coordinates with
the plan's rank map, whatever order the rendezvous chose.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import tempfile
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


@dataclass(frozen=True, kw_only=True)
class EmitOptions:
    """What the launch files pass to the executor and launcher."""

    rdzv_endpoint: str | None = None
    data: str | None = None
    steps: int | None = None
    container: str = "meshplan:latest"
    metrics: str | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise SpecError(f"--steps={self.steps} must be >= 1")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise SpecError(f"--rdzv-endpoint={self.rdzv_endpoint!r} must be HOST:PORT")


def check_plan(plan: Plan) -> None:
    """Refuse plans the launchers cannot realise, with one clear line."""
    cfg = plan.config
    n = plan.cluster.num_gpus
    if cfg.world_size != n:
        raise SpecError(
            f"plan: tp*pp*dp = {cfg.tp}*{cfg.pp}*{cfg.dp} = {cfg.world_size} != the cluster's {n} GPUs"
        )
    if plan.cluster.uniform_gpus_per_node is None:
        counts = sorted({node.gpus for node in plan.cluster.nodes})
        raise SpecError(
            f"launch files need the same GPU count on every node (plan's cluster has {counts})"
        )
    for r in plan.ranks:
        node, local = plan.cluster.gpu_location(r.gpu_id)
        if (node, local) != (r.node, r.local_gpu):
            raise SpecError(
                f"plan: rank {r.rank} says node {r.node} GPU {r.local_gpu}, but GPU id {r.gpu_id} is node {node} GPU {local}"
            )


def plan_id(plan: Plan) -> str:
    return hashlib.sha256(plan_to_json(plan).encode()).hexdigest()[:10]


def _device(plan: Plan) -> str:
    return "cpu" if plan.cluster.nodes[0].gpu.kind is DeviceKind.CPU else "cuda"


def _train_args(plan: Plan, opts: EmitOptions, plan_path: str) -> list[str]:
    args = ["-m", ENTRY_MODULE, "--plan", plan_path, "--device", _device(plan)]
    if opts.steps is not None:
        args += ["--steps", str(opts.steps)]
    if opts.data is not None:
        args += ["--data", opts.data]
    if opts.metrics is not None:
        args += ["--metrics", opts.metrics]
    return args


def _torchrun(plan: Plan, endpoint: str, rdzv_id: str, node_rank: str) -> list[str]:
    return [
        "torchrun",
        f"--nnodes={len(plan.cluster.nodes)}",
        f"--nproc-per-node={plan.cluster.uniform_gpus_per_node}",
        f"--node-rank={node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rdzv_id}",
    ]


def _omp_line(plan: Plan) -> str:
    if _device(plan) == "cpu":
        per_node = plan.cluster.uniform_gpus_per_node
        return f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( $(nproc) / {per_node} > 0 ? $(nproc) / {per_node} : 1 ))}}"'
    return f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{GPU_OMP_THREADS}}}"'


def node_script(plan: Plan, node: int, opts: EmitOptions) -> str:
    nodes = len(plan.cluster.nodes)
    pid = plan_id(plan)
    if opts.rdzv_endpoint:
        endpoint_line = f'RDZV_ENDPOINT="${{MESHPLAN_RDZV_ENDPOINT:-{opts.rdzv_endpoint}}}"'
    elif nodes == 1:
        endpoint_line = f'RDZV_ENDPOINT="${{MESHPLAN_RDZV_ENDPOINT:-localhost:{DEFAULT_PORT}}}"'
    else:
        endpoint_line = (
            'RDZV_ENDPOINT="${MESHPLAN_RDZV_ENDPOINT:?set MESHPLAN_RDZV_ENDPOINT=HOST:PORT of node 0, '
            'or re-emit with --rdzv-endpoint}"'
        )
    cmd = _torchrun(plan, "$RDZV_ENDPOINT", f"meshplan-{pid}", str(node)) + _train_args(
        plan, opts, "plan.json"
    )
    quoted = " ".join(a if a.startswith("--rdzv-endpoint") else shlex.quote(a) for a in cmd)
    quoted = quoted.replace("--rdzv-endpoint=$RDZV_ENDPOINT", '--rdzv-endpoint="$RDZV_ENDPOINT"')
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# meshplan: node {node} of {nodes} for plan {pid} "
            f"(tp={plan.config.tp} pp={plan.config.pp} dp={plan.config.dp}). Run this on node {node}.",
            "set -euo pipefail",
            'cd "$(dirname "$0")"',
            f"export MESHPLAN_NODE_INDEX={node}",
            _omp_line(plan),
            endpoint_line,
            f'exec {quoted} "$@"',
            "",
        ]
    )


def sbatch_script(plan: Plan, opts: EmitOptions) -> str:
    nodes = len(plan.cluster.nodes)
    per_node = plan.cluster.uniform_gpus_per_node
    pid = plan_id(plan)
    gpu_line = [f"#SBATCH --gpus-per-node={per_node}"] if _device(plan) == "cuda" else []
    # Expanded by the inner bash on each node: srun exports SLURM_NODEID, we export PLAN/HEAD_NODE.
    torchrun = _torchrun(
        plan, '"$HEAD_NODE":' + str(DEFAULT_PORT), '"$SLURM_JOB_ID"', '"$SLURM_NODEID"'
    )
    train = [a if a == "$PLAN" else shlex.quote(a) for a in _train_args(plan, opts, "$PLAN")]
    inner = " ".join(torchrun + train).replace("--plan $PLAN", '--plan "$PLAN"')
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"#SBATCH --job-name=meshplan-{pid}",
            f"#SBATCH --nodes={nodes}",
            "#SBATCH --ntasks-per-node=1",
            *gpu_line,
            "#SBATCH --exclusive",
            f"# meshplan plan {pid}: tp={plan.config.tp} pp={plan.config.pp} dp={plan.config.dp}; submit with `sbatch job.sbatch`.",
            "set -euo pipefail",
            'PLAN="$(cd "$(dirname "$0")" && pwd)/plan.json"',
            'HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            "export PLAN HEAD_NODE",
            _omp_line(plan),
            "# SLURM_NODEID follows the allocation's host order, so node i of the plan is the i-th host.",
            f"srun --nodes={nodes} --ntasks-per-node=1 bash -c 'export MESHPLAN_NODE_INDEX=$SLURM_NODEID; exec {inner}'",
            "",
        ]
    )


def _block_dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Multi-line strings (the embedded plan.json) as readable literal blocks."""

    def str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, str_presenter)
    Dumper.ignore_aliases = lambda self, data: True  # type: ignore[method-assign]  # no &id anchors
    return Dumper


def pytorchjob_yaml(plan: Plan, opts: EmitOptions) -> str:
    """Kubeflow PyTorchJob (kubeflow.org/v1) plus a ConfigMap carrying plan.json.

    The training operator sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK and the master
    address for torchrun; Master is node 0 and Worker-i is node i+1, which is the plan's order.
    """
    import yaml

    pid = plan_id(plan)
    nodes = len(plan.cluster.nodes)
    per_node = plan.cluster.uniform_gpus_per_node
    device = _device(plan)
    command = [
        "bash",
        "-c",
        "export MESHPLAN_NODE_INDEX=$PET_NODE_RANK; exec torchrun "
        + " ".join(shlex.quote(a) for a in _train_args(plan, opts, "/etc/meshplan/plan.json")),
    ]
    resources = {"limits": {"nvidia.com/gpu": per_node}} if device == "cuda" else {}

    def replica(count: int) -> dict:
        container = {
            "name": "pytorch",
            "image": opts.container,
            "command": command,
            "env": [
                {
                    "name": "OMP_NUM_THREADS",
                    "value": str(GPU_OMP_THREADS if device == "cuda" else 1),
                }
            ],
            "volumeMounts": [
                {"name": "plan", "mountPath": "/etc/meshplan"},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
        }
        if resources:
            container["resources"] = resources
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {"name": "plan", "configMap": {"name": f"meshplan-plan-{pid}"}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                    ],
                }
            },
        }

    specs = {"Master": replica(1)}
    if nodes > 1:
        specs["Worker"] = replica(nodes - 1)
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": f"meshplan-{pid}"},
        "spec": {"nprocPerNode": str(per_node), "pytorchReplicaSpecs": specs},
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"meshplan-plan-{pid}"},
        "data": {"plan.json": plan_to_json(plan)},
    }
    return yaml.dump_all([config_map, job], Dumper=_block_dumper(), sort_keys=False)


def readme(plan: Plan, opts: EmitOptions) -> str:
    nodes = len(plan.cluster.nodes)
    c = plan.config
    lines = [
        f"# Launch files for meshplan plan {plan_id(plan)}",
        "",
        f"{plan.model.name} on {plan.cluster.num_gpus} {plan.cluster.nodes[0].gpu.name} devices "
        f"({nodes} node(s)): tp={c.tp} pp={c.pp} dp={c.dp}, micro-batch {c.micro_batch}, "
        f"{c.schedule.value}, recompute {c.recompute.value}, ZeRO {c.zero}.",
        "",
        "Pick one way to start it:",
        "",
        "- **By hand / any scheduler**: copy this directory to every node and run `./node<i>.sh` on",
        "  node i (node0.sh on the first). "
        + (
            "The nodes meet at the rendezvous endpoint in the scripts; override it with "
            "`MESHPLAN_RDZV_ENDPOINT=host:port`."
            if nodes > 1
            else "It runs on this host."
        ),
        "- **Slurm**: `sbatch job.sbatch` from a shared directory (the head node is found with `scontrol`).",
        "- **Kubernetes (Kubeflow training operator)**: `kubectl apply -f pytorchjob.yaml` (set the image first;",
        f"  it is `{opts.container}` now). plan.json travels in the ConfigMap inside that file.",
        "",
        "Every launcher sets MESHPLAN_NODE_INDEX so the executor places each process on the GPU the",
        "plan's rank map gives it, whatever order the rendezvous numbers the nodes in.",
        "",
    ]
    return "\n".join(lines)


def render(plan: Plan, opts: EmitOptions) -> dict[str, str]:
    """File name -> text of every launch file (a pure function, for golden-file tests)."""
    check_plan(plan)
    files = {f"node{i}.sh": node_script(plan, i, opts) for i in range(len(plan.cluster.nodes))}
    files["job.sbatch"] = sbatch_script(plan, opts)
    files["pytorchjob.yaml"] = pytorchjob_yaml(plan, opts)
    files["plan.json"] = plan_to_json(plan)
    files["README.md"] = readme(plan, opts)
    files[MARKER] = f"plan {plan_id(plan)}\n"
    return files


def write_launch_dir(plan: Plan, out: str | Path, opts: EmitOptions) -> list[Path]:
    """Render, then write into a temporary sibling directory and rename it into place.

    An existing `out` is replaced only if it is empty or was written by meshplan (has the marker).
    """
    files = render(plan, opts)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise SpecError(
            f"{out} exists and was not written by `meshplan emit`; choose another --out or remove it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, text in files.items():
            path = tmp / name
            path.write_text(text)
            if name.endswith((".sh", ".sbatch")):
                path.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / name for name in files]
