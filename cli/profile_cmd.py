"""`meshplan profile`: measure compute, memory and links; `meshplan profile merge`: join node parts.

`profile` is a typer group whose callback runs the measurement when no subcommand is given
(`invoke_without_command`), so `meshplan profile --device cpu --quick` and
`meshplan profile merge DIR --out profile.json` both work. torch is imported only inside.
Owns: the options and their up-front checks (numbers, torch, --out before anything is
measured) and the output file appearing only whole (`staged_output`, `atomic_write_text`).
Does not own: measuring (profiler/run.py and the rest of profiler/) or merging
(profiler/merge.py).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from cli.common import err_console, load_model_arg, out_console, print_json
from cli.extras import require_torch
from planner.errors import SpecError
from planner.fileio import atomic_write_text, check_not_inputs, check_output_dir, check_output_file
from planner.serialize import to_jsonable

DEFAULT_MODEL = "tiny-gpt"


def parse_int_list(option: str, text: str | None) -> tuple[int, ...] | None:
    """'1,2,4' -> (1, 2, 4); None stays None (use the default)."""
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise SpecError(
            f"{option} {text!r}: expected comma-separated integers, e.g. 1,2,4"
        ) from None
    if not values:
        raise SpecError(f"{option} {text!r}: expected comma-separated integers, e.g. 1,2,4")
    return values


def _parse_phases(text: str) -> tuple[bool, bool]:
    parts = {p.strip() for p in text.split(",") if p.strip()}
    unknown = parts - {"compute", "links"}
    if unknown or not parts:
        raise SpecError(f"--phases {text!r}: use compute, links or compute,links")
    return "compute" in parts, "links" in parts


def check_profile_numbers(nproc: int | None, budget_s: float | None) -> None:
    if nproc is not None and nproc < 1:
        raise SpecError(f"--nproc {nproc}: must be a positive integer")
    if budget_s is not None and (not math.isfinite(budget_s) or budget_s <= 0):
        raise SpecError(f"--budget-s {budget_s}: must be a positive number of seconds (finite)")


def check_profile_out(out: str | None, distributed: bool) -> Path | None:
    """Check --out before anything is measured; return the file a local run writes.

    None under `--distributed`: each node writes DIR/profile-<host>.json there, named by the
    host the worker finds (profiler/run.py).
    """
    from profiler.run import DEFAULT_DISTRIBUTED_DIR, is_directory_target, node_file

    if distributed:
        target = out or DEFAULT_DISTRIBUTED_DIR
        if is_directory_target(target):  # else profiler/run.py says to give a directory
            check_output_dir(target, "--out")
        return None
    target = out or "profile.json"
    if not is_directory_target(target):
        return check_output_file(target, "--out")
    if Path(target).is_file():
        raise SpecError(
            f"--out {target}: is a file without a .json suffix; give a .json file or a DIR"
        )
    directory = check_output_dir(target, "--out")
    final = node_file(directory, socket.gethostname())
    if directory.is_dir():
        check_output_file(final, "--out")
    return final


@contextmanager
def staged_output(final: Path, option: str) -> Iterator[Path]:
    """A temporary path beside `final` for the body to write; renamed onto `final` only when
    the body succeeds, so a failed or interrupted run leaves no partial file (and an old
    `final` untouched). `final`'s directory is created then, if it is new."""
    parent = final.parent if final.parent.is_dir() else final.parent.parent
    # A .json suffix, so profiler/run.py writes it as a file, not as a directory target.
    staged = parent / f".{final.name}.{os.getpid()}.tmp.json"
    try:
        yield staged
        try:
            final.parent.mkdir(exist_ok=True)
            os.replace(staged, final)
        except OSError as e:
            raise SpecError(f"{option} {final}: cannot write ({e.strerror or e})") from None
    finally:
        staged.unlink(missing_ok=True)


