"""Adapter-only export (`save_adapters` with LoRA): moshi's own `get_moshi_lm(lora_weights=...)` loads it (no TTT)
into the merged export's weights, and with TTT `load_adapters(load_ttt_lm(base, ...), export)` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ttt_speech.config import load_config
from ttt_speech.errors import CheckpointMismatch
from ttt_speech.integrations.moshi import build_lm, checkpoint_ttt_config, load_ttt_lm, tiny_lm_kwargs
from ttt_speech.integrations.moshi_lm import load_moshi_lm
from ttt_speech.train.adapters import ADAPTERS_FILE, LORA_CONFIG_FILE, load_adapters
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def base_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in build_lm(seed=5).state_dict().items()}, str(path))
    return path


def lora_run(tmp_path: Path, base: Path, *overrides: str) -> Path:
    cfg = load_config(TrainConfig, TINY, [f"--run_dir={tmp_path / 'run'}", "--duration_sec=1.2", "--max_steps=3",
                                          f"--model.checkpoint={base}", "--lora.enable=true", "--lora.rank=4",
                                          "--lora.scaling=1.5", "--optim.lr=3e-2", *overrides])
    assert train(cfg)["status"] == "done"
    return tmp_path / "run" / "export"


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0, atol=1e-6, msg=key)


def test_moshis_loader_reads_the_adapters_into_the_merged_weights(tmp_path) -> None:
    from moshi.models.loaders import get_moshi_lm

    base = base_checkpoint(tmp_path)
    export = lora_run(tmp_path, base, "--ttt=null", "--lora.ft_embed=true")
    adapters = load_file(str(export / ADAPTERS_FILE))
    b_norms = [v.norm().item() for k, v in adapters.items() if k.endswith(".lora_B.weight")]
    assert max(b_norms) > 0  # trained adapters, not zeros: the comparison below can fail
    assert "text_emb.weight" in adapters and "emb.0.weight" in adapters  # ft_embed: the embeddings train fully
    lm_kwargs = json.loads((export / LORA_CONFIG_FILE).read_text())
    assert (lm_kwargs["lora"], lm_kwargs["lora_rank"], lm_kwargs["lora_scaling"]) == (True, 4, 1.5)
    moshi = get_moshi_lm(base, lm_kwargs=lm_kwargs, lora_weights=export / ADAPTERS_FILE, fuse_lora=True,
                         dtype=torch.float32)
    merged = load_file(str(export / "model.safetensors"))
    assert_same_weights(moshi.state_dict(), merged)
    assert not torch.equal(merged["text_emb.weight"], load_file(str(base))["text_emb.weight"])
    ours = load_moshi_lm(base, lm_kwargs=lm_kwargs, lora_weights=export / ADAPTERS_FILE, fuse_lora=True)
    assert_same_weights(ours.state_dict(), merged)  # the same call behind our name (integrations/moshi_lm.py)


def test_our_loader_reads_the_adapters_of_a_ttt_run(tmp_path) -> None:
    base = base_checkpoint(tmp_path)
    export = lora_run(tmp_path, base)
    from_base = load_ttt_lm(base, checkpoint_ttt_config(export, required=True), lm_kwargs=tiny_lm_kwargs())
    from_adapters = load_adapters(from_base, export)
    merged = load_ttt_lm(export)
    assert_same_weights(from_adapters.state_dict(), merged.state_dict())
    wrong = build_lm(tiny_lm_kwargs(text_card=50), seed=0)
    with pytest.raises(CheckpointMismatch, match=r"lora\.safetensors: \d+ tensors do not fit the model"):
        load_adapters(wrong, export)
