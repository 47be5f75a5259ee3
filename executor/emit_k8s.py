"""The Kubeflow PyTorchJob of a plan: the job, its pods' start-up script, and the ConfigMaps
that carry plan.json (gzipped, in parts, so a plan of any size fits Kubernetes' object limits).

Owns: `pytorchjob_yaml`. Does not own: the options, the job description or the other launch
files (executor/emit.py, which calls this from `render`). Does not import torch.

Restarts: every replica restarts on failure (`OnFailure`), bounded by `runPolicy.backoffLimit`;
torchrun inside a pod restarts its workers (`--max-restarts`); every start resumes from the
newest complete checkpoint on the claim (`--resume`).
"""

from __future__ import annotations

import base64
import gzip
import re
from collections.abc import Mapping
from types import MappingProxyType

from executor.emit import (
    CHECKPOINT_MOUNT,
    GPU_OMP_THREADS,
    PARTS_MOUNT,
    PLAN_PART_BYTES,
    UNPACK_DIR,
    _checkpoint_name,
    _Job,
    _join,
    _train_args,
)

# Placeholder keys dumped where the commented-out RDMA blocks go (`_with_hooks`).
_HOOK_KEY = "meshplan-hook-"


def _block_dumper() -> type:
    import yaml

    # libyaml's emitter where installed: the pure-Python one reads the plan parts char by char.
    class Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
        """Multi-line strings (the pod's start-up script) as readable literal blocks."""

    def str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, str_presenter)
    Dumper.ignore_aliases = lambda self, data: True  # type: ignore[method-assign]  # no &id anchors
    return Dumper


# Commented-out YAML that a cluster with RDMA NICs enables by hand; `_with_hooks` puts each block
# where its placeholder key was dumped, indented to match.
_HOOKS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "pod": (
            "RDMA / host networking (InfiniBand, RoCE): NCCL then uses the hosts' NICs directly.",
            "hostNetwork: true",
            "dnsPolicy: ClusterFirstWithHostNet",
        ),
        "container": (
            "RDMA: request your RDMA device plugin's resource next to the GPUs (the name depends",
            "on the plugin, e.g. rdma/rdma_shared_device_a: 1 under resources.limits) and let",
            "NCCL pin memory:",
            "securityContext:",
            "  capabilities:",
            "    add: [IPC_LOCK]",
            "NCCL_IB_HCA / NCCL_SOCKET_IFNAME in env pick the fabric's devices if NCCL guesses wrong.",
        ),
    }
)


def _with_hooks(text: str) -> str:
    def block(m: re.Match[str]) -> str:
        return "\n".join(f"{m.group(1)}# {line}" for line in _HOOKS[m.group(2)])

    return re.sub(rf"^( *){_HOOK_KEY}(\w+): null$", block, text, flags=re.MULTILINE)


def _plan_parts(job: _Job) -> list[str]:
    """plan.json gzipped (mtime 0: the same plan gives the same bytes), split, base64."""
    packed = gzip.compress(job.plan_json.encode(), compresslevel=9, mtime=0)
    return [
        base64.b64encode(packed[i : i + PLAN_PART_BYTES]).decode()
        for i in range(0, len(packed), PLAN_PART_BYTES)
    ]


def _pod_script(job: _Job) -> str:
    """Join the parts, check them against the plan's sha256, then start torchrun with resume."""
    plan = f"{UNPACK_DIR}/plan.json"
    every, ckpt = str(job.opts.checkpoint_every), f"{CHECKPOINT_MOUNT}/{_checkpoint_name(job)}"
    train = [f"--max-restarts={job.opts.max_restarts}", *_train_args(job, plan)]
    train += ["--checkpoint-dir", ckpt, "--checkpoint-every", every]
    return "\n".join(
        [
            "set -euo pipefail",
            f"cat {PARTS_MOUNT}/plan.json.gz.* | gunzip > {plan}",
            f"echo '{job.sha256}  {plan}' | sha256sum -c --quiet -",
            "export MESHPLAN_NODE_INDEX=$PET_NODE_RANK",
            "exec torchrun " + _join([*train, "--resume"]),
            "",
        ]
    )