def _default_nproc(device: str, distributed: bool) -> int:
    """Default workers: torchrun's local world size, 2 on CPU, every visible GPU."""
    if distributed:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device == "cpu":
        return 2
    import torch

    return max(1, torch.cuda.device_count())


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        name="profile",
        help="Measure compute, memory and links on this host's devices (or merge node profiles).",
        invoke_without_command=True,
        no_args_is_help=False,
    )

    @group.callback(invoke_without_command=True)
    def profile(
        ctx: typer.Context,
        model: str = typer.Option(
            DEFAULT_MODEL, "--model", "-m", help="Preset name, HF config.json or model YAML."
        ),
        device: str = typer.Option(
            "cpu", "--device", help="cpu (gloo, N processes) or cuda (nccl)."
        ),
        nproc: int | None = typer.Option(
            None, "--nproc", help="Local workers (default: 2 on cpu, all GPUs on cuda)."
        ),
        tp: str | None = typer.Option(
            None,
            "--tp",
            help="TP degrees to time blocks at, e.g. 1,2 (default: powers of 2 up to nproc).",
        ),
        micro_batches: str | None = typer.Option(
            None, "--micro-batches", help="Micro-batch sizes, e.g. 1,2,4."
        ),
        seq_len: int | None = typer.Option(
            None, "--seq-len", help="Sequence length (default: the model's, at most 4096)."
        ),
        dtype: str | None = typer.Option(
            None, "--dtype", help="bf16|fp16|fp32 (default: fp32 on cpu, bf16 on cuda)."
        ),
        quick: bool = typer.Option(False, "--quick", help="Few sizes, few repeats."),
        budget_s: float | None = typer.Option(
            None, "--budget-s", help="Stop measuring after this many seconds (half for compute)."
        ),
        phases: str = typer.Option("compute,links", "--phases", help="compute, links or both."),
        out: str | None = typer.Option(
            None, "--out", "-o", help="profile.json, or a DIR for DIR/profile-<host>.json."
        ),
        distributed: bool = typer.Option(
            False,
            "--distributed",
            help="Run as one process of a torchrun job (one per GPU, every node).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    ) -> None:
        """Measure per-block compute and memory, every device pair and collectives; write a profile."""
        if ctx.invoked_subcommand is not None:
            return
        require_torch("`meshplan profile`")
        from planner.specs import Dtype
        from profiler import device as dev
        from profiler.run import run_profile
        from profiler.settings import make_settings
        from profiler.summary import render_summary

        kind = dev.parse_device_kind(device)
        if dtype is not None and dtype not in {d.value for d in Dtype}:
            raise SpecError(f"--dtype {dtype!r} is not allowed; use one of bf16|fp16|fp32")
        check_profile_numbers(nproc, budget_s)
        final = check_profile_out(out, distributed)
        spec = load_model_arg(model)
        nproc = nproc if nproc is not None else _default_nproc(device, distributed)
        measure_compute, measure_links = _parse_phases(phases)
        from dataclasses import replace

        settings = replace(
            make_settings(
                model=spec,
                device_kind=kind,
                devices_per_node=nproc,
                tps=parse_int_list("--tp", tp),
                micro_batches=parse_int_list("--micro-batches", micro_batches),
                seq_len=seq_len,
                dtype=Dtype(dtype) if dtype else None,
                quick=quick,
                budget_s=budget_s,
            ),
            measure_compute=measure_compute,
            measure_links=measure_links,
        )
        console = err_console()
        if final is None:
            result = run_profile(settings, nproc=nproc, distributed=True, out=out, console=console)
        else:
            with staged_output(final, "--out") as staged:
                result = run_profile(
                    settings, nproc=nproc, distributed=False, out=str(staged), console=console
                )
            result = replace(result, written=(final,))
        if result.profile is None:
            return
        if as_json:
            print_json(
                {
                    "out": [str(p) for p in result.written],
                    "elapsed_s": round(result.elapsed_s, 3),
                    "profile": to_jsonable(result.profile),
                }
            )
            return
        render_summary(result.profile, out_console())
        for path in result.written:
            console.print(f"wrote {path} in {result.elapsed_s:.1f} s")

    @group.command("merge")
    def merge(
        sources: list[str] = typer.Argument(..., help="Directories of profile-*.json, or files."),
        out: str = typer.Option(
            "profile.json", "--out", "-o", help="The cluster profile to write."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    ) -> None:
        """Merge node profiles into one cluster profile (rejects duplicates, gaps, mismatches)."""
        from planner.serialize import dumps
        from profiler.merge import collect_paths, load_sources, merge_profiles
        from profiler.summary import render_summary

        out_path = check_output_file(out, "--out")
        # A file named on the command line is never overwritten; a directory's old result is
        # skipped by load_sources, so re-running a merge into the same directory works.
        check_not_inputs(out_path, [s for s in sources if Path(s).is_file()], "--out")
        merged, notes = merge_profiles(load_sources(collect_paths(sources), out_path))
        atomic_write_text(out_path, dumps(merged), "--out")
        console = err_console()
        if as_json:
            print_json({"out": str(out_path), "notes": notes, "profile": to_jsonable(merged)})
            return
        render_summary(merged, out_console())
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
        console.print(
            f"wrote {out_path}: {len(merged.gpus)} device(s) on {len(merged.meta.hosts)} host(s)"
        )

    app.add_typer(group, name="profile")
