"""`meshplan env`: versions, solvers and devices this host has."""

from __future__ import annotations

import importlib.util
import platform
from typing import Any

import typer
from rich.table import Table

from cli.common import out_console, print_json


def environment() -> dict[str, Any]:
    """Facts about this host; torch is inspected only if installed, and never required."""
    import pulp

    import planner

    info: dict[str, Any] = {
        "meshplan": planner.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pulp": pulp.__version__,
        "solvers": sorted(pulp.listSolvers(onlyAvailable=True)),
        "torch": None,
        "cuda_devices": [],
    }
    if importlib.util.find_spec("torch") is not None:
        import torch

        info["torch"] = torch.__version__
        info["gloo"] = bool(
            torch.distributed.is_available() and torch.distributed.is_gloo_available()
        )
        if torch.cuda.is_available():
            info["cuda_devices"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
            info["nccl"] = torch.distributed.is_nccl_available()
    return info


def register(app: typer.Typer) -> None:
    @app.command("env")
    def env(as_json: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
        """Show versions, available ILP solvers, and torch / GPU presence."""
        info = environment()
        if as_json:
            print_json(info)
            return
        table = Table(title="meshplan env", show_header=False)
        for key, value in info.items():
            table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
        out_console().print(table)
