"""FP8 linears: the transformer blocks' nn.Linear layers trained in FP8 (`--dtype fp8`).

Owns: converting a model chunk's block linears to torchao's float8 training linears (dynamic
tensor-wise scaling: the recipe planner/cost/analytic.py prices, its casts included), and the
refusal where that cannot run: FP8 GEMMs need a CUDA GPU with FP8 tensor cores (Hopper or
newer) and torchao installed. The head and embedding stay in bf16, as the cost model assumes.
Does not own: mixed precision of everything else (executor/dp.py, device.py autocast).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from executor.device import Runtime

# FP8 tensor cores: compute capability 8.9 (Ada) and 9.0 (Hopper) or newer (CUDA C
# Programming Guide, "Compute capabilities" table, fp8 mma).
MIN_FP8_CAPABILITY = (8, 9)


def check_fp8_supported(runtime: Runtime) -> None:
    """ValueError naming why FP8 linears cannot run here; returns when they can."""
    if not runtime.is_cuda:
        raise ValueError(
            f"training.fp8_linears needs a CUDA GPU with FP8 tensor cores; this run is on "
            f"{runtime.device.type} (plan with --dtype bf16 to run here)"
        )
    capability = torch.cuda.get_device_capability(runtime.device)
    if capability < MIN_FP8_CAPABILITY:
        raise ValueError(
            f"training.fp8_linears needs compute capability >= 8.9 (Ada/Hopper); "
            f"{torch.cuda.get_device_name(runtime.device)} has {capability[0]}.{capability[1]}"
        )
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("training.fp8_linears needs torchao (pip install torchao)")


def apply_fp8(model: nn.Module) -> None:
    """Swap the linears under `model.layers` for torchao Float8Linear, in place (after
    `check_fp8_supported`)."""
    from torchao.float8 import convert_to_float8_training

    def in_blocks(_module: nn.Module, fqn: str) -> bool:
        return fqn.startswith("layers.")

    convert_to_float8_training(model, module_filter_fn=in_blocks)
