"""Primal form of TTT-Linear / TTT-MLP, one token at a time (decode, and the ``primal`` scan mode).

Each token adds ``eta_t * grad_t`` (the inner gradient at the anchor weights, closed form) to the accumulator ``G``
and reads the weights ``W - token_idx[pos] * G``; at the last position of a mini-batch those weights become the new
anchor and ``G`` is cleared. This is the same function as :mod:`.chunk` (the dual form), computed with per-token
weights. With ``online=True`` every token commits (see ``docs/ttt.md``).

Every per-token decision is device arithmetic: the position is ``(offset + t) % b`` on the device, and the commit
selects the candidate anchor with ``torch.where(pos == b - 1, ...)``. A call with ``offset`` given as a tensor on
``q``'s device therefore reads nothing on the host (no device sync: a decode step can be captured in a CUDA graph).
The selection returns exactly one of its operands, so the result is bit-identical to branching on host offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import Offset, check_ttt_args, compute_dtype
from .loss import gelu_tanh, gelu_tanh_grad, layer_norm, ln_fused_l2_grad


def recurrent_ttt_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    token_idx: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    params: Sequence[Tensor],
    grads: Sequence[Tensor] | None = None,
    offset: Offset = None,
    online: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """TTT-Linear, primal form. Arguments and returns as :func:`.chunk.chunk_ttt_linear`.

    Args:
        online: commit after every token instead of at the end of each mini-batch (a different function).
    """
    start = check_ttt_args("linear", q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offset, on_device=True)
    return _recurrent(_linear_token, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, start, online)


def recurrent_ttt_mlp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    token_idx: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    params: Sequence[Tensor],
    grads: Sequence[Tensor] | None = None,
    offset: Offset = None,
    online: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """TTT-MLP, primal form. Arguments and returns as :func:`.chunk.chunk_ttt_mlp`, plus ``online``."""
    start = check_ttt_args("mlp", q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offset, on_device=True)
    return _recurrent(_mlp_token, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, start, online)


def _recurrent(token_fn, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, start, online):
    """The scan from ``start`` (int64 [B] on ``q``'s device); no host read of tensor values."""
    B, T, H, D = q.shape
    b = token_idx.numel()
    dt = compute_dtype(q, params[0])
    with torch.autocast(q.device.type, enabled=False):
        xq, xk, xv = (t.to(dt).transpose(1, 2)[..., None, :] for t in (q, k, v))  # [B, H, T, 1, D]
        e = eta.to(dt).transpose(1, 2)[..., None, None]  # [B, H, T, 1, 1]
        tok = token_idx.to(dt)
        gamma, beta = ln_weight.to(dt)[:, None, :], ln_bias.to(dt)[:, None, :]
        state = [p.to(dt) for p in params]
        acc = [torch.zeros_like(p) for p in state] if grads is None else [g.to(dt) for g in grads]
        zs = []
        for t in range(T):
            pos = (start + t) % b  # [B]
            tok_t = tok[pos].view(B, 1, 1, 1)
            contrib, read = token_fn(xk[:, :, t], xv[:, :, t], e[:, :, t], state, gamma, beta)
            acc = [a + c for a, c in zip(acc, contrib, strict=True)]
            weights = [p - tok_t * a for p, a in zip(state, acc, strict=True)]
            zs.append(read(xq[:, :, t], weights))
            if online:
                state, acc = weights, [torch.zeros_like(a) for a in acc]
            else:
                commit = (pos == b - 1).view(B, 1, 1, 1)  # the candidate anchor, selected on the device
                state = [torch.where(commit, w, p) for w, p in zip(weights, state, strict=True)]
                acc = [a.masked_fill(commit, 0.0) for a in acc]
        z = torch.cat(zs, dim=2)  # [B, H, T, D]
        o = (xq.squeeze(3) + layer_norm(z, gamma, beta)).transpose(1, 2).to(q.dtype)
    return o, tuple(state), tuple(acc)


def _linear_token(xk, xv, e, state, gamma, beta):
    W1, b1 = state
    g1 = ln_fused_l2_grad(xk @ W1 + b1, xv - xk, gamma, beta)  # [B, H, 1, D]
    contrib = [e * (xk.mT @ g1), e * g1]

    def read(xq, w):
        return xq @ w[0] + w[1]

    return contrib, read


def _mlp_token(xk, xv, e, state, gamma, beta):
    W1, b1, W2, b2 = state
    z1 = xk @ W1 + b1  # [B, H, 1, F]
    x2 = gelu_tanh(z1)
    g2 = ln_fused_l2_grad(x2 @ W2 + b2, xv - xk, gamma, beta)  # [B, H, 1, D]
    g1 = (g2 @ W2.mT) * gelu_tanh_grad(z1)
    contrib = [e * (xk.mT @ g1), e * g1, e * (x2.mT @ g2), e * g2]

    def read(xq, w):
        return gelu_tanh(xq @ w[0] + w[1]) @ w[2] + w[3]

    return contrib, read
