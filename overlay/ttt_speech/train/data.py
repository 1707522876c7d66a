"""The training batches of a stage: codes [B, 17, T] from the manifest pipeline (`ttt_speech.data`) or, for
plumbing tests, a synthetic stream. Both are stateful: `state_dict()` / `load_state_dict()` resume exactly."""

from __future__ import annotations

from typing import Any

import torch

from ttt_speech.constants import FRAME_RATE


class SyntheticCodes:
    """Deterministic random codes with a learnable structure (audio codebook k repeats the text token shifted by
    k), distinct per rank. Batch i of rank r depends only on (seed, rank, i)."""

    def __init__(self, *, batch_size: int, frames: int, num_codebooks: int, card: int, text_card: int, seed: int,
                 rank: int) -> None:
        self.batch_size, self.frames, self.num_codebooks = batch_size, frames, num_codebooks
        self.card, self.text_card, self.seed, self.rank = card, text_card, seed, rank
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((self.seed, self.rank, self.index)) & 0x7FFFFFFF)
        self.index += 1
        text = torch.randint(0, min(self.text_card, self.card), (self.batch_size, 1, self.frames), generator=g)
        shifts = torch.arange(self.num_codebooks - 1).view(1, -1, 1)
        audio = (text + shifts) % self.card
        return torch.cat([text, audio], dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def build_train_loader(cfg, duration_sec: float, lm_kwargs: dict[str, Any], rank: int, world_size: int,
                       device: str = "cpu"):
    """The stateful loader of one curriculum stage (crops of `duration_sec`)."""
    frames = int(round(duration_sec * FRAME_RATE))
    if cfg.data.train_data == "synthetic":
        return SyntheticCodes(batch_size=cfg.batch_size, frames=frames, num_codebooks=1 + lm_kwargs["n_q"],
                              card=lm_kwargs["card"], text_card=lm_kwargs["text_card"], seed=cfg.seed, rank=rank)
    from ttt_speech import data

    data_cfg = data.DataConfig(train_manifest=cfg.data.train_data, duration_sec=duration_sec,
                               batch_size=cfg.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                               tokenizer=cfg.data.tokenizer or "", mimi=cfg.data.mimi, codes_dir=cfg.data.codes_dir,
                               device=device, text_card=lm_kwargs["text_card"])
    return data.build_loader(data_cfg, rank=rank, world_size=world_size)
