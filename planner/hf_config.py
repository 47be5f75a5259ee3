"""A strict view of one Hugging Face `config.json`: every key is read, ignored by name, or refused.

Owns: `HfConfig` (typed getters whose errors name the config.json key, and the bookkeeping of
which keys were read and which were ignored as irrelevant to cost), the keys every
`PreTrainedConfig` may carry (`GENERIC_IGNORED`), and `ACTIVATIONS`, transformers' activation
names (transformers/activations.py ACT2FN) mapped onto meshplan's.
It also owns the readers' shared pieces: the Llama-style core sizes, the gated MLP, sliding-window
layers and tied embeddings under their transformers names.
Does not own: what any family means by its keys (planner/hf_dense.py, planner/hf_moe.py).

A key that is neither read nor named as ignored by the family's reader is refused: meshplan
cannot tell whether an unknown key changes cost, and guessing is how a planner becomes
confidently wrong. Keys that start with `_` are bookkeeping of transformers (`_name_or_path`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from planner.errors import SpecError
from planner.specs import (
    Activation,
    MlpKind,
    NormKind,
    PositionKind,
    check_model_limit,
    int_hint,
    is_number,
)

# Keys of transformers' PreTrainedConfig and of the generation settings older config.json files
# carry (transformers 4.x wrote them into every config): none changes a training step.
GENERIC_IGNORED = frozenset(
    {
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "unk_token_id",
        "decoder_start_token_id",
        "use_cache",
        "initializer_range",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "is_decoder",
        "chunk_size_feed_forward",
        "quantization_config",
        "auto_map",
        "torchscript",
        "use_bfloat16",
        "tie_encoder_decoder",
        "cross_attention_hidden_size",
        "tf_legacy_loss",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "cache_implementation",
    }
)
# Checked rather than ignored: these change the model when set.
GENERIC_CHECKED: Mapping[str, tuple[Any, str]] = MappingProxyType(
    {
        "is_encoder_decoder": (False, "encoder-decoder models are not decoder-only transformers"),
        "add_cross_attention": (False, "cross-attention blocks are not priced"),
        "pruned_heads": ({}, "pruned heads give blocks of different sizes"),
    }
)

# transformers/activations.py ACT2FN names -> meshplan's activation.
ACTIVATIONS: Mapping[str, Activation] = MappingProxyType(
    {
        "silu": Activation.SILU,
        "swish": Activation.SILU,
        "gelu": Activation.GELU_ERF,
        "gelu_new": Activation.GELU_TANH,
        "gelu_pytorch_tanh": Activation.GELU_TANH,
        "gelu_fast": Activation.GELU_TANH,
        "relu": Activation.RELU,
    }
)


class HfConfig:
    """One config.json being read: typed getters that name the key in errors, and the record
    of what was read (`read`) and ignored (`ignored`); `finish()` refuses the rest."""

    def __init__(self, cfg: dict[str, Any], origin: str, model_type: str) -> None:
        self.cfg, self.origin, self.model_type = cfg, origin, model_type
        self.read: set[str] = {"model_type"}
        self.ignored: set[str] = set()
        self.notes: list[str] = []

    def error(self, message: str) -> SpecError:
        return SpecError(f"{self.origin}: {message}")

    def has(self, name: str) -> bool:
        return self.cfg.get(name) is not None

    def get(self, *names: str, default: Any = ...) -> tuple[str, Any]:
        """(the key found, its value): the first of `names` present and not null."""
        self.read.update(names)
        for n in names:
            if self.cfg.get(n) is not None:
                return n, self.cfg[n]
        if default is ...:
            raise self.error(f"missing required field '{names[0]}' in config.json")
        return names[0], default

    def value(self, *names: str, default: Any = ...) -> Any:
        return self.get(*names, default=default)[1]

    def size(self, field_name: str, *names: str, default: Any = ...) -> int:
        """A positive JSON integer (not a bool, not 4096.0) within ModelSpec's bound."""
        key, value = self.get(*names, default=default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.error(f"{key}={value!r} must be a positive integer{int_hint(value)}")
        check_model_limit(f"{self.origin}: {key}", field_name, value)
        return value

    def positive(self, *names: str, default: Any = ...) -> int:
        """A positive JSON integer without a size bound (expert counts, intervals)."""
        key, value = self.get(*names, default=default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.error(f"{key}={value!r} must be a positive integer{int_hint(value)}")
        return value

    def count(self, name: str, default: int = 0) -> int:
        """An integer >= 0."""
        key, value = self.get(name, default=default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(f"{key}={value!r} must be an integer >= 0{int_hint(value)}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        key, value = self.get(name, default=default)
        if not isinstance(value, bool):
            raise self.error(f"{key}={value!r} must be true or false")
        return value

    def number(self, name: str, default: float) -> float:
        key, value = self.get(name, default=default)
        if not is_number(value):
            raise self.error(f"{key}={value!r} must be a finite number")
        return float(value)

    def nullable(self, name: str, default: Any) -> Any:
        """The value of a key whose null means "off" (not "the default"), as transformers reads
        `attn_logit_softcapping: null` or `q_lora_rank: null`; `default` when absent."""
        self.read.add(name)
        return self.cfg.get(name, default)

    def rope_fraction(self, legacy_key: str, default: float) -> float:
        """The rotated fraction of a head: `rope_parameters.partial_rotary_factor` (transformers
        5), else the 4.x key `legacy_key`, else `default`."""
        rope = self.cfg.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise self.error(f"rope_parameters={rope!r} must be a mapping")
        given = (rope or {}).get("partial_rotary_factor")
        value = self.number(legacy_key, default if given is None else given)
        if not 0 < value <= 1:
            raise self.error(f"{legacy_key}={value!r} must be a fraction in (0, 1]")
        return value

    def activation(self, name: str, default: str, allowed: Iterable[Activation]) -> Activation:
        key, value = self.get(name, default=default)
        act = ACTIVATIONS.get(value) if isinstance(value, str) else None
        allowed = tuple(allowed)
        if act is None or act not in allowed:
            names = "|".join(k for k, v in ACTIVATIONS.items() if v in allowed)
            raise self.error(
                f"{key}={value!r} is not supported for model_type '{self.model_type}'; use {names}"
            )
        return act

    def require(self, name: str, ok: Callable[[Any], bool] | Any, default: Any, why: str) -> None:
        """Refuse `name` unless its value (or `default` when absent) passes `ok` (a predicate,
        or the one allowed value); `why` says what meshplan would get wrong."""
        key, value = self.get(name, default=default)
        good = ok(value) if callable(ok) else value == ok
        if not good:
            raise self.error(
                f"{key}={value!r} is not supported for model_type '{self.model_type}': {why}"
            )

    def ignore(self, *names: str) -> None:
        """Keys irrelevant to cost (listed by `model show` when present)."""
        self.ignored.update(n for n in names if n in self.cfg)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def finish(self) -> tuple[str, ...]:
        """Refuse any key neither read nor ignored; the ignored keys present, sorted."""
        for name, (allowed, why) in GENERIC_CHECKED.items():
            if name in self.cfg and self.cfg[name] not in (None, allowed):
                self.require(name, allowed, allowed, why)
            self.read.add(name)
        self.ignore(*GENERIC_IGNORED)
        unknown = sorted(
            k for k in self.cfg if k not in self.read | self.ignored and not k.startswith("_")
        )
        if unknown:
            raise self.error(
                f"field '{unknown[0]}' is not known for model_type '{self.model_type}'; "
                "meshplan cannot tell whether it changes cost (remove it if it does not)"
            )
        return tuple(sorted(self.ignored))


Reader = Callable[[HfConfig], dict[str, Any]]
LLAMA_STYLE: Mapping[str, Any] = MappingProxyType(
    {"mlp": MlpKind.SWIGLU, "norm": NormKind.RMSNORM, "position": PositionKind.ROPE}
)


def core(c: HfConfig, heads_key: str = "num_attention_heads") -> dict[str, Any]:
    """Layers, hidden, heads, KV heads, vocab and positions under their Llama-style names."""
    heads = c.size("heads", heads_key)
    hidden = c.size("hidden", "hidden_size")
    fields = {
        "layers": c.size("layers", "num_hidden_layers"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": c.size("kv_heads", "num_key_value_heads", default=heads),
        "vocab": c.size("vocab", "vocab_size"),
        "max_seq_len": c.size("max_seq_len", "max_position_embeddings"),
    }
    if c.has("head_dim"):
        fields["head_dim"] = c.size("head_dim", "head_dim")
    c.get("head_dim", default=None)
    return fields


def gated_mlp(c: HfConfig, act_key: str = "hidden_act", default: str = "silu") -> dict[str, Any]:
    """A gate/up/down MLP of intermediate_size; the activation is the family's, not the
    structure's (gemma's gated GELU is still 3 matrices)."""
    act = c.activation(
        act_key, default, (Activation.SILU, Activation.GELU_TANH, Activation.GELU_ERF)
    )
    return {
        "ffn_hidden": c.size("ffn_hidden", "intermediate_size"),
        "activation": None if act is Activation.SILU else act,
    }


def sliding_fields(
    c: HfConfig, layers: int, rule: Callable[[int], bool] | None, default: int = 0
) -> dict[str, Any]:
    """Sliding-window layers from `layer_types` when given, else the family's rule (None: no
    sliding window in this config); `default`: the config class's window when the key is
    absent (a null key means none)."""
    c.ignore("use_sliding_window", "max_window_layers")
    c.get("layer_types", default=None)
    c.get("sliding_window", default=None)
    if rule is None:
        return {}
    window = c.count("sliding_window", default if "sliding_window" not in c.cfg else 0)
    if c.has("layer_types"):
        types = c.cfg["layer_types"]
        kinds = {"full_attention", "sliding_attention"}
        if not isinstance(types, list) or len(types) != layers or not set(types) <= kinds:
            raise c.error(
                f"layer_types must list {layers} entries of full_attention|sliding_attention"
            )
        chosen = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        chosen = tuple(i for i in range(layers) if rule(i))
    if not window or not chosen:
        return {}
    c.note(
        f"sliding window of {window} tokens in {len(chosen)} of {layers} blocks "
        "(priced as full causal attention)"
    )
    return {"sliding_window": window, "sliding_layers": chosen}


def tie(c: HfConfig, default: bool) -> dict[str, Any]:
    return {"tied_embeddings": c.flag("tie_word_embeddings", default)}
