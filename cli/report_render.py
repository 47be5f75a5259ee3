"""Pictures and the HTML page of `meshplan report` / `validate` / `plan --report`.

Owns: three matplotlib figures (Agg backend, imported lazily) — the pipeline timeline (Gantt per
pipeline rank), memory per rank stacked by kind against capacity, predicted vs measured step
time — saved as PNG and SVG, and one self-contained HTML page (inline CSS and SVG, no network).
Also owns `require_matplotlib`, the up-front check of every command that draws.
Does not own: any number in them. It imports neither torch nor planner/ (bar its error type):
callers pass plain lists/dicts (cli/validate_cmd.py builds them from the plan, the estimate and
the measurements), so what is drawn is exactly what the caller computed.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.extras import require
from planner.errors import SpecError

# Colours per timeline op kind and memory kind (matplotlib's tab10, colour-blind friendly order).
TIMELINE_COLOURS = {
    "forward": "#1f77b4",
    "backward": "#ff7f0e",
    "communication": "#2ca02c",
    "optimizer": "#9467bd",
    "bubble": "#d9d9d9",
}
MEMORY_KINDS = ("weights", "grads", "optimizer", "activations", "other")
MEMORY_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
MIB = 2**20
# Predicted-vs-measured axes turn logarithmic when max/min exceeds this (dimensionless).
LOG_AXES_RATIO = 5.0


def require_matplotlib(needed_by: str) -> None:
    """Raise one SpecError with the install hint when matplotlib is missing.

    Commands that draw call this before any work, e.g. `require_matplotlib("--report")`.
    """
    require("matplotlib", "report", needed_by)


def _pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    require_matplotlib("drawing the report's pictures")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out_base: str | Path, option: str = "--out") -> list[Path]:
    """Write `<out_base>.png` and `<out_base>.svg`, each atomically; close the figure.

    `option` is the command-line option that named the directory, for the error message.
    """
    plt = _pyplot()
    base = Path(out_base)
    paths = [base.with_suffix(".png"), base.with_suffix(".svg")]
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        _save_atomically(fig, paths[0], format="png", dpi=120, bbox_inches="tight")
        _save_atomically(fig, paths[1], format="svg", bbox_inches="tight", metadata={"Date": None})
    except OSError as e:
        raise SpecError(
            f"{option} {base.parent}: cannot write {e.filename or base} ({e.strerror or e})"
        ) from None
    finally:
        plt.close(fig)
    return paths


def _save_atomically(fig: Any, path: Path, **kwargs: Any) -> None:
    """savefig into a temporary file beside `path`, then rename: never a half-drawn picture."""
    # savefig creates the file itself, so it gets the usual permissions (mkstemp's are 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def bubbles(
    events: Sequence[dict[str, Any]], ranks: int, makespan_s: float
) -> list[dict[str, Any]]:
    """Idle intervals of each rank inside [0, makespan] between its compute/communication ops."""
    out = []
    for r in range(ranks):
        busy = sorted((e["start_s"], e["end_s"]) for e in events if e["rank"] == r)
        t = 0.0
        for a, b in busy:
            if a > t + 1e-12:
                out.append({"rank": r, "kind": "bubble", "start_s": t, "end_s": a})
            t = max(t, b)
        if makespan_s > t + 1e-12:
            out.append({"rank": r, "kind": "bubble", "start_s": t, "end_s": makespan_s})
    return out


def timeline_figure(
    events: Sequence[dict[str, Any]], *, ranks: int, title: str, makespan_s: float | None = None
) -> Any:
    """Gantt chart: one row per pipeline rank; events are dicts with rank, kind (forward |
    backward | communication | optimizer), start_s, end_s and an optional text label.
    Bubbles (idle time) are derived from the gaps and drawn grey."""
    plt = _pyplot()
    end = makespan_s if makespan_s is not None else max((e["end_s"] for e in events), default=0.0)
    unit, scale = ("ms", 1e3) if end < 10 else ("s", 1.0)
    all_events = list(events) + bubbles(events, ranks, end)
    fig, ax = plt.subplots(figsize=(max(8.0, min(18.0, 0.25 * len(events))), 1.0 + 0.7 * ranks))
    for kind, colour in TIMELINE_COLOURS.items():
        spans = [e for e in all_events if e["kind"] == kind]
        for e in spans:
            height = 0.35 if kind == "communication" else 0.8
            ax.broken_barh(
                [(e["start_s"] * scale, (e["end_s"] - e["start_s"]) * scale)],
                (e["rank"] - height / 2, height),
                facecolors=colour,
                edgecolors="white" if kind != "bubble" else "none",
                linewidth=0.5,
                label=kind if e is spans[0] else None,
            )
            if e.get("label") is not None and kind in ("forward", "backward"):
                ax.text(
                    (e["start_s"] + e["end_s"]) / 2 * scale,
                    e["rank"],
                    str(e["label"]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
    ax.set_yticks(range(ranks))
    ax.set_yticklabels([f"stage {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlim(0, end * scale * 1.01 if end > 0 else 1)
    ax.set_xlabel(f"time in one training step ({unit})")
    ax.set_ylabel("pipeline rank")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, frameon=False)
    return fig


def memory_figure(
    stages: Sequence[dict[str, Any]], *, capacity_bytes: float | None, title: str
) -> Any:
    """Stacked bars, one per pipeline rank (dict with `name` and bytes per MEMORY_KINDS key),
    in MiB, and a dashed line at the per-device capacity."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(stages) + 3), 4.5))
    names = [str(s["name"]) for s in stages]
    bottom = [0.0] * len(stages)
    for kind, colour in zip(MEMORY_KINDS, MEMORY_COLOURS, strict=True):
        heights = [float(s.get(kind, 0.0) or 0.0) / MIB for s in stages]
        ax.bar(names, heights, bottom=bottom, color=colour, label=kind, gid=f"mem-{kind}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    if capacity_bytes:
        ax.axhline(capacity_bytes / MIB, color="black", linestyle="--", label="capacity")
    ax.set_xlabel("pipeline rank")
    ax.set_ylabel("memory per device (MiB)")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def scatter_figure(points: Sequence[dict[str, Any]], *, title: str) -> Any:
    """Predicted vs measured step time (ms), one point per configuration, with the y = x line
    and the +-15 % band (the issue's MAPE target)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 5.5))
    xs = [p["measured_s"] * 1e3 for p in points]
    ys = [p["predicted_s"] * 1e3 for p in points]
    hi = max(xs + ys, default=1.0) * 1.1
    lo = min(xs + ys, default=1.0) * 0.9
    # Log axes when the times span more than LOG_AXES_RATIO, so fast configurations do not
    # collapse into one corner; the +-15 % band keeps its meaning (it is multiplicative).
    log = lo > 0 and hi / lo > LOG_AXES_RATIO
    grid = [lo * (hi / lo) ** (i / 50) for i in range(51)] if log else [lo, hi]
    ax.plot(grid, grid, color="black", linewidth=1, label="y = x (perfect)")
    ax.fill_between(
        grid, [g * 0.85 for g in grid], [g * 1.15 for g in grid], color="#dddddd", label="±15 %"
    )
    if log:
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda v, _pos: f"{v:g}")
        # minor ticks labelled at 2x and 5x only, so labels do not collide
        sparse = FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(sparse)
    ax.scatter(xs, ys, color="#1f77b4", zorder=3, label="configuration")
    top = [p for p in points if p.get("top")]
    if top:
        ax.scatter(
            [p["measured_s"] * 1e3 for p in top],
            [p["predicted_s"] * 1e3 for p in top],
            marker="*",
            s=200,
            color="#d62728",
            zorder=4,
            label="planner's top choice",
        )
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(str(p["label"]), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    scale = " (log scale)" if log else ""
    ax.set_xlabel(f"measured step time (ms, median after warm-up){scale}")
    ax.set_ylabel(f"predicted step time (ms){scale}")
    ax.set_title(title)
    ax.legend(loc="upper left", frameon=False)
    return fig


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.92em}figure{margin:1em 0}svg{max-width:100%;height:auto}
"""


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def inline_svg(path: str | Path) -> str:
    """An SVG file's markup without its XML prolog/doctype, ready to embed in HTML. Any
    http(s) reference is dropped: the page must render offline (its xmlns attributes are
    names, not fetches, and the HTML parser does not need them)."""
    text = Path(path).read_text()
    text = re.sub(r"<\?xml[^>]*\?>", "", text)
    text = re.sub(r"<!DOCTYPE[^>]*>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="https?://[^"]*"', "", text)
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return text.strip()


def html_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """One self-contained page: `sections` are (heading, already-escaped HTML body)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{body}")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