def _replica(job: _Job, count: int, part_names: list[str]) -> dict:
    threads = str(GPU_OMP_THREADS if job.device == "cuda" else 1)
    parts = [{"configMap": {"name": n}} for n in part_names]
    container: dict = {
        "name": "pytorch",
        "image": job.opts.container,
        "command": ["bash", "-c", _pod_script(job)],
        "env": [{"name": "OMP_NUM_THREADS", "value": threads}],
        "volumeMounts": [
            {"name": "plan-parts", "mountPath": PARTS_MOUNT, "readOnly": True},
            {"name": "plan", "mountPath": UNPACK_DIR},
            {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if job.device == "cuda":
        container["resources"] = {"limits": {"nvidia.com/gpu": job.per_node}}
    container[_HOOK_KEY + "container"] = None
    volumes = [
        {"name": "plan-parts", "projected": {"sources": parts}},
        {"name": "plan", "emptyDir": {}},
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": job.opts.checkpoint_pvc}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    pod = {"containers": [container], "volumes": volumes, _HOOK_KEY + "pod": None}
    return {"replicas": count, "restartPolicy": "OnFailure", "template": {"spec": pod}}


def pytorchjob_yaml(job: _Job) -> str:
    """Kubeflow PyTorchJob (kubeflow.org/v1) plus the ConfigMaps carrying plan.json.

    The training operator sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK and the master
    address for torchrun; Master is node 0 and Worker-i is node i+1, which is the plan's order.
    """
    import yaml

    parts = _plan_parts(job)
    width = max(3, len(str(len(parts) - 1)))
    names = [f"meshplan-plan-{job.pid}-{i:0{width}d}" for i in range(len(parts))]
    config_maps = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"meshplan/plan": job.pid}},
            "binaryData": {f"plan.json.gz.{i:0{width}d}": part},
        }
        for i, (name, part) in enumerate(zip(names, parts, strict=True))
    ]
    specs = {"Master": _replica(job, 1, names)}
    if job.nodes > 1:
        specs["Worker"] = _replica(job, job.nodes - 1, names)
    pytorch_job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": f"meshplan-{job.pid}"},
        "spec": {
            "nprocPerNode": str(job.per_node),
            # OnFailure pods restart on any failure, a failed torchrun included (it exits 1,
            # which the ExitCode policy would treat as permanent); the limit stops a plan that
            # can never start (a bad option, exit 2) from restarting for ever.
            "runPolicy": {"backoffLimit": job.opts.max_restarts},
            "pytorchReplicaSpecs": specs,
        },
    }
    o = job.opts
    header = f"""\
# meshplan plan {job.pid} ({job.layout}): a Kubeflow PyTorchJob of {job.nodes} pod(s) x {job.per_node} processes.
# Apply with `kubectl apply --server-side -f pytorchjob.yaml`: server-side apply keeps no
#   last-applied annotation (limited to 256 KiB); every object here also stays under that limit,
#   so plain `kubectl apply` works too. Delete with `kubectl delete -f pytorchjob.yaml`.
# plan.json ({len(job.plan_json)} bytes) travels gzipped in {len(parts)} ConfigMap(s) of <= {PLAN_PART_BYTES // 1024} KiB (the limit
#   is 1 MiB), labelled meshplan/plan={job.pid}; each pod joins them and checks the sha256.
# Checkpoints: every pod mounts the PersistentVolumeClaim {o.checkpoint_pvc} (create it first,
#   ReadWriteMany) at {CHECKPOINT_MOUNT}; the executor saves every {o.checkpoint_every} steps to {CHECKPOINT_MOUNT}/{_checkpoint_name(job)} and a
#   restarted pod resumes from the newest complete checkpoint (--resume); pods restart on failure
#   (OnFailure) up to {o.max_restarts} times (runPolicy.backoffLimit).
"""
    text = yaml.dump_all(
        [*config_maps, pytorch_job], Dumper=_block_dumper(), sort_keys=False, width=1 << 30
    )
    return header + _with_hooks(text)
