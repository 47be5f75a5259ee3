"""Options and helpers shared by commands: spec loading, JSON output, the stderr console.

Conventions: data to stdout, messages to stderr; `--json` prints exactly one JSON document.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from cli.stdio import data_stream
from planner.errors import SpecError
from planner.serialize import to_jsonable
from planner.specs import ClusterSpec, Dtype, ModelSpec, TrainingSpec

if TYPE_CHECKING:
    from planner.profile import Profile

# Options shared by `estimate` and `plan` (typer reads these as metadata only, so one instance
# can serve several commands).
MODEL_OPTION = typer.Option(..., "--model", help="Model preset, HF config.json or model YAML.")
CLUSTER_OPTION = typer.Option(..., "--cluster", help="Node-type preset or cluster YAML.")
NODES_OPTION = typer.Option(None, "--nodes", help="Number of nodes of a node-type preset.")
GLOBAL_BATCH_OPTION = typer.Option(..., "--global-batch", help="Sequences per step.")
SEQ_LEN_OPTION = typer.Option(..., "--seq-len", help="Tokens per sequence.")
DTYPE_OPTION = typer.Option(
    "bf16",
    "--dtype",
    help="bf16 | fp16 | fp32 | fp8 (fp8: the blocks' linears in FP8, bf16 elsewhere; needs a "
    "GPU with FP8 tensor cores)",
)
GRAD_DTYPE_OPTION = typer.Option(
    "fp32",
    "--grad-dtype",
    help="dtype gradients are accumulated and reduced in: fp32 | bf16 | fp16",
)
FLASH_OPTION = typer.Option(
    True,
    "--flash-attention/--no-flash-attention",
    help="Price flash attention (the executor's SDPA) or materialised softmax attention.",
)
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document on stdout.")
MEMORY_HEADROOM_OPTION = typer.Option(
    None,
    "--memory-headroom",
    help="Fraction of every GPU's memory kept free, e.g. 0.1 (default: the GPU's "
    "usable_memory_gib if set, else 0.05; see docs/cluster-yaml.md).",
)
PROFILE_OPTION = typer.Option(None, "--profile", help="Measured profile.json (default: analytic).")


def err_console() -> Console:
    """Human messages and progress go to stderr so stdout stays parseable."""
    return Console(stderr=True)


def out_console() -> Console:
    """Data (tables, reports) to the real stdout, also while cli/stdio.py guards it."""
    return Console(file=data_stream())


def print_json(data: Any) -> None:
    """Exactly one JSON document on stdout (the only writer that reaches it under `--json`)."""
    stream = data_stream()
    stream.write(json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")
    stream.flush()


def check_positive_float(option: str, value: float | None) -> None:
    """A finite number > 0 (None: the option was not given). NaN compares false with
    everything, so a plain `value <= 0` check would let it through."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise SpecError(f"{option} {value}: must be a finite number > 0")


def load_model_arg(model: str) -> ModelSpec:
    """The model to price or run; features the cost model cannot price are refused here
    (planner/model_support.py), and those priced conservatively are noted on stderr."""
    from planner.model_support import check_priceable
    from presets import load_model

    spec = load_model(model)
    for note in check_priceable(spec):
        err_console().print(f"note: --model {model}: {note}", highlight=False)
    return spec


def load_cluster_arg(
    cluster: str, nodes: int | None, memory_headroom: float | None = None
) -> ClusterSpec:
    """The cluster to plan on; with `memory_headroom`, every GPU plans against
    memory x (1 - headroom) instead of its spec's usable memory."""
    from presets import load_cluster

    if memory_headroom is not None and not (0.0 <= memory_headroom < 1.0):
        raise SpecError(
            f"--memory-headroom {memory_headroom}: must be a fraction in [0, 1) "
            "(0.1 keeps 10 % of every GPU's memory free)"
        )
    spec = load_cluster(cluster, nodes)
    return spec if memory_headroom is None else spec.with_memory_headroom(memory_headroom)


def load_profile_for(
    path: str | None, cluster: ClusterSpec, training: TrainingSpec, model: ModelSpec
) -> Profile | None:
    """Load `--profile` and refuse it for hardware it does not describe (SpecError naming the
    field); print on stderr which parts of a partial match are used and which are not."""
    if path is None:
        return None
    from planner.profile import load_profile
    from planner.profile_match import check_profile_matches

    profile = load_profile(path)
    console = err_console()
    for note in check_profile_matches(profile, cluster, training, model=model):
        console.print(f"note: --profile {path}: {note}", highlight=False)
    return profile


def training_from_args(
    global_batch: int,
    seq_len: int,
    dtype: str,
    model: ModelSpec,
    *,
    grad_dtype: str = "fp32",
    flash_attention: bool = True,
) -> TrainingSpec:
    """`--dtype fp8` is bf16 training with FP8 linears (TrainingSpec.fp8_linears)."""
    allowed = "|".join(d.value for d in Dtype)
    if dtype not in {d.value for d in Dtype}:
        raise SpecError(f"--dtype {dtype!r} is not allowed; use one of {allowed}")
    grads = [d.value for d in Dtype if d is not Dtype.FP8]
    if grad_dtype not in grads:
        raise SpecError(f"--grad-dtype {grad_dtype!r} is not allowed; use one of {'|'.join(grads)}")
    fp8 = dtype == Dtype.FP8.value
    training = TrainingSpec(
        global_batch=global_batch,
        seq_len=seq_len,
        dtype=Dtype.BF16 if fp8 else Dtype(dtype),
        grad_dtype=Dtype(grad_dtype),
        flash_attention=flash_attention,
        fp8_linears=fp8,
    )
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
