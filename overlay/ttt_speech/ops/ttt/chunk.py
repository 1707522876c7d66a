"""Dual form of TTT-Linear / TTT-MLP over mini-batches (the fast path for training and prefill).

Within a mini-batch every inner gradient is taken at the anchor weights ``W`` (the weights at the start of the
mini-batch). Token ``i`` then reads ``W - token_idx[i] * (G + sum_{j <= i} eta[j] * grad_j)`` where ``G`` is the
accumulator of an earlier, uncommitted part of the same mini-batch. The dual form never materialises these per-token
weights: it contracts ``xq_i . xk_j`` first (a lower-triangular ``[K, K]`` matrix). At the last position of a
mini-batch the update is committed and the accumulator cleared.

Rows may start mid mini-batch (``offset``) and ``T`` need not be a multiple of the mini-batch: inputs are padded
internally, padded slots get ``eta = 0`` so they never enter a gradient, and a row only commits when the last slot
of a mini-batch holds one of its real tokens. The reference twins are in :mod:`.naive`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import Offset, check_ttt_args, compute_dtype
from .loss import gelu_tanh, gelu_tanh_grad, layer_norm, ln_fused_l2_grad


def chunk_ttt_linear(
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
    """TTT-Linear (inner model ``z = x @ W1 + b1``), dual form.

    Args:
        q, k, v: of shape [B, T, H, D] (RoPE already applied to ``q`` and ``k``).
        eta: of shape [B, T, H], the per-token inner learning rate (``base_lr * sigmoid(.) / D``).
        token_idx: of shape [b]; ``b`` is the mini-batch size and ``token_idx[i] >= 0`` scales position ``i``.
        ln_weight, ln_bias: of shape [H, D], the inner LayerNorm.
        params: ``(W1 [B, H, D, D], b1 [B, H, 1, D])``, fast weights at the mini-batch anchor.
        grads: same shapes as ``params``: ``sum_j eta_j * grad_j`` over the uncommitted part of the current
            mini-batch, or None for zeros.
        offset: of shape [B] (host ints), the position of each row's first token within its mini-batch; None = 0.

    Returns:
        ``(o, params, grads)``: ``o`` of shape [B, T, H, D] in ``q.dtype`` is ``q + LN(z_q)``; the new anchor
        weights and accumulators are in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    offsets = check_ttt_args("linear", q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offset)
    return _chunk(_linear_step, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets)


