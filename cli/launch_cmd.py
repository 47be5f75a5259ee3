"""`meshplan emit` (launch files from a plan) and `meshplan launch` (run a plan on this host).

Owns: writing the launch directory and its marker file, and the checks `launch` makes before
torchrun starts (so a bad option is one `error:` line, not eight ranks' tracebacks). Does not
own: what the launch files say (executor/emit.py).

The marker (`.meshplan-launch`) lists the files `meshplan emit` wrote; re-emitting replaces or
removes only those, so a user's metrics or checkpoints in the directory survive.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cli.common import err_console, print_json
from planner.errors import SpecError
from planner.fileio import check_output_dir, check_output_file

if TYPE_CHECKING:
    from executor.emit import EmitOptions
    from planner.plan import Plan

TORCH_HINT = "pip install -e '.[torch]'"
# What a marker without a file list (written before it had one) may claim: the fixed names only.
_LEGACY_FILES = re.compile(r"node\d+\.sh|job\.sbatch|pytorchjob\.yaml|plan\.json|README\.md")


def _marker_text(pid: str, names: Iterable[str]) -> str:
    from executor.emit import MARKER

    lines = [
        "# Written by `meshplan emit`: re-emitting replaces or removes the files listed here",
        "# and leaves every other file in this directory alone.",
        f"plan {pid}",
        *(f"file {n}" for n in sorted(names) if n != MARKER),
    ]
    return "\n".join(lines) + "\n"


def owned_files(out: Path) -> set[str] | None:
    """The names the marker in `out` lists (None: no marker, so nothing there is meshplan's)."""
    from executor.emit import MARKER

    marker = out / MARKER
    if not marker.is_file():
        return None
    lines = marker.read_text(errors="replace").splitlines()
    names = {line[5:] for line in lines if line.startswith("file ")}
    if not names:
        return {p.name for p in out.iterdir() if _LEGACY_FILES.fullmatch(p.name)}
    # A hand-edited marker must not reach outside the directory.
    return {n for n in names if n and "/" not in n and n not in (".", "..", MARKER)}


def _mode(name: str) -> int:
    # Explicit modes: mkstemp/mkdtemp create 0600/0700, but other nodes' users run these files.
    return 0o755 if name.endswith((".sh", ".sbatch")) else 0o644


def _parallel(fn: Callable[[Any], object], items: Iterable[Any]) -> None:
    """Run `fn` over `items` on a few threads: creating a file is a metadata round trip (about
    1 ms here, more on NFS or Lustre), and a 2,048-node plan has 2,048 node scripts."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in pool.map(fn, items):
            pass


def _create_dir(out: Path, files: dict[str, str]) -> None:
    """A new directory: write a temporary sibling and rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))

    def write(item: tuple[str, str]) -> None:
        (tmp / item[0]).write_text(item[1])
        (tmp / item[0]).chmod(_mode(item[0]))

    try:
        tmp.chmod(0o755)
        _parallel(write, files.items())
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _update_dir(out: Path, files: dict[str, str], marker: str, option: str) -> None:
    """An existing directory: every file is written to a temporary first and then renamed over
    its old version; meshplan's files the new plan lacks are removed; other files stay."""
    from executor.emit import MARKER

    owned = owned_files(out)
    if owned is None and any(out.iterdir()):
        raise SpecError(
            f"{option} {out}: exists and was not written by `meshplan emit`; choose another {option} or empty it"
        )
    owned = owned or set()
    for name in files:
        path = out / name
        if (path.is_symlink() or path.exists()) and (name not in owned or path.is_dir()):
            raise SpecError(
                f"{option} {out}: {name} there was not written by `meshplan emit`; move it away or choose another {option}"
            )
    stale = sorted(owned - set(files))
    # Claim old and new files first: a re-emit interrupted from here on still owns them all.
    interim = marker + "".join(f"file {n}\n" for n in stale)
    staged = [(MARKER, interim), *files.items(), (MARKER, marker)]
    temps: dict[int, str] = {}

    def stage(i: int) -> None:
        name, text = staged[i]
        fd, temps[i] = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(temps[i], _mode(name))

    try:
        _parallel(stage, range(len(staged)))
        os.replace(temps[0], out / MARKER)
        _parallel(lambda i: os.replace(temps[i], out / staged[i][0]), range(1, len(staged) - 1))
        for name in stale:
            if (out / name).is_file() or (out / name).is_symlink():
                (out / name).unlink()
        os.replace(temps[len(staged) - 1], out / MARKER)
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)


def check_launch_dir(out: str | Path, option: str) -> Path:
    """Refuse, before any work, a directory `meshplan emit` could not write into: unwritable,
    a file, or holding files but no marker (so not a launch directory meshplan wrote)."""
    path = check_output_dir(out, option)
    if path.exists() and owned_files(path) is None and any(path.iterdir()):
        raise SpecError(
            f"{option} {path}: exists and was not written by `meshplan emit`; choose another {option} or empty it"
        )
    return path


