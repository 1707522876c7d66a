"""Hugging Face conventions for a TTT Llama: its own `model_type` ("llama-ttt") registered with `AutoConfig` /
`AutoModelForCausalLM`, so a folder written by `save_pretrained` comes back with its TTT weights through Auto; old
folders (`model_type: llama` with TTT fields) load through our loader with a message saying why Auto would not."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import ttt_speech.integrations.llama_omni as llama_omni
from ttt_speech.integrations.llama_omni import (
    LlamaTTTForCausalLM,
    apply_ttt,
    from_pretrained_ttt,
    ttt_modules,
    ttt_state_dict,
)

V = 128
MODES = ["replace", "gated_residual"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ttt_config(mode: str, **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, bos_token_id=None,
                       eos_token_id=None, pad_token_id=0, use_ttt=True, ttt_layers=[0, 2], ttt_mode=mode,
                       ttt_mini_batch_size=4, ttt_base_lr=5.0, **kw)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every TTT parameter moved off its init, so a load that re-initialises one is seen."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ttt_state_dict(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
def test_auto_model_for_causal_lm_brings_back_the_ttt_weights(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    model = perturbed(LlamaTTTForCausalLM(ttt_config(mode)))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama-ttt"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlamaTTTForCausalLM and sorted(ttt_modules(loaded)) == [0, 2]
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    x = ids(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
        out = loaded.generate(x[:1], max_new_tokens=6, do_sample=False)
        assert torch.equal(out, model.generate(x[:1], max_new_tokens=6, do_sample=False))
    # and once more: the reloaded model saves the same folder type
    loaded.save_pretrained(tmp_path / "again")
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "again")) is LlamaTTTForCausalLM


def test_auto_config_reads_and_checks_the_ttt_fields(tmp_path: Path) -> None:
    torch.manual_seed(0)
    LlamaTTTForCausalLM(ttt_config("replace")).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is llama_omni.LlamaTTTModelConfig and config.model_type == "llama-ttt"
    assert config.use_ttt is True and config.ttt_layers == [0, 2] and config.ttt_mode == "replace"
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"ttt_chunk_sise": 4}))
    with pytest.raises(ValueError, match=r"unknown TTT config keys \['ttt_chunk_sise'\]"):
        AutoConfig.from_pretrained(tmp_path)
    # AutoModel (the bare decoder) has no TTT class: refused by name rather than loaded without TTT
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="LlamaTTTModelConfig"):
        AutoModel.from_pretrained(tmp_path)


def test_a_plain_llama_config_is_recorded_as_llama_ttt_and_validated() -> None:
    config = ttt_config("replace")
    model = LlamaTTTForCausalLM(config)
    assert type(model.config) is llama_omni.LlamaTTTModelConfig and model.config.ttt_layers == [0, 2]
    assert model.config.to_dict()["model_type"] == "llama-ttt"
    assert LlamaTTTForCausalLM(ttt_config("replace", attn_implementation="eager")).config._attn_implementation \
        == "eager"  # the attention implementation asked for survives the copy
    assert model.model.config is model.config  # one config object in the whole model
    assert all(layer.mlp.config is model.config for layer in model.model.layers)
    assert isinstance(model.config, LlamaConfig)  # Llama code that checks the config type still accepts it
    with pytest.raises(ValueError, match=r"config.ttt_mode must be one of \('replace', 'gated_residual'\)"):
        llama_omni.LlamaTTTModelConfig(use_ttt=True, ttt_mode="both")
    # without use_ttt it is a plain Llama under another name
    assert not ttt_modules(LlamaTTTForCausalLM(llama_omni.LlamaTTTModelConfig(vocab_size=V, hidden_size=64,
                                                                              intermediate_size=128,
                                                                              num_hidden_layers=2,
                                                                              num_attention_heads=4)))


def test_a_folder_saved_as_model_type_llama_loads_through_our_loader_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # what apply_ttt on a plain LlamaForCausalLM (and every folder saved before llama-ttt existed) writes
    torch.manual_seed(0)
    model = perturbed(apply_ttt(LlamaForCausalLM(ttt_config("gated_residual"))))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    with caplog.at_level(logging.WARNING, logger="ttt_speech"):
        loaded, report = from_pretrained_ttt(LlamaTTTForCausalLM, tmp_path)
    assert report.initialised == [] and type(loaded) is LlamaTTTForCausalLM
    for k, v in ttt_state_dict(model).items():
        assert torch.equal(ttt_state_dict(loaded)[k], v), k
    assert "model_type 'llama'" in caplog.text and "AutoModelForCausalLM" in caplog.text
    # re-saving it records llama-ttt, which Auto then loads with its TTT weights
    loaded.save_pretrained(tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    assert sorted(ttt_modules(again)) == [0, 2]
    for k, v in ttt_state_dict(model).items():
        assert torch.equal(ttt_state_dict(again)[k], v), k
