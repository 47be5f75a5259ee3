"""Tiny model shapes shared by the executor tests (small enough for CPU multi-process runs)."""

from __future__ import annotations

from planner.specs import ModelSpec

GPT = ModelSpec(
    name="tiny-gpt",
    layers=4,
    hidden=32,
    heads=4,
    kv_heads=4,
    ffn_hidden=64,
    vocab=64,
    max_seq_len=16,
)
LLAMA = ModelSpec(
    name="tiny-llama",
    layers=4,
    hidden=32,
    heads=4,
    kv_heads=2,
    ffn_hidden=48,
    vocab=64,
    max_seq_len=16,
    mlp="swiglu",
    norm="rmsnorm",
    position="rope",
    bias=False,
)
