"""Moshi's LM loader, 7B architecture and acoustic delays, behind our own names.

`train/`, `eval/` and the quickstart use these instead of importing moshi (only `integrations/` imports moshi:
tests/test_import_boundary.py). Two of them wrap private moshi names, each imported here and nowhere else in the
package:

- `moshi.models.loaders._lm_kwargs` (Moshi 7B's LMModel arguments) -> `moshi_7b_lm_kwargs`;
- `moshi.models.lm._delay_sequence` / `_undelay_sequence` (what `LMModel.forward` applies to codes and logits)
  -> `delay_codes` / `undelay_logits`.

If an upstream bump renames or moves them, importing this module fails with an ImportError naming the missing
name (`model.lm_kwargs: moshi-7b`, `ttt_speech.eval.nll` and everything importing them stop at import, not with
wrong numbers); fix the imports here. tests/integrations/test_moshi_lm.py checks the wrappers against
`LMModel.forward` so a change of meaning is caught too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import moshi
import torch
from moshi.models.lm import LMModel, _delay_sequence, _undelay_sequence
from moshi.models.loaders import _lm_kwargs, get_moshi_lm


def moshi_version() -> str:
    """The installed moshi's version string."""
    return moshi.__version__


def moshi_location() -> Path:
    """The directory the installed moshi package is imported from (the patched checkout under `upstream/`)."""
    return Path(moshi.__file__).parent


def moshi_7b_lm_kwargs() -> dict[str, Any]:
    """A copy of Moshi 7B's `LMModel` arguments (moshi's private `loaders._lm_kwargs`)."""
    return dict(_lm_kwargs)


def load_moshi_lm(weights: str | Path | None, lm_kwargs: dict[str, Any] | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  lora_weights: str | Path | None = None, fuse_lora: bool = False) -> LMModel:
    """A base (non-TTT) `LMModel` through moshi's own `get_moshi_lm` (strict loading).

    Args:
        weights: a `.safetensors` file, or None for random weights (moshi's init).
        lm_kwargs: `LMModel` arguments; default Moshi 7B's.
        lora_weights: an adapter file (`lora.safetensors`, as `save_adapters` writes it) to load on top.
        fuse_lora: merge the adapters into the base linears.
    """
    return get_moshi_lm(None if weights is None else str(weights), lm_kwargs=lm_kwargs, device=device, dtype=dtype,
                        lora_weights=None if lora_weights is None else str(lora_weights), fuse_lora=fuse_lora)


def delay_codes(delays: list[int], codes: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Apply the acoustic delays as `LMModel.forward` does: stream k of codes [B, K, T] is shifted right by
    `delays[k]`, its first frames filled with `initial[:, k]` (of shape [B, K, 1]). Returns [B, K, T]."""
    if codes.dim() != 3 or len(delays) != codes.shape[1]:
        raise ValueError(f"codes must be [B, {len(delays)}, T] (one stream per delay), got {list(codes.shape)}")
    return _delay_sequence(list(delays), codes, initial)


def undelay_logits(delays: list[int], logits: torch.Tensor,
                   fill_value: float = float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo the delays on logits [B, K, T, ...] as `LMModel.forward` does: stream k is shifted left by `delays[k]`,
    its last frames set to `fill_value`. Returns (logits [B, K, T, ...], valid mask [B, K, T] bool)."""
    if logits.dim() < 3 or len(delays) != logits.shape[1]:
        raise ValueError(f"logits must be [B, {len(delays)}, T, ...] (one stream per delay), got {list(logits.shape)}")
    return _undelay_sequence(list(delays), logits, fill_value=fill_value)