def write_launch_dir(
    plan: Plan, out: str | Path, opts: EmitOptions, *, option: str = "--out"
) -> list[Path]:
    """Check `out`, render everything, then write it; a failure leaves no partial file.

    A new `out` appears at once (a renamed temporary directory). An existing one must be empty
    or carry the marker; then only the files the marker lists are replaced or removed.
    """
    from executor.emit import MARKER, plan_id, render

    out = check_output_dir(out, option)
    files = render(plan, opts, launch_dir=out.resolve())
    marker = _marker_text(plan_id(files["plan.json"]), files)
    try:
        if out.exists():
            _update_dir(out, files, marker, option)
        else:
            _create_dir(out, {**files, MARKER: marker})
    except OSError as e:
        raise SpecError(f"{option} {out}: cannot write ({e.strerror or e})") from None
    return [out / name for name in [*files, MARKER]]


def emit_files(plan_path: str, out: str, *, option: str = "--out", **options: object) -> list[Path]:
    """Check the options and `out`, load the plan, write; shared by `emit` and `plan --emit`."""
    from executor.emit import EmitOptions
    from planner.plan import load_plan

    opts = EmitOptions(**{k: v for k, v in options.items() if v is not None})
    check_output_dir(out, option)
    return write_launch_dir(load_plan(plan_path), out, opts, option=option)


def check_launch_options(steps: int | None, metrics: str | None, data: str | None) -> None:
    """What `launch` can refuse before reading the plan."""
    if steps is not None and steps < 1:
        raise SpecError(f"--steps={steps} must be >= 1")
    if metrics is not None:
        check_output_file(metrics, "--metrics")
    if data is None or data == "synthetic":
        return
    p = Path(data)
    if not p.exists():
        raise SpecError(f"--data {data}: no such file (give a token file, or 'synthetic')")
    if not p.is_file():
        raise SpecError(f"--data {data}: is not a regular file; give a token file")
    if not os.access(p, os.R_OK):
        raise SpecError(f"--data {data}: the file is not readable")
    if p.stat().st_size == 0:
        raise SpecError(f"--data {data}: the file is empty; it must hold token ids")


def _check_tokens_fit(plan: Plan, data: str) -> None:
    """The executor's token file rules (executor/data.py), checked before 8 ranks trip on them."""
    from executor.data import UINT16_VOCAB_LIMIT

    width = 2 if plan.model.vocab <= UINT16_VOCAB_LIMIT else 4
    size, need = Path(data).stat().st_size, plan.training.seq_len + 2
    if size % width:
        raise SpecError(
            f"--data {data}: {size} bytes is not a whole number of uint{8 * width} tokens "
            f"(vocab {plan.model.vocab})"
        )
    if size // width < need:
        raise SpecError(
            f"--data {data}: holds {size // width} tokens; seq_len + 2 = {need} are needed"
        )


def _check_host(plan: Plan, plan_path: str) -> None:
    """Refuse a GPU plan where the GPUs are missing, instead of every rank failing at once."""
    from planner.specs import DeviceKind

    gpu = plan.cluster.nodes[0].gpu
    if gpu.kind is DeviceKind.CPU:
        return
    import torch

    need = plan.cluster.uniform_gpus_per_node or 0
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < need:
        raise SpecError(
            f"{plan_path}: the plan runs {need} processes on {gpu.name} GPUs but this host has "
            f"{have} usable CUDA device(s); run it on a host with {need}, or plan for this "
            "host's CPUs (a cluster YAML with `type: cpu-N` nodes)"
        )


def _single_node_plan(plan_path: str) -> Plan:
    from executor.emit import check_plan
    from planner.plan import load_plan

    plan = load_plan(plan_path)
    check_plan(plan)
    if len(plan.cluster.nodes) != 1:
        raise SpecError(
            f"`meshplan launch` runs on this host only; the plan spans {len(plan.cluster.nodes)} nodes — "
            "use `meshplan emit` and start launch/node<i>.sh on each node"
        )
    return plan


