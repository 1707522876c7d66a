"""Plain references for the TTT ops: one row and one token (or one mini-batch) at a time.

Inner gradients come from ``torch.autograd.grad`` on :func:`.loss.ln_fused_l2_loss` (``create_graph=True``, so the
outer gradients flow too), never from the closed forms the fast paths use. There is no padding and no batching over
rows, so a row's first token simply sits at position ``offset[r]``.

* ``naive_recurrent_ttt_*`` — primal form, twin of :mod:`.recurrent`: token ``t`` at position ``s`` accumulates
  ``G += eta_t * dloss_t/dW`` at the anchor ``W`` and reads ``W - token_idx[s] * G``; at ``s == b - 1`` (every
  token when ``online``) that becomes the new anchor.
* ``naive_chunk_ttt_*`` — dual form per mini-batch, twin of :mod:`.chunk`: explicit ``eta_ij = token_idx_i *
  eta_j`` matrix and ``xq_i . xk_j`` products instead of per-token weights.

Both compute one function; the tests check all four against each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import Offset, check_ttt_args, compute_dtype
from .loss import gelu_tanh, layer_norm, ln_fused_l2_loss

Params = list[Tensor]


def _linear(x: Tensor, p: Params) -> Tensor:
    return x @ p[0] + p[1]


def _mlp(x: Tensor, p: Params) -> Tensor:
    return gelu_tanh(x @ p[0] + p[1]) @ p[2] + p[3]


def _as_input(t: Tensor) -> Tensor:
    """A tensor ``autograd.grad`` can differentiate with respect to."""
    return t if t.requires_grad else t.detach().requires_grad_(True)


def naive_recurrent_ttt_linear(
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
    """Reference for :func:`.recurrent.recurrent_ttt_linear` (same arguments and returns)."""
    offsets = check_ttt_args("linear", q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offset)
    return _naive_recurrent(_linear, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets, online)


def naive_recurrent_ttt_mlp(
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
    """Reference for :func:`.recurrent.recurrent_ttt_mlp` (same arguments and returns)."""
    offsets = check_ttt_args("mlp", q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offset)
    return _naive_recurrent(_mlp, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets, online)


def naive_chunk_ttt_linear(
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
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Reference for :func:`.chunk.chunk_ttt_linear` (same arguments and returns)."""
    offsets = check_ttt_args("linear", q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offset)
    return _naive_chunk(_linear_group, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets)


