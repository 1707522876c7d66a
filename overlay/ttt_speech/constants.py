"""Numbers fixed by Mimi and Moshi, and the dtype names configs and commands use: defined once, imported everywhere
(the modules that defined them before re-export them, so their old import paths keep working)."""

from __future__ import annotations

import torch

SAMPLE_RATE = 24000  # Hz, what Mimi encodes
FRAME_RATE = 12.5  # Mimi frames (Moshi steps) per second
FRAME_SIZE = 1920  # audio samples per frame: SAMPLE_RATE / FRAME_RATE
# `model.dtype`, `--dtype`: name -> torch dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
