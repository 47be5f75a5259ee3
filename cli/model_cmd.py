"""`meshplan model show CONFIG|PRESET [--json]`: what meshplan reads a model as, and its size.

Owns: the report of one model: its family (the config.json `model_type` and what the registry
calls it), the shape, `params_total` and `params_active` (per token), parameters by part, the
config keys ignored as irrelevant to cost, the reader's notes, whether the cost model prices
it (planner/model_support.py) and whether the executor builds it (executor/support.py).
Does not own: reading (presets.load_model, planner/model_registry.py) or counting
(ModelSpec.param_count).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from cli.common import JSON_OPTION, out_console, print_json
from planner.errors import SpecError
from planner.specs import ModelSpec


def _origin(source: str, spec: ModelSpec) -> dict[str, Any]:
    """model_type, registry family, ignored keys and notes (config.json only)."""
    from planner.model_registry import REGISTRY, read_hf_config

    path = Path(source)
    if path.suffix != ".json":
        kind = "model YAML" if path.suffix in (".yaml", ".yml") else "meshplan preset"
        return {"source": kind, "model_type": None, "family": kind, "ignored": [], "notes": []}
    # presets.load_model has read and validated this file already; read it again for the
    # registry's bookkeeping.
    read = read_hf_config(json.loads(path.read_text()), spec.name, str(path))
    return {
        "source": "config.json",
        "model_type": read.family,
        "family": REGISTRY[read.family][0],
        "ignored": list(read.ignored),
        "notes": list(read.notes),
    }


def _moe_layers(spec: ModelSpec) -> int:
    m = spec.moe
    return 0 if m is None else sum(m.is_moe_layer(i) for i in range(spec.layers))


def _block_parts(spec: ModelSpec) -> dict[str, int]:
    """One MoE block's (else one dense block's) parameters by part; with dense layers in an
    MoE model, also a dense block's MLP."""
    pc = spec.param_count()
    attention, norms = spec.attention_params(), spec.block_norms * spec.norm_params(spec.hidden)
    parts = {"attention": attention, "norms": norms}
    dense_mlp = replace(spec, moe=None).param_count().per_block - attention - norms
    m = spec.moe
    if m is None:
        return {**parts, "mlp": dense_mlp}
    routed = pc.routed_experts // _moe_layers(spec)
    router = spec.hidden * m.experts + (m.experts if m.router_bias else 0)
    router += spec.hidden if m.shared_expert_gate else 0
    parts.update(router=router, routed_experts=routed)
    parts["shared_experts"] = pc.per_block - attention - norms - router - routed
    if _moe_layers(spec) < spec.layers:
        parts["dense_block_mlp"] = dense_mlp
    return parts


def _support(spec: ModelSpec) -> dict[str, Any]:
    from executor.support import check_buildable
    from planner.model_support import check_priceable

    out: dict[str, Any] = {}
    try:
        out["cost_model"] = {"priced": True, "notes": list(check_priceable(spec))}
    except SpecError as e:
        out["cost_model"] = {"priced": False, "refused": str(e)}
    try:
        check_buildable(spec)
        out["executor"] = {"builds": True}
    except SpecError as e:
        out["executor"] = {"builds": False, "refused": str(e)}
    return out


def model_report(source: str) -> dict[str, Any]:
    from presets import load_model

    spec = load_model(source)
    pc = spec.param_count()
    return {
        "name": spec.name,
        **_origin(source, spec),
        "shape": {
            "layers": spec.layers,
            "hidden": spec.hidden,
            "heads": spec.heads,
            "kv_heads": spec.kv_heads,
            "head_dim": spec.head_dim,
            "ffn_hidden": spec.ffn_hidden,
            "vocab": spec.vocab,
            "max_seq_len": spec.max_seq_len,
            "moe_layers": _moe_layers(spec),
        },
        "params_total": pc.total,
        "params_active": pc.active,
        "params": {
            "embedding": pc.embedding,
            "position": pc.position,
            "blocks": pc.blocks,
            "final_norm": pc.final_norm,
            "head": pc.head,
            "routed_experts": pc.routed_experts,
            "routed_active": pc.routed_active,
        },
        "per_block": _block_parts(spec),
        **_support(spec),
        "spec": spec,
    }


def _print(report: dict[str, Any]) -> None:
    console = out_console()
    table = Table(title=f"model {report['name']}: {report['family']}", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    table.add_row(
        "params_total", f"{report['params_total']:,} ({report['params_total'] / 1e9:.2f} B)"
    )
    table.add_row(
        "params_active", f"{report['params_active']:,} ({report['params_active'] / 1e9:.2f} B)"
    )
    for key, value in report["shape"].items():
        table.add_row(key, f"{value:,}")
    for key, value in report["params"].items():
        table.add_row(f"params.{key}", f"{value:,}")
    for key, value in report["per_block"].items():
        table.add_row(f"per_block.{key}", f"{value:,}")
    console.print(table)
    cost, executor = report["cost_model"], report["executor"]
    console.print(f"cost model: {'priced' if cost['priced'] else cost['refused']}", highlight=False)
    for note in [*report["notes"], *cost.get("notes", [])]:
        console.print(f"  note: {note}", highlight=False)
    console.print(
        f"executor: {'builds it' if executor['builds'] else executor['refused']}", highlight=False
    )
    if report["ignored"]:
        console.print(
            f"ignored (irrelevant to cost): {', '.join(report['ignored'])}", highlight=False
        )


def register(app: typer.Typer) -> None:
    # One command with an action argument, like `presets show NAME`: the top-level app's
    # flag rendering and bare-command errors apply to it as to every other command.
    @app.command("model")
    def model_command(
        action: str = typer.Argument(..., help="show"),
        model: str = typer.Argument(None, help="Model preset, HF config.json or model YAML."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """`model show CONFIG|PRESET`: family, shape, params_total / params_active, parameters
        by part, the config keys ignored as irrelevant to cost, pricing and executor support."""
        if action != "show":
            raise SpecError(f"unknown model action '{action}'; use `meshplan model show CONFIG`")
        if not model:
            raise SpecError("`meshplan model show` needs a model preset or config.json")
        report = model_report(model)
        if as_json:
            print_json(report)
        else:
            _print(report)
