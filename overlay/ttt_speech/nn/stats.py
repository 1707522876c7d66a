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


@torch.no_grad()
def ttt_layer_stats(layer, x: torch.Tensor, final) -> dict[str, float]:
    """The monitor's statistics of a TTT-Linear/MLP layer after a forward over `x` [B, T, C] that ended in state
    `final`: its first fast weight against W0 (`fast_weight_stats`) and the per-token inner lr eta (mean, max)."""
    if layer.config.pre_conv:  # eta reads the layer's input after its pre-conv
        x = x + layer.pre_conv(x)[0]
    eta, _ = layer._eta(x)
    return {**fast_weight_stats(final.params["W1"], layer.W1), "eta_mean": eta.float().mean().item(),
            "eta_max": eta.float().max().item()}