def _command(
    plan: Plan, plan_path: str, steps: int | None, metrics: str | None, data: str | None
) -> list[str]:
    from executor.emit import ENTRY_MODULE
    from planner.specs import DeviceKind

    device = "cpu" if plan.cluster.nodes[0].gpu.kind is DeviceKind.CPU else "cuda"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={plan.cluster.uniform_gpus_per_node}",
        "--local-ranks-filter=0",
        "-m",
        ENTRY_MODULE,
        "--plan",
        str(plan_path),
        "--device",
        device,
    ]
    for flag, value in (("--steps", steps), ("--metrics", metrics), ("--data", data)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def launch_command(
    plan_path: str, steps: int | None, metrics: str | None, data: str | None
) -> list[str]:
    """The torchrun command that runs a single-node plan here, showing rank 0's output only."""
    return _command(_single_node_plan(plan_path), plan_path, steps, metrics, data)


def _emit_command(app: typer.Typer) -> None:
    @app.command("emit")
    def emit(
        plan: str = typer.Argument(..., help="plan.json written by `meshplan plan`."),
        out: str = typer.Option(
            "launch",
            "--out",
            help="Directory to write; re-emitting replaces only the files meshplan wrote there.",
        ),
        rdzv_endpoint: str = typer.Option(
            None, "--rdzv-endpoint", help="HOST:PORT of node 0 for the c10d rendezvous."
        ),
        data: str = typer.Option(
            None,
            "--data",
            help="Token file the executor trains on (default: synthetic); a relative path is "
            "made absolute here.",
        ),
        steps: int = typer.Option(None, "--steps", help="Training steps (>= 1)."),
        container: str = typer.Option(
            None, "--container", help="Container image for the Kubeflow job."
        ),
        checkpoint_pvc: str = typer.Option(
            None, "--checkpoint-pvc", help="PersistentVolumeClaim the Kubeflow pods checkpoint to."
        ),
        checkpoint_every: int = typer.Option(
            None, "--checkpoint-every", help="Save a checkpoint every N steps (default 100)."
        ),
        checkpoint_dir: str = typer.Option(
            None,
            "--checkpoint-dir",
            help="Where node<i>.sh and job.sbatch checkpoint and resume from (a shared "
            "directory; default: checkpoints/ beside plan.json); made absolute here.",
        ),
        checkpoint_name: str = typer.Option(
            None,
            "--checkpoint-name",
            help="The pods' checkpoint directory on the claim (default meshplan-<plan id>); "
            "give the old one to resume a re-planned job.",
        ),
        max_restarts: int = typer.Option(
            None, "--max-restarts", help="torchrun worker restarts and pod restarts (default 3)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    ) -> None:
        """Write torchrun scripts per node, a Slurm batch file and a Kubeflow PyTorchJob for a plan."""
        if data is not None and data != "synthetic":
            # The scripts run elsewhere and from other directories: pin what the user meant here.
            data = os.path.abspath(data)
        if checkpoint_dir is not None and checkpoint_dir.strip():
            checkpoint_dir = os.path.abspath(checkpoint_dir)
        paths = emit_files(
            plan,
            out,
            rdzv_endpoint=rdzv_endpoint,
            data=data,
            steps=steps,
            container=container,
            checkpoint_pvc=checkpoint_pvc,
            checkpoint_every=checkpoint_every,
            checkpoint_dir=checkpoint_dir,
            checkpoint_name=checkpoint_name,
            max_restarts=max_restarts,
        )
        names = sorted(p.name for p in paths)
        if as_json:
            print_json({"out": str(out), "files": names})
            return
        console = err_console()
        console.print(f"wrote {len(paths)} files to [bold]{out}/[/]: {_summary(names)}")
        console.print(f"see {out}/README.md for which file to run where")


def _summary(names: list[str]) -> str:
    """The file list for humans: node scripts as one range (a 2,048-node plan has 2,048)."""
    nodes = [n for n in names if re.fullmatch(r"node\d+\.sh", n)]
    rest = [n for n in names if n not in nodes and not n.startswith(".")]
    if len(nodes) > 2:
        rest.insert(0, f"node0.sh ... node{len(nodes) - 1}.sh")
    else:
        rest = sorted(nodes) + rest
    return ", ".join(rest)


def register(app: typer.Typer) -> None:
    _emit_command(app)

    @app.command("launch")
    def launch(
        plan: str = typer.Argument(..., help="plan.json of a single-node plan."),
        steps: int = typer.Option(None, "--steps", help="Training steps (>= 1)."),
        metrics: str = typer.Option(None, "--metrics", help="Write per-step JSONL metrics here."),
        data: str = typer.Option(None, "--data", help="Token file (default: synthetic data)."),
    ) -> None:
        """Run a plan on this host with torchrun (--standalone); returns the executor's exit code."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise SpecError(
                f"`meshplan launch` needs torch: run {TORCH_HINT} in the meshplan checkout"
            )
        check_launch_options(steps, metrics, data)
        loaded = _single_node_plan(plan)
        _check_host(loaded, plan)
        if data is not None and data != "synthetic":
            _check_tokens_fit(loaded, data)
        cmd = _command(loaded, plan, steps, metrics, data)
        env = {**os.environ, "MESHPLAN_NODE_INDEX": "0"}
        # torchrun would default every process to 1 thread (with a warning); share the cores.
        nproc = loaded.cluster.uniform_gpus_per_node or 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        err_console().print("running: " + " ".join(cmd[1:]))
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            raise typer.Exit(rc)
