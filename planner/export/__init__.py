"""Exporting a plan to the trainers people already run: torchtitan, Megatron-LM, DeepSpeed.

Owns: the result types (`Export`, `Difference`), the target registry and `export_plan`.
Each target lives in its own module (torchtitan.py, megatron.py, deepspeed.py) and turns a
Plan into that trainer's command line or config; what the target cannot express is returned
as a Difference priced by re-estimating the closest expressible plan (common.py).
Pure Python: nothing here imports torch or the target packages. The argument names and
where they were read are tabled in docs/design-export.md.
"""

from __future__ import annotations

from planner.errors import SpecError
from planner.export.common import Difference, Export
from planner.plan import Plan
from planner.profile import Profile

TARGETS = ("torchtitan", "megatron", "deepspeed")

__all__ = ["TARGETS", "Difference", "Export", "export_plan"]


def export_plan(
    plan: Plan,
    target: str,
    *,
    profile: Profile | None = None,
    config_file: str | None = None,
) -> Export:
    """The target's command / config for `plan`, with the differences it cannot avoid.

    `config_file` is the trainer's own base config (torchtitan's TOML) where one is needed.
    """
    if target == "torchtitan":
        from planner.export import torchtitan

        return torchtitan.export(plan, profile=profile, config_file=config_file)
    if target == "megatron":
        from planner.export import megatron

        return megatron.export(plan, profile=profile)
    if target == "deepspeed":
        from planner.export import deepspeed

        return deepspeed.export(plan, profile=profile)
    raise SpecError(f"--to {target!r} is not a target; use one of {'|'.join(TARGETS)}")