def naive_chunk_ttt_mlp(
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
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Reference for :func:`.chunk.chunk_ttt_mlp` (same arguments and returns)."""
    offsets = check_ttt_args("mlp", q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offset)
    return _naive_chunk(_mlp_group, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets)


def _per_row(fn, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets):
    """Run ``fn`` on each row in the compute dtype, outside autocast, and stack the results."""
    dt = compute_dtype(q, params[0])
    outs, new_params, new_grads = [], [], []
    with torch.autocast(q.device.type, enabled=False):
        cast = [t.to(dt) for t in (q, k, v, eta, token_idx, ln_weight, ln_bias)]
        q_, k_, v_, eta_, tok, lw, lb = cast
        ln = (lw[:, None, :], lb[:, None, :])  # [H, 1, D]
        for r, o in enumerate(offsets):
            p = [t[r].to(dt) for t in params]
            g = [torch.zeros_like(t) for t in p] if grads is None else [t[r].to(dt) for t in grads]
            # [H, T, D] per row
            x = [t[r].transpose(0, 1) for t in (q_, k_, v_)]
            out, p, g = fn(*x, eta_[r].transpose(0, 1), tok, ln, p, g, o)
            outs.append(out.transpose(0, 1))
            new_params.append(p)
            new_grads.append(g)
    o = torch.stack(outs, dim=0).to(q.dtype)
    params = tuple(torch.stack(ts, 0) for ts in zip(*new_params, strict=True))
    return o, params, tuple(torch.stack(ts, 0) for ts in zip(*new_grads, strict=True))


def _naive_recurrent(f, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets, online):
    def row(xq, xk, xv, e, tok, ln, p, g, o):
        b = tok.numel()
        outs = []
        for t in range(xq.shape[1]):
            s = (o + t) % b
            xq_t, xk_t, xv_t = xq[:, t : t + 1], xk[:, t : t + 1], xv[:, t : t + 1]  # [H, 1, D]
            with torch.enable_grad():
                anchor = [_as_input(w) for w in p]
                loss = ln_fused_l2_loss(f(xk_t, anchor), xv_t - xk_t, *ln).sum()
                d = torch.autograd.grad(loss, anchor, create_graph=True)
            g = [a + e[:, t, None, None] * dw for a, dw in zip(g, d, strict=True)]
            w = [pw - tok[s] * a for pw, a in zip(p, g, strict=True)]
            outs.append(xq_t + layer_norm(f(xq_t, w), *ln))
            if online or s == b - 1:
                p, g = w, [torch.zeros_like(a) for a in g]
        return torch.cat(outs, dim=1), p, g

    return _per_row(row, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets)


def _naive_chunk(group_fn, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets):
    def row(xq, xk, xv, e, tok, ln, p, g, o):
        b = tok.numel()
        T = xq.shape[1]
        outs = []
        t0 = 0
        while t0 < T:
            s0 = (o + t0) % b
            t1 = min(T, t0 + b - s0)  # the rest of this mini-batch
            s = torch.arange(s0, s0 + t1 - t0, device=xq.device)
            sl = slice(t0, t1)
            n = t1 - t0
            eta_mat = torch.tril(tok[s][:, None] * e[:, sl][:, None, :])  # [H, n, n]
            out, contrib = group_fn(xq[:, sl], xk[:, sl], xv[:, sl], e[:, sl], tok[s][:, None], eta_mat, ln, p, g)
            outs.append(out)
            g = [a + c for a, c in zip(g, contrib, strict=True)]
            if s0 + n == b:
                p = [pw - tok[b - 1] * a for pw, a in zip(p, g, strict=True)]
                g = [torch.zeros_like(a) for a in g]
            t0 = t1
        return torch.cat(outs, dim=1), p, g

    return _per_row(row, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets)


def _linear_group(xq, xk, xv, e, tok, eta_mat, ln, p, g):
    W1, b1 = p
    with torch.enable_grad():
        z1 = _as_input(xk @ W1 + b1)  # [H, n, D]
        (g1,) = torch.autograd.grad(ln_fused_l2_loss(z1, xv - xk, *ln).sum(), [z1], create_graph=True)
    zq = xq @ W1 + b1 - tok * (xq @ g[0] + g[1]) - (eta_mat * (xq @ xk.mT + 1.0)) @ g1
    e = e[..., None]
    contrib = [xk.mT @ (e * g1), (e * g1).sum(dim=1, keepdim=True)]
    return xq + layer_norm(zq, *ln), contrib


def _mlp_group(xq, xk, xv, e, tok, eta_mat, ln, p, g):
    W1, b1, W2, b2 = p
    with torch.enable_grad():
        z1 = _as_input(xk @ W1 + b1)  # [H, n, F]
        x2 = gelu_tanh(z1)
        z2 = x2 @ W2 + b2  # [H, n, D]
        g1, g2 = torch.autograd.grad(ln_fused_l2_loss(z2, xv - xk, *ln).sum(), [z1, z2], create_graph=True)
    z1q = xq @ W1 + b1 - tok * (xq @ g[0] + g[1]) - (eta_mat * (xq @ xk.mT + 1.0)) @ g1
    x2q = gelu_tanh(z1q)
    z2q = x2q @ W2 + b2 - tok * (x2q @ g[2] + g[3]) - (eta_mat * (x2q @ x2.mT + 1.0)) @ g2
    e = e[..., None]
    contrib = [
        xk.mT @ (e * g1),
        (e * g1).sum(dim=1, keepdim=True),
        x2.mT @ (e * g2),
        (e * g2).sum(dim=1, keepdim=True),
    ]
    return xq + layer_norm(z2q, *ln), contrib
