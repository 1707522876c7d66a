"""Monitoring statistics of fast weights (pure torch)."""

from __future__ import annotations

import torch


@torch.no_grad()
def fast_weight_stats(w: torch.Tensor, w0: torch.Tensor) -> dict[str, float]:
    """Final fast weights w [B, ...] against their initial state w0 (broadcastable): mean, std, max |W|, and the
    Frobenius norm of w - w0 per row, averaged over rows."""
    w = w.detach().float()
    delta = (w - w0.detach().float()).flatten(1)
    return {"w_mean": w.mean().item(), "w_std": w.std().item(), "w_max_abs": w.abs().max().item(),
            "update_norm": delta.norm(dim=1).mean().item()}
