"""Distributed checkpoints with torch.distributed.checkpoint (DCP): save every N steps, resume.

Owns: `save_checkpoint`, `load_checkpoint`. Does not own: when to save (train.py), the layout
(parallelize.py), or the directory's naming and completion rules (executor/checkpoint_dir.py:
a save goes to a temporary directory and becomes `step_N/` and `latest` only when complete).

Keys are layout-free: model keys are the full model's parameter names (chunks keep global layer
indices), optimizer state is flattened per parameter name (`StateDictOptions(
flatten_optimizer_state_dict=True)`), and DTensor/FSDP shards are saved as global tensors by DCP,
so a checkpoint written under one plan loads under another (DCP resharding on load): other
tp/pp/dp, ZeRO stage, layer split or rank map. Each chunk has its own optimizer so that
`get_state_dict` sees one module per optimizer. A checkpoint records the model's fingerprint
and is refused for any other model before a tensor is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from executor import checkpoint_dir as layout
from executor.faults import maybe_hang
from executor.parallelize import ParallelModel
from planner.plan import Plan

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer with the fault-injection point between the shards and `.metadata`."""

    def __init__(self, path: Path, step: int) -> None:
        super().__init__(path)
        self._step = step

    def finish(self, metadata: Any, results: Any) -> None:
        maybe_hang("dcp_finish", self._step)
        super().finish(metadata, results)


def _state(
    model: ParallelModel, optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[dict[str, Any], list[tuple[set[str], set[str]]]]:
    merged: dict[str, Any] = {}
    keys: list[tuple[set[str], set[str]]] = []
    for module, optim in zip(model.modules, optimizers, strict=True):
        msd, osd = get_state_dict(module, optim, options=_OPTIONS)
        keys.append((set(msd), set(osd)))
        merged.update({f"model.{k}": v for k, v in msd.items()})
        merged.update({f"optim.{k}": v for k, v in osd.items()})
    return merged, keys


def _layout(plan: Plan) -> str:
    """The writing plan's layout, for people reading the record (keys are layout-free)."""
    c = plan.config
    return (
        f"tp={c.tp} pp={c.pp} dp={c.dp} cp={c.cp} ep={c.ep} zero={c.zero} "
        f"schedule={c.schedule.value} v={c.virtual_stages} "
        f"stage_layers={list(c.stage_layers or ())}"
    )


def save_checkpoint(
    root: str | Path,
    step: int,
    model: ParallelModel,
    optimizers: Sequence[torch.optim.Optimizer],
    plan: Plan,
) -> Path:
    """Save the state after `step` completed steps (collective over all ranks). Returns the
    published `step_N/` once every rank's shards, DCP's index and the record are in place."""
    state, _ = _state(model, optimizers)
    state["trainer.step"] = step
    rank0 = dist.get_rank() == 0
    if rank0:
        layout.begin(root, step)
    dist.barrier()
    dcp.save(state, storage_writer=_Writer(layout.partial_dir(root, step), step))
    if rank0:
        maybe_hang("publish", step)
        record = layout.CheckpointRecord(
            step=step,
            model_name=plan.model.name,
            model_fingerprint=layout.model_fingerprint(plan.model),
            layout=_layout(plan),
            world_size=plan.config.world_size,
        )
        layout.publish(root, step, record)
    # No rank goes on (or exits) before the checkpoint is published.
    dist.barrier()
    return layout.step_dir(root, step)


def load_checkpoint(
    root: str | Path,
    step: int,
    model: ParallelModel,
    optimizers: Sequence[torch.optim.Optimizer],
    plan: Plan,
) -> int:
    """Load step `step` into the model and optimizers in place; returns the saved step.
    CheckpointError (before anything is read) for a torn checkpoint or another model's."""
    path = layout.check_loadable(root, step, layout.model_fingerprint(plan.model), plan.model.name)
    state, keys = _state(model, optimizers)
    state["trainer.step"] = -1
    dcp.load(state, checkpoint_id=str(path))
    for (module, optim), (mkeys, okeys) in zip(
        zip(model.modules, optimizers, strict=True), keys, strict=True
    ):
        set_state_dict(
            module,
            optim,
            model_state_dict={k: state[f"model.{k}"] for k in mkeys},
            optim_state_dict={k: state[f"optim.{k}"] for k in okeys},
            options=_OPTIONS,
        )
    return int(state["trainer.step"])
