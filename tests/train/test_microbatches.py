"""`num_microbatches` (gradient accumulation) in the Moshi family: each step draws that many batches and logs the
mean of their losses. (The llama family's exact resume with two microbatches is in test_llama_train.py.)"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from ttt_speech.config import load_config
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.data import build_train_loader
from ttt_speech.train.loss import moshi_loss
from ttt_speech.train.model import build_model
from ttt_speech.train.trainer import train

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_moshi_microbatches_average_their_losses(tmp_path: Path) -> None:
    cfg = load_config(TrainConfig, TINY, [f"--run_dir={tmp_path}", "--duration_sec=1.2", "--batch_size=1",
                                          "--num_microbatches=2", "--max_steps=1", "--log_freq=1",
                                          "--export_safetensors=false"])
    result = train(cfg)
    torch.manual_seed(cfg.seed)  # as the trainer, before building
    model, lm_kwargs = build_model(cfg, torch.device("cpu"))
    loader = build_train_loader(cfg, cfg.duration_sec, lm_kwargs, 0, 1)
    losses = []
    with torch.no_grad():
        for _ in range(2):
            codes = next(loader)
            loss, _ = moshi_loss(model(codes), codes, text_padding_id=model.existing_text_padding_id,
                                 first_codebook_weight_multiplier=cfg.first_codebook_weight_multiplier,
                                 text_padding_weight=cfg.text_padding_weight)
            losses.append(loss.item())
    assert losses[0] != pytest.approx(losses[1])  # two different batches
    assert result["losses"][0] == pytest.approx(sum(losses) / 2, rel=1e-5)
    row = next(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert int(row["tokens_per_s"]) > 0
