"""Training data: a seeded synthetic stream or a memory-mapped token file, identical for any layout.

Owns: `TokenSource` implementations and `local_batch` (this dp rank's rows of a step's global
batch). Does not own: micro-batching (the pipeline schedule or train.py chunks the local batch
along dim 0, in order) or tokenisation (token files are already token ids).

Order: step s's global batch is a pure function of (seed or file, s); dp rank d takes rows
[d*B/dp, (d+1)*B/dp) and micro-batch i of it is rows [i*mb, (i+1)*mb). Concatenated over dp
ranks and micro-batches that is the same global batch a single process sees, so losses match
across layouts and a resumed run sees the data it would have seen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

UINT16_VOCAB_LIMIT = 2**16  # token ids fit uint16 below this vocab size (nanoGPT's .bin format)
SYNTHETIC_MAX_STRIDE = 4  # strides of the synthetic counting sequences (a small set: learnable)


class TokenSource(Protocol):
    def global_batch(self, step: int) -> torch.Tensor:
        """Step `step`'s [global_batch, seq_len + 1] token ids (inputs plus the next token)."""
        ...


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"data:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True, kw_only=True)
class SyntheticTokens:
    """Learnable synthetic sequences from a per-step seeded CPU generator.

    Each row counts up from a random token by a random stride of 1..SYNTHETIC_MAX_STRIDE (mod
    vocab), so the next token follows from the last two: a model's loss falls from ln(vocab)
    towards ln(strides) within tens of steps, which makes "training works" visible in metrics
    (uniform random tokens would keep the loss at ln(vocab) whatever the model does).
    """

    vocab: int
    seq_len: int
    batch: int
    seed: int

    def global_batch(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step))
        start = torch.randint(self.vocab, (self.batch, 1), generator=gen)
        stride = torch.randint(1, SYNTHETIC_MAX_STRIDE + 1, (self.batch, 1), generator=gen)
        return (start + stride * torch.arange(self.seq_len + 1)) % self.vocab


@dataclass(frozen=True, kw_only=True)
class MemmapTokens:
    """A flat binary file of token ids (uint16 when vocab <= 65536, else uint32), read through
    numpy.memmap. Sample g of the run starts at token (g * seq_len) mod (tokens - seq_len - 1):
    consecutive windows, wrapping around at the end of the file."""

    path: Path
    vocab: int
    seq_len: int
    batch: int

    def _tokens(self) -> np.memmap:
        dtype = np.uint16 if self.vocab <= UINT16_VOCAB_LIMIT else np.uint32
        return np.memmap(self.path, dtype=dtype, mode="r")

    def global_batch(self, step: int) -> torch.Tensor:
        tokens = self._tokens()
        span = len(tokens) - self.seq_len - 1
        if span <= 0:
            raise ValueError(
                f"{self.path} holds {len(tokens)} tokens; seq_len + 2 = {self.seq_len + 2} needed"
            )
        first = step * self.batch
        starts = [((first + j) * self.seq_len) % span for j in range(self.batch)]
        rows = np.stack([tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows)


def make_source(data: str, *, vocab: int, seq_len: int, batch: int, seed: int) -> TokenSource:
    """`data` is "synthetic" or a path to a token file."""
    if data == "synthetic":
        return SyntheticTokens(vocab=vocab, seq_len=seq_len, batch=batch, seed=seed)
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    return MemmapTokens(path=path, vocab=vocab, seq_len=seq_len, batch=batch)


def local_batch(
    source: TokenSource, step: int, *, dp: int, dp_rank: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [global_batch/dp, seq_len] of dp rank `dp_rank` at `step`."""
    rows = source.global_batch(step)
    per_rank = rows.shape[0] // dp
    mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return mine[:, :-1].to(device), mine[:, 1:].to(device)
