"""Distributed checkpoints with torch.distributed.checkpoint (DCP): save every N steps, resume.

Owns: `save_checkpoint`, `load_checkpoint`, `latest_step`. Does not own: when to save
(train.py) or the layout (parallelize.py).

Keys are layout-free: model keys are the full model's parameter names (chunks keep global layer
indices), optimizer state is flattened per parameter name (`StateDictOptions(
flatten_optimizer_state_dict=True)`), and DTensor/FSDP shards are saved as global tensors by DCP,
so a checkpoint written under one plan loads under another (DCP resharding on load).
Each chunk has its own optimizer so that `get_state_dict` sees one module per optimizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from executor.parallelize import ParallelModel

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def latest_step(root: str | Path) -> int | None:
    """The newest complete checkpoint's step (DCP writes `.metadata` last), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [
        int(m.group(1))
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").is_file()
    ]
    return max(steps) if steps else None


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


def save_checkpoint(
    root: str | Path, step: int, model: ParallelModel, optimizers: Sequence[torch.optim.Optimizer]
) -> Path:
    """Save the state after `step` completed steps (collective over all ranks)."""
    state, _ = _state(model, optimizers)
    state["trainer.step"] = step
    path = _step_dir(Path(root), step)
    dcp.save(state, checkpoint_id=str(path))
    return path


def load_checkpoint(
    root: str | Path, step: int, model: ParallelModel, optimizers: Sequence[torch.optim.Optimizer]
) -> int:
    """Load step `step` into the model and optimizers in place; returns the saved step."""
    state, keys = _state(model, optimizers)
    state["trainer.step"] = -1
    dcp.load(state, checkpoint_id=str(_step_dir(Path(root), step)))
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
