"""`meshplan estimate`: predict step time, memory per GPU and throughput of one configuration.

Owns: the command's options, building the ParallelConfig from them (`--dp` derived from the
GPU count when omitted) and the rich / JSON rendering of an Estimate.
Does not own: the cost model (planner/cost/estimate.py).
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from cli.common import (
    CLUSTER_OPTION,
    DTYPE_OPTION,
    FLASH_OPTION,
    GLOBAL_BATCH_OPTION,
    GRAD_DTYPE_OPTION,
    JSON_OPTION,
    MEMORY_HEADROOM_OPTION,
    MODEL_OPTION,
    NODES_OPTION,
    PROFILE_OPTION,
    SEQ_LEN_OPTION,
    err_console,
    format_bytes,
    format_seconds,
    load_cluster_arg,
    load_model_arg,
    load_profile_for,
    out_console,
    print_json,
    training_from_args,
)
from planner.errors import ConfigError


def derive_dp(num_gpus: int, tp: int, pp: int, dp: int | None, cp: int = 1) -> int:
    """`--dp` or GPUs / (tp * pp * cp); an error naming the arithmetic when it does not divide."""
    for flag, value in (("--tp", tp), ("--pp", pp), ("--dp", dp), ("--cp", cp)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be a positive integer (>= 1)")
    if dp is not None:
        return dp
    names, values = ("tp*pp", f"{tp}*{pp}") if cp == 1 else ("tp*pp*cp", f"{tp}*{pp}*{cp}")
    if num_gpus % (tp * pp * cp):
        raise ConfigError(
            f"{names} must divide the cluster's GPU count to derive dp: {num_gpus} % ({values}) = "
            f"{num_gpus % (tp * pp * cp)}"
        )
    return num_gpus // (tp * pp * cp)


def _header(model: Any, cluster: Any, config: Any, training: Any) -> str:
    return (
        f"{model.name} on {cluster.name} ({cluster.num_gpus} GPUs): tp={config.tp} "
        f"pp={config.pp} dp={config.dp}{f' cp={config.cp}' if config.cp > 1 else ''} "
        f"micro_batch={config.micro_batch} "
        f"micro-batches={config.num_micro_batches(training)} schedule={config.schedule.value}"
        f"{f' v={config.virtual_stages}' if config.virtual_stages > 1 else ''} "
        f"recompute={config.recompute.value} sp={'on' if config.sequence_parallel else 'off'} "
        f"zero={config.zero}{f' ep={config.ep}' if config.ep > 1 else ''}"
    )


def _render(est: Any, header: str) -> None:
    out = out_console()
    if est.source == "analytic":
        out.print(
            "[bold yellow]analytic estimate[/] (no measured profile; constants calibrated "
            "on PTD-P Table 1)"
        )
    out.print(header)
    summary = Table(title="step", show_header=False)
    summary.add_row("step time", format_seconds(est.step_time_s))
    summary.add_row("tokens/s", f"{est.tokens_per_s:,.0f}")
    summary.add_row("model TFLOP/s per GPU", f"{est.model_tflops_per_gpu:.1f}")
    summary.add_row("hardware TFLOP/s per GPU", f"{est.hardware_tflops_per_gpu:.1f}")
    summary.add_row("MFU", f"{100 * est.mfu:.1f} %")
    summary.add_row("source", est.source)
    if est.corrections is not None:
        summary.add_row("corrections", est.corrections["note"])
        summary.add_row("uncorrected step time", format_seconds(est.uncorrected_step_time_s or 0))
    out.print(summary)
    bd = Table(title="time breakdown (critical rank)")
    bd.add_column("part")
    bd.add_column("time", justify="right")
    bd.add_column("share", justify="right")
    names = ["compute_s", "tp_comm_s", "pp_comm_s", "dp_comm_s", "bubble_s", "optimizer_s"]
    if est.breakdown.ep_comm_s:  # MoE dispatch + combine all-to-all (planner/cost/moe.py)
        names.insert(2, "ep_comm_s")
    if est.breakdown.cp_comm_s:
        names.insert(2, "cp_comm_s")
    for name in names:
        value = getattr(est.breakdown, name)
        bd.add_row(name[:-2], format_seconds(value), f"{100 * value / est.step_time_s:.1f} %")
    out.print(bd)
    st = Table(title="per pipeline rank (memory of its worst GPU)")
    for col in (
        "rank",
        "layers",
        "t/micro-batch",
        "model states",
        "activations",
        "other",
        "total",
        "capacity",
        "fits",
    ):
        st.add_column(col, justify="right")
    for s in est.stages:
        m = s.memory
        ok = s.memory_bytes <= s.capacity_bytes
        st.add_row(
            str(s.pp_rank),
            str(s.layers),
            format_seconds(s.time_s),
            format_bytes(m.weights + m.grads + m.optimizer),
            format_bytes(m.activations),
            format_bytes(m.other),
            format_bytes(s.memory_bytes),
            format_bytes(s.capacity_bytes),
            "yes" if ok else "[red]NO[/]",
        )
    out.print(st)
    mb = est.memory_breakdown
    worst = Table(title="memory of the fullest GPU")
    worst.add_column("kind")
    worst.add_column("bytes", justify="right")
    for name in ("weights", "grads", "optimizer", "activations", "other"):
        worst.add_row(name, format_bytes(getattr(mb, name)))
    out.print(worst)
    if est.fits:
        out.print(
            f"fits: peak {format_bytes(est.peak_memory_bytes)} of "
            f"{format_bytes(est.memory_capacity_bytes)}"
        )
    else:
        over = est.peak_memory_bytes - est.memory_capacity_bytes
        out.print(
            f"[bold red]does not fit[/]: peak {format_bytes(est.peak_memory_bytes)} exceeds "
            f"{format_bytes(est.memory_capacity_bytes)} by {format_bytes(over)}"
        )
    for note in est.notes:
        err_console().print(f"note: {note}")


def register(app: typer.Typer) -> None:
    @app.command("estimate")
    def estimate_cmd(
        model: str = MODEL_OPTION,
        cluster: str = CLUSTER_OPTION,
        nodes: int = NODES_OPTION,
        global_batch: int = GLOBAL_BATCH_OPTION,
        seq_len: int = SEQ_LEN_OPTION,
        tp: int = typer.Option(..., "--tp", help="Tensor-parallel degree."),
        pp: int = typer.Option(..., "--pp", help="Pipeline-parallel degree."),
        dp: int = typer.Option(
            None, "--dp", help="Data-parallel degree (default: GPUs/(tp*pp*cp))."
        ),
        cp: int = typer.Option(
            1, "--cp", help="Context-parallel degree (each sequence split over cp GPUs)."
        ),
        cp_attention: str = typer.Option(
            "all_gather_kv", "--cp-attention", help="all_gather_kv | ulysses (with --cp > 1)"
        ),
        micro_batch: int = typer.Option(..., "--micro-batch", help="Sequences per micro-batch."),
        schedule: str = typer.Option("1f1b", "--schedule", help="1f1b | interleaved | gpipe"),
        virtual_stages: int = typer.Option(
            1, "--virtual-stages", help="Chunks per pipeline rank (interleaved)."
        ),
        recompute: str = typer.Option("none", "--recompute", help="none | selective | full"),
        sequence_parallel: bool = typer.Option(
            None,
            "--sequence-parallel/--no-sequence-parallel",
            help="Sequence parallelism over the TP group (default: on when tp >= 2, as the "
            "executor and torchtitan run TP; the same communication volume, less memory).",
            show_default=False,
        ),
        zero: int = typer.Option(0, "--zero", help="ZeRO stage over dp: 0 | 1 | 2 | 3"),
        ep: int = typer.Option(
            1, "--ep", help="Expert-parallel degree (MoE models; divides dp and the experts)."
        ),
        dtype: str = DTYPE_OPTION,
        grad_dtype: str = GRAD_DTYPE_OPTION,
        flash_attention: bool = FLASH_OPTION,
        profile: str = PROFILE_OPTION,
        memory_headroom: float = MEMORY_HEADROOM_OPTION,
        runtime: str = typer.Option(
            "executor",
            "--runtime",
            help="Price the runtime that will run it: executor (default, what meshplan launches) "
            "| megatron-2021 | llm-foundry-fsdp1 (the systems the analytic constants are "
            "calibrated on).",
        ),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Predict step time (with breakdown), memory per GPU and throughput of one configuration."""
        from planner.cost.estimate import estimate
        from planner.parallel import ParallelConfig
        from planner.runtime import runtime_named

        semantics = runtime_named(runtime)

        model_spec = load_model_arg(model)
        cluster_spec = load_cluster_arg(cluster, nodes, memory_headroom)
        training = training_from_args(
            global_batch,
            seq_len,
            dtype,
            model_spec,
            grad_dtype=grad_dtype,
            flash_attention=flash_attention,
        )
        config = ParallelConfig(
            tp=tp,
            pp=pp,
            dp=derive_dp(cluster_spec.num_gpus, tp, pp, dp, cp),
            cp=cp,
            cp_attention=cp_attention,
            micro_batch=micro_batch,
            schedule=schedule,
            virtual_stages=virtual_stages,
            recompute=recompute,
            sequence_parallel=tp > 1 if sequence_parallel is None else sequence_parallel,
            zero=zero,
            ep=ep,
        )
        prof = load_profile_for(profile, cluster_spec, training, model_spec)
        est = estimate(model_spec, training, cluster_spec, config, prof, runtime=semantics)
        if as_json:
            data = est.to_json()
            data["config"] = {name: getattr(config, name) for name in config.__dataclass_fields__}
            data["num_micro_batches"] = config.num_micro_batches(training)
            print_json(data)
        else:
            _render(est, _header(model_spec, cluster_spec, config, training))
        if not est.fits:
            # Like `plan`: a configuration that does not fit is "infeasible" (exit 3), after
            # the report that shows by how much.
            raise typer.Exit(3)
