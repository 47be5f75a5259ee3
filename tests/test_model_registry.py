"""The strict registry through the CLI: `meshplan model show`, refusals, pricing and building.

Parameter counts against transformers are in tests/test_hf_parity.py; these tests need no
transformers.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import cli.main
from cli.main import main
from planner.errors import SpecError
from planner.model_registry import read_hf_config
from planner.model_support import FEATURES, check_priceable, features_set
from planner.serialize import dumps, from_jsonable, to_jsonable
from planner.specs import ModelSpec
from presets import load_model
from tests.cli_helpers import one_error


@pytest.fixture(autouse=True)
def _commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        cli.main, "COMMAND_MODULES", ("cli.presets_cmd", "cli.model_cmd", "cli.estimate_cmd")
    )


# Mixtral-8x7B-v0.1 config.json (Hugging Face Hub), abridged to the keys that matter and two
# that do not.
MIXTRAL = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}
GEMMA2 = {
    "model_type": "gemma2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}
NEOX = {
    "model_type": "gpt_neox",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 128,
}


def _write(tmp_path: Path, cfg: dict[str, Any], name: str = "m") -> str:
    path = tmp_path / name / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    return str(path)


def test_model_show_json_of_a_config_is_one_document(tmp_path, capsys):
    path = _write(tmp_path, MIXTRAL, "mixtral")
    assert main(["model", "show", path, "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)  # exactly one document: json.loads refuses trailing data
    assert (doc["model_type"], doc["family"], doc["name"]) == (
        "mixtral",
        "Mixtral (MoE)",
        "mixtral",
    )
    assert (
        round(doc["params_total"] / 1e9, 1) == 46.7 and round(doc["params_active"] / 1e9, 1) == 12.9
    )
    assert doc["ignored"] == ["rms_norm_eps", "torch_dtype"]
    block = doc["per_block"]
    assert block["routed_experts"] == 8 * 3 * 4096 * 14336 and block["router"] == 8 * 4096
    assert sum(block.values()) == doc["params"]["blocks"] // 32
    assert doc["shape"]["moe_layers"] == 32 and doc["spec"]["moe"]["experts"] == 8
    # MoE is priced by the MoE cost model, not refused here; the executor's MoE is not here yet
    assert doc["cost_model"]["priced"] is True


def test_model_show_of_a_preset_and_human_output(capsys):
    assert main(["model", "show", "llama3-8b"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248" in out and "meshplan preset" in out and "executor: builds it" in out


def test_model_show_says_what_is_not_priced_or_built(tmp_path, capsys):
    assert main(["model", "show", _write(tmp_path, GEMMA2), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "post_norms cannot be priced yet" in doc["cost_model"]["refused"]
    assert doc["executor"]["builds"] is False
    assert (
        "post_norms" in doc["executor"]["refused"]
        and "attn_logit_softcap" in doc["executor"]["refused"]
    )
    assert any("sliding window of 4096 tokens in 1 of 2 blocks" in n for n in doc["notes"])


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        ({**MIXTRAL, "model_type": "mamba"}, ("model_type='mamba' is not supported", "mixtral", "deepseek_v3")),
        ({k: v for k, v in MIXTRAL.items() if k != "model_type"}, ("model_type=None is not supported",)),
        ({**MIXTRAL, "model_type": ["mixtral"]}, ("model_type=['mixtral'] is not supported",)),
        ({**MIXTRAL, "moe_frobnication": 3}, ("field 'moe_frobnication' is not known for model_type 'mixtral'",)),
        ({**NEOX, "hidden_act": "tanh"}, ("hidden_act='tanh' is not supported for model_type 'gpt_neox'",)),
    ],
)  # fmt: skip
def test_unknown_families_and_keys_are_one_error_line(tmp_path, capsys, cfg, words):
    assert main(["model", "show", _write(tmp_path, cfg), "--json"]) == 2
    one_error(capsys, *words)


ESTIMATE = ["--cluster", "dgx-a100-80gb", "--global-batch", "8", "--seq-len", "64", "--tp", "1",
            "--pp", "1", "--micro-batch", "1", "--zero", "1"]  # fmt: skip


def test_estimate_refuses_a_feature_it_cannot_price(tmp_path, capsys):
    assert main(["estimate", "--model", _write(tmp_path, GEMMA2), *ESTIMATE]) == 2
    one_error(capsys, "post_norms cannot be priced yet", "saved activations")


def test_estimate_notes_what_it_prices_conservatively(tmp_path, capsys):
    assert main(["estimate", "--model", _write(tmp_path, NEOX), *ESTIMATE, "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    assert "parallel_block: priced as a sequential block" in captured.err
    assert "mlp_bias: " in captured.err and "not in the memory model's count" in captured.err


def test_param_only_features_above_the_tolerance_are_refused():
    m = replace(load_model("tiny-gpt"), bias=False, mlp_bias=True)
    with pytest.raises(SpecError, match=r"mlp_bias add 1,280 parameters \(0\.\d+%\)"):
        check_priceable(m)


def test_every_feature_field_is_a_model_field_with_a_default():
    names = {f.field for f in FEATURES}
    assert names <= set(ModelSpec.__dataclass_fields__)
    assert features_set(load_model("llama3-8b")) == ()


def test_new_fields_keep_old_plan_bytes_and_round_trip():
    # presets serialise exactly as before the new fields (none of their keys appear)
    text = dumps(load_model("qwen2.5-7b"))
    assert "activation" not in text and "mla" not in text and "sliding" not in text
    ds = read_hf_config(
        {
            "model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 64, "q_lora_rank": 16,
            "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "first_k_dense_replace": 1,
        },
        "ds",
        "config.json",
    ).spec  # fmt: skip
    gemma2 = read_hf_config(GEMMA2, "g", "config.json").spec
    for spec in (ds, gemma2):
        assert from_jsonable(ModelSpec, to_jsonable(spec)) == spec


def test_executor_refuses_what_it_does_not_build():
    pytest.importorskip("torch")
    from executor.model import Transformer

    spec = read_hf_config(NEOX, "neox", "config.json").spec
    with pytest.raises(
        SpecError,
        match=r"the executor does not build activation, mlp_bias, parallel_block, rope_fraction",
    ):
        Transformer(spec)
    # gpt-oss's router bias: the executor's router is bias-free
    from dataclasses import replace

    import presets

    mixtral = presets.load_model("mixtral-8x7b")
    biased = replace(mixtral, moe=replace(mixtral.moe, router_bias=True))
    import torch

    with torch.device("meta"), pytest.raises(SpecError, match=r"does not build moe.router_bias"):
        Transformer(replace(biased, layers=1))


def test_null_means_off_where_transformers_reads_it_so():
    capped = read_hf_config(GEMMA2, "g", "config.json").spec
    assert (capped.attn_logit_softcap, capped.final_logit_softcap) == (50.0, 30.0)
    off = {**GEMMA2, "attn_logit_softcapping": None, "final_logit_softcapping": None}
    spec = read_hf_config(off, "g", "config.json").spec
    assert (spec.attn_logit_softcap, spec.final_logit_softcap) == (0.0, 0.0)
    with pytest.raises(SpecError, match=r"rope_parameters='x' must be a mapping"):
        read_hf_config({**NEOX, "rope_parameters": "x"}, "n", "config.json")
