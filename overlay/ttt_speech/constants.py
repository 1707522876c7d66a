"""Numbers fixed by Mimi and Moshi, and the dtype names configs and commands use: defined once, imported everywhere
(the modules that defined them before re-export them, so their old import paths keep working).

Pure Python: torch is imported on first use of `DTYPES`, so scripts that need only the rates start at once
(`scripts/make_samples.py`, `eval/recall_docs.py`).
"""

from __future__ import annotations

from typing import Any

SAMPLE_RATE = 24000  # Hz, what Mimi encodes
FRAME_RATE = 12.5  # Mimi frames (Moshi steps) per second
FRAME_SIZE = 1920  # audio samples per frame: SAMPLE_RATE / FRAME_RATE
# `model.dtype`, `--dtype`: names (DTYPES maps them to torch dtypes)
DTYPE_NAMES = ("float32", "bfloat16")


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # name -> torch dtype; built once, on first use
        import torch

        globals()["DTYPES"] = {n: getattr(torch, n) for n in DTYPE_NAMES}
        return globals()["DTYPES"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
