"""LayerNorm-fused L2 reconstruction loss of the TTT inner model, and its closed-form gradient.

For one token with inner-model output ``z`` (last dim ``D``) the self-supervised loss is

    loss(z) = 0.5 * || LN(z) - target ||^2,     LN(z) = weight * (z - mean(z)) / sqrt(var(z) + eps) + bias

with ``target = XV - XK`` (the residual form of the reconstruction target). ``var`` is the biased variance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LN_EPS = 1e-6
_GELU_C = math.sqrt(2.0 / math.pi)


def layer_norm(z: Tensor, weight: Tensor, bias: Tensor, eps: float = LN_EPS) -> Tensor:
    """LayerNorm over the last dim with per-head affine parameters.

    Args:
        z: of shape [..., D].
        weight, bias: broadcastable to ``z`` (e.g. [H, 1, D] against [B, H, K, D]).
    """
    mu = z.mean(dim=-1, keepdim=True)
    var = z.var(dim=-1, keepdim=True, unbiased=False)
    return weight * ((z - mu) / torch.sqrt(var + eps)) + bias


def ln_fused_l2_loss(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float = LN_EPS) -> Tensor:
    """Per-token loss ``0.5 * ||LN(z) - target||^2`` written with plain differentiable ops.

    Args:
        z, target: of shape [..., D].
        weight, bias: broadcastable to ``z``.

    Returns:
        Tensor of shape [...] (the last dim is reduced).
    """
    return 0.5 * (layer_norm(z, weight, bias, eps) - target).pow(2).sum(dim=-1)


def ln_fused_l2_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float = LN_EPS) -> Tensor:
    """Closed-form ``d loss / d z`` of :func:`ln_fused_l2_loss`, one token at a time.

    With ``x = (z - mean) / std`` and ``gx = weight * (LN(z) - target)``:
    ``grad = (gx - mean(gx) - x * mean(gx * x)) / std``.

    Args:
        z, target: of shape [..., D].
        weight, bias: broadcastable to ``z``.

    Returns:
        Tensor of shape [..., D].
    """
    mu = z.mean(dim=-1, keepdim=True)
    std = torch.sqrt(z.var(dim=-1, keepdim=True, unbiased=False) + eps)
    x = (z - mu) / std
    gx = weight * (weight * x + bias - target)
    return (gx - gx.mean(dim=-1, keepdim=True) - x * (gx * x).mean(dim=-1, keepdim=True)) / std


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation (the TTT-MLP inner activation)."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: Tensor) -> Tensor:
    """Derivative of :func:`gelu_tanh`, elementwise."""
    t = torch.tanh(_GELU_C * (x + 0.044715 * x.pow(3)))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
