"""Human summary of a profile: per-block times, a text heat-map of pair bandwidth, collectives.

Owns: turning a Profile into rich tables (`render_summary`) and the heat-map text
(`bandwidth_heatmap`, plain strings so it is testable). Torch-free.
Does not own: measuring or the file format.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from planner.profile import Profile

# Shades from slowest to fastest link; a blank cell means "not measured".
SHADES = " ░▒▓█"
# Above this many GPUs the heat-map shows shade characters only, so it fits a terminal.
NUMERIC_HEATMAP_MAX_GPUS = 12
GB = 1e9  # nccl-tests reports GB/s in units of 1e9 bytes per second


def format_seconds(s: float) -> str:
    """Same units as cli.common.format_seconds (profiler/ does not import cli/)."""
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def compact_bytes(n: float) -> str:
    """Binary units in at most 6 characters: 512B, 516.0K, 1.0M, 64.0G."""
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024:
            return f"{int(n)}B" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def bandwidth_heatmap(profile: Profile) -> list[str]:
    """Rows of the p2p bandwidth matrix (GB/s), shaded relative to the fastest pair."""
    ids = [g.gpu_id for g in profile.gpus]
    matrix = profile.p2p_matrix()
    if not matrix:
        return []
    top = max(r.bandwidth_bytes_per_s for r in matrix.values())
    numeric = len(ids) <= NUMERIC_HEATMAP_MAX_GPUS
    width = 8 if numeric else 1
    lines = ["src\\dst " + "".join(f"{d:>{width}}" for d in ids)]
    for s in ids:
        cells = []
        for d in ids:
            rec = matrix.get((s, d))
            if s == d:
                cells.append(f"{'-':>{width}}")
            elif rec is None:
                cells.append(f"{'?':>{width}}")
            else:
                frac = rec.bandwidth_bytes_per_s / top
                shade = SHADES[min(len(SHADES) - 1, max(1, round(frac * (len(SHADES) - 1))))]
                text = f"{shade}{rec.bandwidth_bytes_per_s / GB:6.2f}" if numeric else shade
                cells.append(f"{text:>{width}}")
        lines.append(f"{s:>7} " + "".join(cells))
    lines.append(f"GB/s (1e9 B/s); shades relative to the fastest pair, {top / GB:.2f} GB/s = █")
    return lines


BLOCK_LABELS = {"embedding": "embed", "transformer_block": "block", "head_and_loss": "head+loss"}


def compute_table(profile: Profile) -> Table:
    table = Table(title="compute per block and call (median, ± IQR)", box=box.SIMPLE_HEAD)
    for col in ("block", "tp", "recomp", "mb", "fwd ms", "±", "bwd ms", "±", "activ.", "params"):
        table.add_column(col, justify="left" if col in ("block", "recomp") else "right")
    for r in sorted(
        profile.compute,
        key=lambda r: (r.device_name, r.block.value, r.tp, r.recompute.value, r.micro_batch),
    ):
        table.add_row(
            BLOCK_LABELS.get(r.block.value, r.block.value),
            str(r.tp),
            r.recompute.value[:4],
            str(r.micro_batch),
            f"{r.forward_s * 1e3:.3f}",
            f"{r.forward_spread_s * 1e3:.3f}",
            f"{r.backward_s * 1e3:.3f}",
            f"{r.backward_spread_s * 1e3:.3f}",
            compact_bytes(r.activation_bytes),
            compact_bytes(r.parameter_bytes),
        )
    return table


def collectives_table(profile: Profile) -> Table:
    table = Table(
        title="collectives (t = alpha + bytes/beta; busbw per nccl-tests)", box=box.SIMPLE_HEAD
    )
    for col in ("op", "n", "layout", "gpus", "alpha", "beta GB/s", "busbw GB/s"):
        table.add_column(col, justify="left" if col in ("op", "layout", "gpus") else "right")
    for c in profile.collectives:
        gpus = ",".join(str(g) for g in c.gpu_ids)
        table.add_row(
            c.op.value,
            str(c.group_size),
            c.layout,
            gpus if len(gpus) <= 24 else gpus[:21] + "...",
            format_seconds(c.alpha_s),
            f"{c.beta_bytes_per_s / GB:.2f}",
            f"{c.busbw_bytes_per_s / GB:.2f}",
        )
    return table


def render_summary(profile: Profile, console: Console) -> None:
    m = profile.meta
    names = sorted({g.device_name for g in profile.gpus})
    console.print(
        f"profile: {len(profile.gpus)} device(s) on {', '.join(m.hosts)}; {', '.join(names)}; "
        f"dtype {m.dtype.value}; torch {m.torch_version}; measured {m.date}"
    )
    if profile.compute:
        console.print(compute_table(profile))
    heat = bandwidth_heatmap(profile)
    if heat:
        console.print("p2p bandwidth (ping-pong, one way)")
        for line in heat:
            console.print(line, highlight=False, markup=False)
    if profile.collectives:
        console.print(collectives_table(profile))
