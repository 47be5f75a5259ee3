"""`meshplan emit` (launch files from a plan) and `meshplan launch` (run a plan on this host)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from cli.common import err_console, print_json
from planner.errors import SpecError


def emit_files(plan_path: str, out: str, **options: object) -> list[Path]:
    """Load, check and write; shared by `emit` and `plan --emit`."""
    from executor.emit import EmitOptions, write_launch_dir
    from planner.plan import load_plan

    plan = load_plan(plan_path)
    return write_launch_dir(
        plan, out, EmitOptions(**{k: v for k, v in options.items() if v is not None})
    )


def launch_command(
    plan_path: str, steps: int | None, metrics: str | None, data: str | None
) -> list[str]:
    """The torchrun command that runs a single-node plan here, showing rank 0's output only."""
    from executor.emit import ENTRY_MODULE, check_plan
    from planner.plan import load_plan
    from planner.specs import DeviceKind

    plan = load_plan(plan_path)
    check_plan(plan)
    if len(plan.cluster.nodes) != 1:
        raise SpecError(
            f"`meshplan launch` runs on this host only; the plan spans {len(plan.cluster.nodes)} nodes — "
            "use `meshplan emit` and start launch/node<i>.sh on each node"
        )
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


def register(app: typer.Typer) -> None:
    @app.command("emit")
    def emit(
        plan: str = typer.Argument(..., help="plan.json written by `meshplan plan`."),
        out: str = typer.Option(
            "launch", "--out", help="Directory to write (replaced atomically)."
        ),
        rdzv_endpoint: str = typer.Option(
            None, "--rdzv-endpoint", help="HOST:PORT of node 0 for the c10d rendezvous."
        ),
        data: str = typer.Option(
            None, "--data", help="Token file the executor trains on (default: synthetic)."
        ),
        steps: int = typer.Option(None, "--steps", help="Training steps."),
        container: str = typer.Option(
            None, "--container", help="Container image for the Kubeflow job."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    ) -> None:
        """Write torchrun scripts per node, a Slurm batch file and a Kubeflow PyTorchJob for a plan."""
        paths = emit_files(
            plan, out, rdzv_endpoint=rdzv_endpoint, data=data, steps=steps, container=container
        )
        if as_json:
            print_json({"out": str(out), "files": sorted(p.name for p in paths)})
            return
        console = err_console()
        console.print(
            f"wrote {len(paths)} files to [bold]{out}/[/]: "
            + ", ".join(sorted(p.name for p in paths))
        )
        console.print(f"see {out}/README.md for which file to run where")

    @app.command("launch")
    def launch(
        plan: str = typer.Argument(..., help="plan.json of a single-node plan."),
        steps: int = typer.Option(None, "--steps", help="Training steps."),
        metrics: str = typer.Option(None, "--metrics", help="Write per-step JSONL metrics here."),
        data: str = typer.Option(None, "--data", help="Token file (default: synthetic data)."),
    ) -> None:
        """Run a plan on this host with torchrun (--standalone); returns the executor's exit code."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise SpecError("`meshplan launch` needs torch: pip install 'meshplan[torch]'")
        cmd = launch_command(plan, steps, metrics, data)
        env = {**os.environ, "MESHPLAN_NODE_INDEX": "0"}
        # torchrun would default every process to 1 thread (with a warning); share the cores.
        nproc = int(next(a for a in cmd if a.startswith("--nproc-per-node=")).split("=")[1])
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        err_console().print("running: " + " ".join(cmd[1:]))
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            raise typer.Exit(rc)
