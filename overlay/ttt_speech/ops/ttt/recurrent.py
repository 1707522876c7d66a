"""Primal form of TTT-Linear / TTT-MLP, one token at a time (decode, and the ``primal`` scan mode).

Each token adds ``eta_t * grad_t`` (the inner gradient at the anchor weights, closed form) to the accumulator ``G``
and reads the weights ``W - token_idx[pos] * G``; at the last position of a mini-batch those weights become the new
anchor and ``G`` is cleared. This is the same function as :mod:`.chunk` (the dual form), computed with per-token
weights. With ``online=True`` every token commits (see ``docs/ttt.md``).

Every per-token decision is device arithmetic: the position is ``(offset + t) % b`` on the device, and the commit
is masked: every token computes ``W - (token_idx[pos] * [pos == b - 1]) * G`` (the anchor itself where the mask is
0) and ``G * [pos != b - 1]``. A call with ``offset`` given as a tensor on ``q``'s device therefore reads
nothing on the host (no device sync: a decode step can be captured in a CUDA graph). A token reads
``x W - token_idx * (x G)`` instead of forming ``W - token_idx * G``, so the masked commit costs no extra pass over
the weights (``scripts/bench_ttt_decode.py`` times the step).
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
            tok_t = tok.index_select(0, pos).view(B, 1, 1, 1)
            factors, read = token_fn(xk[:, :, t], xv[:, :, t], e[:, :, t], state, gamma, beta)
            # one fused pass per weight: G + left * right (the outer product by broadcasting)
            acc = [torch.addcmul(a, left, right) for a, (left, right) in zip(acc, factors, strict=True)]
            zs.append(read(xq[:, :, t], state, acc, tok_t))  # reads W - tok * G without forming it
            if online:
                state = [torch.addcmul(p, tok_t, a, value=-1.0) for p, a in zip(state, acc, strict=True)]
                acc = [torch.zeros_like(a) for a in acc]
            else:
                # the commit by masked arithmetic: W - (tok * [i == b - 1]) * G, then G times [i != b - 1]
                # (exact for finite G: W + 0 * G == W; a product, as torch.where is several times slower on CPU)
                commit = (pos == b - 1).view(B, 1, 1, 1)
                step = tok_t * commit
                state = [torch.addcmul(p, step, a, value=-1.0) for p, a in zip(state, acc, strict=True)]
                keep = (~commit).to(dt)
                acc = [a * keep for a in acc]
        z = torch.cat(zs, dim=2)  # [B, H, T, D]
        o = (xq.squeeze(3) + layer_norm(z, gamma, beta)).transpose(1, 2).to(q.dtype)
    return o, tuple(state), tuple(acc)


def _linear_token(xk, xv, e, state, gamma, beta):
    W1, b1 = state
    g1 = ln_fused_l2_grad(xk @ W1 + b1, xv - xk, gamma, beta)  # [B, H, 1, D]
    factors = [(xk.mT, e * g1), (e, g1)]  # eta * grad of W1 (an outer product) and of b1, as (left, right)

    def read(xq, w, g, tok):
        return xq @ w[0] + w[1] - tok * (xq @ g[0] + g[1])

    return factors, read


def _mlp_token(xk, xv, e, state, gamma, beta):
    W1, b1, W2, b2 = state
    z1 = xk @ W1 + b1  # [B, H, 1, F]
    x2 = gelu_tanh(z1)
    g2 = ln_fused_l2_grad(x2 @ W2 + b2, xv - xk, gamma, beta)  # [B, H, 1, D]
    g1 = (g2 @ W2.mT) * gelu_tanh_grad(z1)
    factors = [(xk.mT, e * g1), (e, g1), (x2.mT, e * g2), (e, g2)]  # eta * grad of W1, b1, W2, b2 as (left, right)

    def read(xq, w, g, tok):
        x2 = gelu_tanh(xq @ w[0] + w[1] - tok * (xq @ g[0] + g[1]))
        return x2 @ w[2] + w[3] - tok * (x2 @ g[2] + g[3])

    return factors, read