def chunk_ttt_mlp(
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
    """TTT-MLP (inner model ``z = gelu_tanh(x @ W1 + b1) @ W2 + b2``), dual form.

    Args:
        As :func:`chunk_ttt_linear`, with ``params = (W1 [B, H, D, F], b1 [B, H, 1, F], W2 [B, H, F, D],
        b2 [B, H, 1, D])`` (``F = 4 * D`` in TTT-MLP) and ``grads`` of the same shapes.

    Returns:
        ``(o [B, T, H, D], params, grads)`` as in :func:`chunk_ttt_linear`.
    """
    offsets = check_ttt_args("mlp", q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offset)
    return _chunk(_mlp_step, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets)


def _padding(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Filler for padded slots. Its value must not matter (``eta`` is masked); tests replace it with noise."""
    return x.new_zeros(shape)


def _align(x: Tensor, offsets: list[int], L: int) -> Tensor:
    """[B, T, ...] -> [B, L, ...] with row ``r``'s tokens at slots ``offsets[r] .. offsets[r] + T - 1``."""
    B, T = x.shape[:2]
    rest = tuple(x.shape[2:])
    if all(o == offsets[0] for o in offsets):
        o = offsets[0]
        return torch.cat([_padding(x, (B, o) + rest), x, _padding(x, (B, L - o - T) + rest)], dim=1)
    rows = [
        torch.cat([_padding(x, (o,) + rest), x[r], _padding(x, (L - o - T,) + rest)], dim=0)
        for r, o in enumerate(offsets)
    ]
    return torch.stack(rows, dim=0)


def _unalign(x: Tensor, offsets: list[int], T: int) -> Tensor:
    """Inverse of :func:`_align`: [B, L, ...] -> [B, T, ...]."""
    if all(o == offsets[0] for o in offsets):
        return x[:, offsets[0] : offsets[0] + T]
    return torch.stack([x[r, o : o + T] for r, o in enumerate(offsets)], dim=0)


def _chunk(step, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets):
    B, T, H, D = q.shape
    b = token_idx.numel()
    dt = compute_dtype(q, params[0])
    L = -(-(max(offsets) + T) // b) * b
    N = L // b
    # fp32: inner-loop updates underflow in bf16, so the whole op runs outside autocast
    with torch.autocast(q.device.type, enabled=False):
        slots = torch.arange(L, device=q.device)
        start = torch.tensor(offsets, device=q.device)[:, None]
        real = (slots >= start) & (slots < start + T)  # [B, L]

        def chunks(x: Tensor) -> Tensor:  # [B, L, H, D] -> [N, B, H, b, D]
            return x.reshape(B, N, b, H, -1).permute(1, 0, 3, 2, 4)

        xq, xk, xv = (chunks(_align(t.to(dt), offsets, L)) for t in (q, k, v))
        e = torch.where(real[..., None], _align(eta.to(dt), offsets, L), 0.0)  # [B, L, H]
        e = e.reshape(B, N, b, H).permute(1, 0, 3, 2)  # [N, B, H, b]
        tok = token_idx.to(dt)
        E = torch.tril(tok[:, None] * e[..., None, :])  # [N, B, H, b, b]; eta_ij = token_idx_i * eta_j
        ctx = dict(
            xq=xq,
            xk=xk,
            tgt=xv - xk,
            e=e,
            E=E,
            xk_e=xk * e[..., None],
            tok=tok[:, None],
            gamma=ln_weight.to(dt)[:, None, :],
            beta=ln_bias.to(dt)[:, None, :],
        )
        state = [p.to(dt) for p in params]
        acc = None if grads is None else [g.to(dt) for g in grads]
        zs = []
        for n in range(N):
            # later chunks only start at a commit (acc = 0) or hold no real token of that row
            z, contrib = step(ctx, n, state, acc if n == 0 else None)
            zs.append(z)
            total = contrib if acc is None else [a + c for a, c in zip(acc, contrib, strict=True)]
            committed = [p - tok[-1] * t for p, t in zip(state, total, strict=True)]
            commit = [(n + 1) * b <= o + T for o in offsets]
            if all(commit):
                state, acc = committed, None
            elif not any(commit):
                acc = total
            else:
                m = torch.tensor(commit, device=q.device).view(B, 1, 1, 1)
                state = [torch.where(m, c, p) for c, p in zip(committed, state, strict=True)]
                acc = [torch.where(m, 0.0, t) for t in total]
        z = torch.stack(zs, dim=0)  # [N, B, H, b, D]
        o = xq + layer_norm(z, ctx["gamma"], ctx["beta"])
        o = o.permute(1, 0, 3, 2, 4).reshape(B, L, H, D)
        o = _unalign(o, offsets, T).to(q.dtype)
    if acc is None:
        acc = [torch.zeros_like(p) for p in state]
    return o, tuple(state), tuple(acc)


def _linear_step(ctx, n, state, acc):
    W1, b1 = state
    xq, xk, E, tok = ctx["xq"][n], ctx["xk"][n], ctx["E"][n], ctx["tok"]
    z1 = xk @ W1 + b1  # [B, H, b, D]
    g1 = ln_fused_l2_grad(z1, ctx["tgt"][n], ctx["gamma"], ctx["beta"])
    attn = E * (xq @ xk.mT + 1.0)  # [B, H, b, b]; the +1 carries the bias update
    zq = xq @ W1 + b1 - attn @ g1
    if acc is not None:
        zq = zq - tok * (xq @ acc[0] + acc[1])
    contrib = [ctx["xk_e"][n].mT @ g1, (ctx["e"][n][..., None] * g1).sum(dim=-2, keepdim=True)]
    return zq, contrib


def _mlp_step(ctx, n, state, acc):
    W1, b1, W2, b2 = state
    xq, xk, E, e, tok = ctx["xq"][n], ctx["xk"][n], ctx["E"][n], ctx["e"][n][..., None], ctx["tok"]
    z1 = xk @ W1 + b1  # [B, H, b, F]
    x2 = gelu_tanh(z1)
    z2 = x2 @ W2 + b2  # [B, H, b, D]
    g2 = ln_fused_l2_grad(z2, ctx["tgt"][n], ctx["gamma"], ctx["beta"])
    g1 = (g2 @ W2.mT) * gelu_tanh_grad(z1)  # [B, H, b, F]
    z1q = xq @ W1 + b1 - (E * (xq @ xk.mT + 1.0)) @ g1
    if acc is not None:
        z1q = z1q - tok * (xq @ acc[0] + acc[1])
    x2q = gelu_tanh(z1q)
    z2q = x2q @ W2 + b2 - (E * (x2q @ x2.mT + 1.0)) @ g2
    if acc is not None:
        z2q = z2q - tok * (x2q @ acc[2] + acc[3])
    contrib = [
        ctx["xk_e"][n].mT @ g1,
        (e * g1).sum(dim=-2, keepdim=True),
        (x2 * e).mT @ g2,
        (e * g2).sum(dim=-2, keepdim=True),
    ]
    return z2q, contrib
