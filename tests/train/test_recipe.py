"""The LibriLight -> DailyTalk recipe: configs that force memory, the attention window, W_down's lr group, the
stage hand-off, and the training length recorded for inference."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from ttt_speech.config import load_config
from ttt_speech.integrations.moshi import MoshiTTTConfig, load_any_lm, ttt_modules
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.data import FRAME_RATE
from ttt_speech.train.model import build_model, parameter_groups, ttt_trainable_names, w_down_names
from ttt_speech.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def recipe(name: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / f"{name}.yaml")


def tiny(run_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY, [f"--run_dir={run_dir}", "--duration_sec=1.2", "--log_freq=1",
                                           "--max_steps=2", "--ckpt_freq=100", "--batch_size=1", *overrides])


def test_the_recipe_configs_force_memory() -> None:
    """A target with content, a window far shorter than the crops, crops of many chunks, fp32 master weights, and
    stage 2 restating stage 1's TTT."""
    stage1, stage2 = recipe("librilight"), recipe("dailytalk")
    ttt1 = stage1.ttt
    assert isinstance(ttt1, MoshiTTTConfig) and stage2.ttt == ttt1
    for cfg in (stage1, stage2):
        assert cfg.ttt.target == "input_embeddings"
        assert cfg.model.dtype == "float32" and not cfg.optim.bf16_params
        assert cfg.optim.w_down_lr == "base"
        assert cfg.model.context == stage1.model.context
        frames = [round(s.duration_sec * FRAME_RATE) for s in cfg.stage_list()]
        assert all(f >= 8 * cfg.model.context for f in frames), "the window must be far shorter than every crop"
        assert frames[-1] // ttt1.chunk_size >= 8, "the longest crops must hold at least 8 complete chunks"
    assert round(stage2.duration_sec * FRAME_RATE) // ttt1.chunk_size >= 8


def test_context_sets_the_window_for_training_and_inference(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "run", "--model.context=6")
    model, lm_kwargs = build_model(cfg, torch.device("cpu"))
    assert lm_kwargs["context"] == 6
    assert {layer.self_attn.context for layer in model.transformer.layers} == {6}
    train(cfg)
    exported = tmp_path / "run" / "export"
    assert json.loads((exported / "lm_config.json").read_text())["context"] == 6
    assert {layer.self_attn.context for layer in load_any_lm(exported).transformer.layers} == {6}


@pytest.mark.parametrize("choice", ["base", "ttt"])
def test_w_down_lr_is_a_named_choice(tmp_path: Path, choice: str) -> None:
    cfg = tiny(tmp_path, "--optim.lr=1.0e-4", "--optim.ttt_lr=1.0e-3", f"--optim.w_down_lr={choice}")
    model, _ = build_model(cfg, torch.device("cpu"))
    names = w_down_names(model)
    assert names == {"transformer.layers.0.gating.linear_out.weight", "transformer.layers.2.gating.linear_out.weight"}
    params = dict(model.named_parameters())
    groups = parameter_groups(model, cfg, ttt_trainable_names(model))
    lr_of = {id(p): g["peak_lr"] for g in groups for p in g["params"]}
    assert {lr_of[id(params[n])] for n in names} == {1e-4 if choice == "base" else 1e-3}
    assert lr_of[id(params["transformer.layers.0.gating.ttt_conv.weight"])] == 1e-3
    assert lr_of[id(params["transformer.layers.1.gating.linear_out.weight"])] == 1e-4


def test_stage_handoff_refuses_a_different_ttt_and_takes_the_checkpoints_on_request(tmp_path: Path) -> None:
    train(tiny(tmp_path / "stage1", "--ttt.chunk_size=4"))
    ckpt = tmp_path / "stage1" / "export" / "model.safetensors"
    with pytest.raises(ValueError, match=r"differs from the given one in chunk_size, lr \(chunk_size: config 8, "
                                         r"checkpoint 4; lr: config 0.5, checkpoint 0.3\)"):
        train(tiny(tmp_path / "stage2", f"--model.checkpoint={ckpt}", "--ttt.lr=0.5", "--duration_sec=2.0"))
    with pytest.raises(ValueError, match="differs from the given one in chunk_size"):  # the same check in eval
        load_any_lm(ckpt, ttt={"layers": [0, 2], "chunk_size": 8, "lr": 0.3})
    # how the bf16 product is rounded is not part of what the checkpoint computes: it may be chosen at load
    split = {**json.loads((ckpt.parent / "ttt_config.json").read_text()), "split_product": True}
    loaded = load_any_lm(ckpt, ttt=split)
    assert all(m.config.split_product for m in ttt_modules(loaded).values())
    same = tiny(tmp_path / "stage2", f"--model.checkpoint={ckpt}", "--ttt=from_checkpoint", "--duration_sec=2.0")
    assert same.ttt == "from_checkpoint"
    train(same)
    exported = tmp_path / "stage2" / "export"
    assert json.loads((exported / "ttt_config.json").read_text()) == json.loads(
        (ckpt.parent / "ttt_config.json").read_text())
    # the training record keeps the longest crop of either stage: 2.0 s = 25 frames, (25 - 1) // 4 = 6 updates
    assert json.loads((exported / "ttt_training.json").read_text()) == {"max_frames": 25, "chunk_size": 4,
                                                                          "trained_chunks": 6}


def test_inference_warns_once_past_the_chunks_seen_in_training(tmp_path: Path, random_codes) -> None:
    train(tiny(tmp_path / "run", "--ttt.chunk_size=4"))  # 1.2 s = 15 frames: (15 - 1) // 4 = 3 updates in use
    model = load_any_lm(tmp_path / "run" / "export").eval()
    first, *others = [m for _, m in sorted(ttt_modules(model).items())]
    assert first.trained_chunks == 3 and all(m.trained_chunks is None for m in others)
    codes = random_codes(model, 2, 40)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(codes[:, :, :15])
        assert not caught
        with model.streaming(2):
            for t in range(24):
                model.forward_text(codes[:, :, t:t + 1])
        assert len(caught) == 1 and "past the 3 chunk updates of 4 frames seen in training" in str(caught[0].message)
        model(codes)
        assert len(caught) == 2 and "this sequence runs past" in str(caught[1].message)
