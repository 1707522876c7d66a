"""moshi-finetune's loss on moshi's `LMOutput`: text CE with padding tokens down-weighted, audio CE with codebook 0
up-weighted. Invalid (delayed or padded) positions are NaN in the logits and excluded by the masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor):
    """Weighted mean CE over positions where `mask`. logits [B, K, T, V], target/mask/weights [B, K, T]."""
    w = weights * mask
    safe = torch.where(mask[..., None], logits.float(), 0.0)  # NaN at invalid positions would poison the sum
    ce = F.cross_entropy(safe.flatten(0, 2), torch.where(mask, target, 0).flatten(), reduction="none")
    return (ce * w.flatten()).sum() / w.sum().clamp_min(1e-8)


def moshi_loss(out, codes: torch.Tensor, *, text_padding_id: int, first_codebook_weight_multiplier: float,
               text_padding_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Text + audio loss of `out = LMModel(codes)`. Returns (loss, parts) with per-stream means (no grad)."""
    dep_q = out.logits.shape[1]
    text = codes[:, :1]
    text_w = torch.where(text == text_padding_id, text_padding_weight, 1.0)
    text_loss = masked_ce(out.text_logits, text, out.text_mask, text_w)
    audio = codes[:, 1:1 + dep_q]
    audio_w = torch.ones_like(audio, dtype=torch.float32)
    audio_w[:, 0] = first_codebook_weight_multiplier
    audio_loss = masked_ce(out.logits, audio, out.mask, audio_w)
    return text_loss + audio_loss, {"text": text_loss.detach(), "audio": audio_loss.detach()}
