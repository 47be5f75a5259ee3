"""Options and helpers shared by commands: spec loading, JSON output, the stderr console.

Conventions: data to stdout, messages to stderr; `--json` prints exactly one JSON document.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

from planner.errors import SpecError
from planner.serialize import to_jsonable
from planner.specs import ClusterSpec, Dtype, ModelSpec, TrainingSpec

# Options shared by `estimate` and `plan` (typer reads these as metadata only, so one instance
# can serve several commands).
MODEL_OPTION = typer.Option(..., "--model", help="Model preset, HF config.json or model YAML.")
CLUSTER_OPTION = typer.Option(..., "--cluster", help="Node-type preset or cluster YAML.")
NODES_OPTION = typer.Option(None, "--nodes", help="Number of nodes of a node-type preset.")
GLOBAL_BATCH_OPTION = typer.Option(..., "--global-batch", help="Sequences per step.")
SEQ_LEN_OPTION = typer.Option(..., "--seq-len", help="Tokens per sequence.")
DTYPE_OPTION = typer.Option("bf16", "--dtype", help="bf16 | fp16 | fp32")
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document.")


def err_console() -> Console:
    """Human messages and progress go to stderr so stdout stays parseable."""
    return Console(stderr=True)


def out_console() -> Console:
    return Console()


def print_json(data: Any) -> None:
    """Exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")


def load_model_arg(model: str) -> ModelSpec:
    from presets import load_model

    return load_model(model)


def load_cluster_arg(cluster: str, nodes: int | None) -> ClusterSpec:
    from presets import load_cluster

    return load_cluster(cluster, nodes)


def training_from_args(
    global_batch: int, seq_len: int, dtype: str, model: ModelSpec
) -> TrainingSpec:
    allowed = "|".join(d.value for d in Dtype)
    if dtype not in {d.value for d in Dtype}:
        raise SpecError(f"--dtype {dtype!r} is not allowed; use one of {allowed}")
    training = TrainingSpec(global_batch=global_batch, seq_len=seq_len, dtype=Dtype(dtype))
    training.check_model(model)
    return training


def format_bytes(n: float) -> str:
    """Binary units, as nvidia-smi and torch.cuda report memory."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"
