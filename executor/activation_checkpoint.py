"""Activation checkpointing per the plan's recompute mode, applied to one transformer block.

Owns: `apply_ac`. Does not own: the recomputation mechanics, which live in the block itself
(`TransformerBlock.recompute`, `Attention.recompute_core`, both using non-reentrant
`torch.utils.checkpoint`), so that parameter names never gain a wrapper prefix and
checkpoints/initialisation stay independent of the recompute mode.

Modes (Korthikanti et al. 2022, "Reducing Activation Recomputation", Sec. 4-5):
- none: keep every activation.
- selective: recompute the attention core softmax(QK^T/sqrt(d))V in backward (Sec. 5).
- full: keep only the block input and recompute the whole block in backward (Sec. 4.1).
"""

from __future__ import annotations

from torch import nn

from executor.model import TransformerBlock
from planner.parallel import Recompute


def apply_ac(block: nn.Module, mode: Recompute | str) -> nn.Module:
    """Set `block`'s recompute mode in place and return it (the profiler calls this on one
    block, the executor on every block of its chunks)."""
    mode = Recompute(mode)
    if not isinstance(block, TransformerBlock):
        raise TypeError(f"apply_ac expects a TransformerBlock, got {type(block).__name__}")
    block.recompute = Recompute.FULL if mode is Recompute.FULL else Recompute.NONE
    block.attention.recompute_core = mode is Recompute.SELECTIVE
    return block
