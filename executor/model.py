"""The decoder-only transformer the executor trains and the profiler times (GPT and Llama shapes).

Owns: `Embedding`, `TransformerBlock`, `HeadAndLoss`, `Transformer` and `init_weights`, all built
from the planner's `ModelSpec` so that `Transformer(spec)` has exactly
`spec.param_count().total` parameters.
The feed-forward of an MoE layer (`spec.moe.is_moe_layer(i)`) is `executor.moe.MoE`.
Does not own: any parallelism (tp.py, pp.py, dp.py, ep.py), activation checkpointing policy
(activation_checkpoint.py sets `TransformerBlock.recompute`), or the training loop.

Layout follows torchtitan/nanoGPT: pre-norm blocks, separate q/k/v/o projections named
wq/wk/wv/wo and MLP matrices w1 (gate or up), w2 (down), w3 (SwiGLU up), so tensor parallelism
can shard them by name. Every module reads the number of heads it holds from its weight shapes,
so the same code runs on a full block and on a tensor-parallel shard.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from executor.moe import MoE
from executor.support import check_buildable
from planner.parallel import Recompute
from planner.specs import MlpKind, ModelSpec, NormKind, PositionKind

if TYPE_CHECKING:
    from executor.cp import ContextParallel

NORM_EPS = 1e-5  # LayerNorm/RMSNorm epsilon of GPT-2 and Llama-2 (HF configs: 1e-5)
ROPE_THETA = 10_000.0  # RoPE base (Su et al. 2021, RoFormer Sec. 3.4.2; Llama-2 default)
INIT_STD = 0.02  # Normal init std of GPT-2 / nanoGPT for every weight matrix


def _norm(spec: ModelSpec) -> nn.Module:
    if spec.norm is NormKind.LAYERNORM:
        return nn.LayerNorm(spec.hidden, eps=NORM_EPS)
    return nn.RMSNorm(spec.hidden, eps=NORM_EPS)


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq, head_dim/2] of rotary embeddings (RoFormer, Su et al. 2021, Eq. 34).

    Computed per forward rather than cached in a buffer: it costs O(seq * head_dim), nothing next
    to the matmuls, and it keeps the module free of non-persistent buffers that meta-device
    construction would leave uninitialised. `positions` (default 0..seq_len-1) are the tokens'
    places in the sequence: a context-parallel shard's are not contiguous (executor/cp.py).
    """
    inv_freq = 1.0 / (
        ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    if positions is None:
        positions = torch.arange(seq_len, device=device)
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [mb, seq, heads, head_dim] by position angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads (Ainslie et al. 2023, GQA)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, qkv_bias = spec.hidden, spec.bias or spec.qkv_bias
        self.head_dim = spec.head_dim
        self.rope = spec.position is PositionKind.ROPE
        self.wq = nn.Linear(h, spec.q_dim, bias=qkv_bias)
        self.wk = nn.Linear(h, spec.kv_dim, bias=qkv_bias)
        self.wv = nn.Linear(h, spec.kv_dim, bias=qkv_bias)
        self.wo = nn.Linear(spec.q_dim, h, bias=spec.bias)
        # Set by activation_checkpoint.apply_ac: recompute softmax(QK^T)V in backward.
        self.recompute_core = False
        # Set by cp.apply_cp: this rank holds a context-parallel shard of the sequence.
        self.context_parallel: ContextParallel | None = None

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """RoPE + grouped-query causal SDPA on [mb, seq, heads, head_dim] tensors."""
        cp = self.context_parallel
        if self.rope:
            where = cp.positions(q.shape[1], q.device) if cp is not None else None
            cos, sin = rope_cos_sin(q.shape[1], self.head_dim, q.device, q.dtype, where)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cp is not None:  # all-gather K, V over the CP group (executor/cp.py)
            return cp.attention(q, k, v).transpose(1, 2).flatten(2)
        # enable_gqa shares each K/V head across its query group inside the kernel, so no
        # expanded K/V copies are kept for backward (37 % fewer saved attention bytes at 4:1).
        grouped = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        return out.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mb, seq = x.shape[0], x.shape[1]
        # -1 heads: a tensor-parallel shard holds heads/tp of them.
        q = self.wq(x).view(mb, seq, -1, self.head_dim)
        k = self.wk(x).view(mb, seq, -1, self.head_dim)
        v = self.wv(x).view(mb, seq, -1, self.head_dim)
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            out = self.core(q, k, v)
        return self.wo(out)


class FeedForward(nn.Module):
    """GELU 2-matrix MLP (GPT-2) or SwiGLU 3-matrix MLP (Shazeer 2020, Eq. 6; Llama)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, f, b = spec.hidden, spec.ffn_hidden, spec.bias
        self.swiglu = spec.mlp is MlpKind.SWIGLU
        self.w1 = nn.Linear(h, f, bias=b)
        self.w2 = nn.Linear(f, h, bias=b)
        self.w3 = nn.Linear(h, f, bias=b) if self.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


def _to_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """A norm's output in autocast's dtype. Autocast runs norms in fp32 and casts a linear's
    input per call, so q/k/v (and w1/w3) would each save their own low-precision copy of the
    same input for backward; casting once here makes them share one (and halves the
    sequence-parallel all-gather). A no-op without autocast."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, spec: ModelSpec, layer_id: int) -> None:
        super().__init__()
        check_buildable(spec)
        self.layer_id = layer_id
        self.attention_norm = _norm(spec)
        self.attention = Attention(spec)
        self.ffn_norm = _norm(spec)
        moe = spec.moe is not None and spec.moe.is_moe_layer(layer_id)
        self.feed_forward: nn.Module = MoE(spec) if moe else FeedForward(spec)
        # Set by activation_checkpoint.apply_ac; FULL keeps only the block input for backward.
        self.recompute = Recompute.NONE

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(_to_compute_dtype(self.attention_norm(x)))
        return x + self.feed_forward(_to_compute_dtype(self.ffn_norm(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute is Recompute.FULL and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class Embedding(nn.Module):
    """Token embedding, plus a learned position table for GPT-style models."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_embeddings = (
            nn.Embedding(spec.max_seq_len, spec.hidden)
            if spec.position is PositionKind.LEARNED
            else None
        )
        # Set by cp.apply_cp: the tokens are a context-parallel shard (positions not contiguous).
        self.context_parallel: ContextParallel | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            cp = self.context_parallel
            positions = (
                cp.positions(tokens.shape[1], tokens.device)
                if cp is not None
                else torch.arange(tokens.shape[1], device=tokens.device)
            )
            h = h + self.pos_embeddings(positions)
        return h


class HeadAndLoss(nn.Module):
    """Final norm + LM head; `loss_fn` is token-mean cross entropy."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.norm = _norm(spec)
        self.output = nn.Linear(spec.hidden, spec.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x))

    @staticmethod
    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy averaged over every token of the micro-batch."""
    return HeadAndLoss.loss_fn(logits, targets)


class Transformer(nn.Module):
    """The whole model. A pipeline chunk is this module with `embed`/`head` set to None and the
    blocks it does not own deleted from `layers` (keys keep their global layer index, so
    checkpoints and initialisation are independent of the split)."""

    def __init__(self, spec: ModelSpec, *, tie_embeddings: bool | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.embed: Embedding | None = Embedding(spec)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(spec, i) for i in range(spec.layers)})
        self.head: HeadAndLoss | None = HeadAndLoss(spec)
        self.tied = spec.tied_embeddings if tie_embeddings is None else tie_embeddings
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the head share the token embedding (when tied and both are here). Call again
        after `to_empty` and after tensor parallelism, which replace parameters one module at a
        time and so break the sharing."""
        if self.tied and self.embed is not None and self.head is not None:
            self.head.output.weight = self.embed.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) if self.embed is not None else tokens
        for layer in self.layers.values():
            h = layer(h)
        return self.head(h) if self.head is not None else h


# Wrapper prefixes that some torch wrappers insert into parameter names; stripped so that a
# parameter's initial value depends only on its place in the model.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(fqn: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        fqn = fqn.replace(prefix, "")
    return fqn


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _initial_value(name: str, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Zeros for biases, ones for norm weights, None for tensors drawn at random."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, device=device)
    if "norm" in name:
        return torch.ones(shape, device=device)
    return None


@torch.no_grad()
def init_weights(module: nn.Module, seed: int, *, prefix: str = "") -> None:
    """Initialise every parameter from (seed, its canonical name) alone.

    Each parameter's full (global) value is drawn from a generator seeded with a hash of the seed
    and the parameter's name, then the part this rank holds is copied in (DTensor parameters from
    tensor parallelism or FSDP2 are sliced with `distribute_tensor(src_data_rank=None)`, i.e.
    locally, without communication). So a model initialises identically for any TP/PP/DP layout,
    which is what lets multi-rank losses match a single-process run. `prefix` names `module`
    inside the full `Transformer` when a bare block is initialised (e.g. "layers.3.").
    Materialise meta modules first (`module.to_empty(device=...)`).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    for fqn, param in module.named_parameters():
        name = canonical_name(prefix + fqn)
        device = param.device
        full = _initial_value(name, param.shape, device)
        if full is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(_param_seed(seed, name))
            full = torch.empty(param.shape, device=device, dtype=torch.float32)
            full.normal_(0.0, INIT_STD, generator=gen)
        if isinstance(param, DTensor):
            local = distribute_tensor(
                full, param.device_mesh, param.placements, src_data_rank=None
            ).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
