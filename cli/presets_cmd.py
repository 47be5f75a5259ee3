"""`meshplan presets [gpus|clusters|models]` and `meshplan presets show NAME`."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from cli.common import format_bytes, out_console, print_json
from planner.errors import SpecError, did_you_mean

KINDS = ("gpus", "clusters", "models")


def _rows(kind: str) -> list[dict[str, Any]]:
    import presets as P

    if kind == "gpus":
        out = []
        for name in P.gpu_names():
            g = P.load_gpu(name)
            out.append(
                {
                    "name": name,
                    "kind": g.kind.value,
                    "memory_bytes": g.memory_bytes,
                    "peak_bf16_tflops": g.peak_bf16_flops / 1e12,
                    "peak_fp32_tflops": g.peak_fp32_flops / 1e12,
                    "hbm_gb_per_s": g.hbm_bytes_per_s / 1e9,
                }
            )
        return out
    if kind == "clusters":
        out = []
        for name in P.node_type_names():
            n = P.load_node_type(name)
            out.append(
                {
                    "name": name,
                    "gpu": n.gpu.name,
                    "gpus_per_node": n.gpus,
                    "intra_link": n.intra_link.name,
                    "intra_gb_per_s": n.intra_link.bandwidth_bytes_per_s / 1e9,
                    "nics": n.nics,
                    "nic_gb_per_s": n.nic.bandwidth_bytes_per_s / 1e9,
                }
            )
        return out
    out = []
    for name in P.model_names():
        m = P.load_model(name)
        out.append(
            {
                "name": name,
                "params_b": m.param_count().total / 1e9,
                "layers": m.layers,
                "hidden": m.hidden,
                "heads": m.heads,
                "kv_heads": m.kv_heads,
                "ffn_hidden": m.ffn_hidden,
                "vocab": m.vocab,
                "mlp": m.mlp.value,
                "max_seq_len": m.max_seq_len,
            }
        )
    return out


def _table(kind: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"meshplan presets: {kind}")
    if not rows:
        return table
    for col in rows[0]:
        table.add_column(
            col, justify="left" if col in ("name", "gpu", "kind", "intra_link", "mlp") else "right"
        )
    for row in rows:
        cells = []
        for key, value in row.items():
            if key == "memory_bytes":
                cells.append(format_bytes(value))
            elif isinstance(value, float):
                cells.append(f"{value:,.3f}".rstrip("0").rstrip("."))
            else:
                cells.append(str(value))
        table.add_row(*cells)
    return table


def _show(name: str, as_json: bool) -> None:
    import presets as P

    loaders = {
        "gpus": (P.gpu_names, P.load_gpu),
        "clusters": (P.node_type_names, P.load_node_type),
        "models": (P.model_names, P.load_model),
    }
    for kind, (names, load) in loaders.items():
        if name in names():
            spec = load(name)
            if as_json:
                print_json({"kind": kind, "name": name, "spec": spec})
            else:
                out_console().print(_table(kind, [r for r in _rows(kind) if r["name"] == name]))
                out_console().print(spec)
            return
    everything = [n for names, _ in loaders.values() for n in names()]
    raise SpecError(
        f"unknown preset '{name}'{did_you_mean(name, everything)}; see `meshplan presets`"
    )


def register(app: typer.Typer) -> None:
    @app.command("presets")
    def presets(
        kind: str = typer.Argument(
            None, help="gpus | clusters | models (default: all three), or `show`"
        ),
        name: str = typer.Argument(None, help="With `show`: the preset to show."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    ) -> None:
        """List the built-in GPUs, cluster node types and models; `presets show NAME` shows one."""
        if kind == "show":
            if not name:
                raise SpecError("`meshplan presets show` needs a NAME")
            _show(name, as_json)
            return
        if kind is not None and kind not in KINDS:
            raise SpecError(
                f"unknown preset kind '{kind}'{did_you_mean(kind, KINDS)}; use one of {'|'.join(KINDS)} or show NAME"
            )
        if name is not None:
            raise SpecError(
                f"unexpected argument '{name}'; did you mean `meshplan presets show {name}`?"
            )
        kinds = [kind] if kind else list(KINDS)
        data = {k: _rows(k) for k in kinds}
        if as_json:
            print_json(data)
            return
        console = out_console()
        for k in kinds:
            console.print(_table(k, data[k]))
