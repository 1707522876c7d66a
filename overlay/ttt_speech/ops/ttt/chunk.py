"""Dual form of TTT-Linear / TTT-MLP over mini-batches (the fast path for training and prefill).

Within a mini-batch every inner gradient is taken at the anchor weights ``W`` (the weights at the start of the
mini-batch). Token ``i`` then reads ``W - token_idx[i] * (G + sum_{j <= i} eta[j] * grad_j)`` where ``G`` is the
accumulator of an earlier, uncommitted part of the same mini-batch. The dual form never materialises these per-token
weights: it contracts ``xq_i . xk_j`` first (a lower-triangular ``[K, K]`` matrix). At the last position of a
mini-batch the update is committed and the accumulator cleared.

Rows may start mid mini-batch (``offset``) and ``T`` need not be a multiple of the mini-batch: inputs are padded
internally, padded slots get ``eta = 0`` so they never enter a gradient, and a row only commits when the last slot
of a mini-batch holds one of its real tokens. The reference twins are in :mod:`.naive`.

How the work is split (CPU timings that motivate it: ``docs/ttt.md``, Benchmark):

* Everything that does not depend on the fast weights is formed for all mini-batches at once, before or after the
  loop: the ``[b, b]`` matrices ``E * ([xq, 1] [xk, 1]^T)``, the outputs ``xq + LN(zq)``, and in the backward the
  output-side gradients. Biases ride along as an extra row of the weights (``[x, 1] @ [[W], [b]]``).
* The loop over mini-batches keeps only the sequential recurrence: ``[xk; xq] @ W``, the LN-fused inner gradient
  and the commit, i.e. two batched matmuls per mini-batch for TTT-Linear. Its results go into buffers allocated
  once (``out=``); the LN-fused gradient is written with small elementwise ops. On one thread its LayerNorm is one
  fused kernel; with more threads the math runs in row blocks that stay on the calling thread (a fused LayerNorm
  kernel would open a parallel region per mini-batch, which on a busy machine waits for a descheduled thread).
* Every mini-batch commits in the loop. A row whose tokens end mid mini-batch has only padding after that
  mini-batch, so its later weights are never read; its returned state is taken from the right mini-batch.
* The backward is written by hand (``torch.autograd.Function``), mirroring the forward: batched output-side terms,
  then one loop backwards over the mini-batches carrying the gradient of the weights. It is first-order only
  (``once_differentiable``): differentiating it again raises instead of returning wrong numbers. The autograd
  references in :mod:`.naive` support any order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .common import Offset, check_ttt_args, compute_dtype
from .loss import LN_EPS


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
    return _chunk("linear", q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets)


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
    return _chunk("mlp", q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets)


def _padding(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Filler for padded slots. Its value must not matter (``eta`` is masked); tests replace it with noise."""
    return x.new_zeros(shape)


def _align(x: Tensor, offsets: list[int], L: int) -> Tensor:
    """[B, T, ...] -> [B, L, ...] with row ``r``'s tokens at slots ``offsets[r] .. offsets[r] + T - 1``."""
    B, T = x.shape[:2]
    rest = tuple(x.shape[2:])
    if all(o == offsets[0] for o in offsets):
        o = offsets[0]
        if o == 0 and T == L:
            return x
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


_ln = torch.ops.aten.native_layer_norm
_ln_bwd = torch.ops.aten.native_layer_norm_backward


def _ln_grad(dy: Tensor, x: Tensor, mu: Tensor, rstd: Tensor) -> Tensor:
    """Backward of a LayerNorm without affine: ``rstd * (dy - mean(dy) - xhat * mean(dy * xhat))``."""
    return _ln_bwd(dy, x, (x.shape[-1],), mu, rstd, None, None, (True, False, False))[0]


def _mean(x: Tensor) -> Tensor:
    return x.mean(dim=-1, keepdim=True)


def _normalize(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(xhat, rstd)`` of a LayerNorm without affine over the last dim."""
    if torch.get_num_threads() == 1:  # one fused kernel; with more threads it would open a parallel region
        x, _, rstd = _ln(z, (z.shape[-1],), None, None, LN_EPS)
        return x, rstd
    zc = z - _mean(z)
    rstd = (_mean(zc * zc) + LN_EPS).rsqrt_()
    return zc.mul_(rstd), rstd


# PyTorch runs an elementwise op or reduction on the calling thread below this many elements (its
# at::internal::GRAIN_SIZE). The per-mini-batch LN math is split into row blocks under it: opening a parallel region
# costs more than these ops, and on a busy machine a region waits for a descheduled thread.
_SERIAL_NUMEL = 32768


def _row_blocks(*ts: Tensor):
    """``ts`` (same dim 0) in row blocks of fewer than ``_SERIAL_NUMEL`` elements each (at least one row); in one
    block when torch runs on one thread."""
    if torch.get_num_threads() == 1:
        yield ts
        return
    per = max(1, (_SERIAL_NUMEL - 1) // max(1, ts[0][0].numel()))
    for i in range(0, ts[0].shape[0], per):
        yield tuple(t[i : i + per] for t in ts)


def _sum(x: Tensor) -> Tensor:
    return x.sum(dim=-1, keepdim=True)


def _ln_l2_grad(z: Tensor, c: Tensor, gamma2: Tensor, out: Tensor) -> Tensor:
    """:func:`.loss.ln_fused_l2_grad` of one mini-batch ([BH, b, D]) into ``out``, with the target folded into
    ``c = gamma * (beta - target)`` and ``gamma2 = gamma ** 2`` ([BH, 1, D]).

    Small elementwise ops in row blocks on purpose (see ``_SERIAL_NUMEL``); with more than one thread a fused
    LayerNorm kernel would open a parallel region per mini-batch.
    """
    inv_d = 1.0 / z.shape[-1]
    for z_r, c_r, gamma2_r, out_r in _row_blocks(z, c, gamma2, out):
        x, rstd = _normalize(z_r)
        gx = torch.addcmul(c_r, gamma2_r, x)  # gamma * (LN(z) - target)
        s = _sum(gx * x)
        torch.addcmul(gx.sub_(_sum(gx), alpha=inv_d), x, s, value=-inv_d, out=out_r).mul_(rstd)
    return out


def _ln_l2_grad_vjp(dg, g, z, c, gamma2, dz, dc, dgamma2) -> None:
    """Pull ``dg`` back through ``g = _ln_l2_grad(z, c, gamma2)``: writes ``dz`` and ``dc`` and adds
    ``d gamma2 = sum_b(dc * xhat)`` to ``dgamma2`` [BH, 1, D]."""
    inv_d = 1.0 / z.shape[-1]
    for dg_r, g_r, z_r, c_r, gamma2_r, dz_r, dc_r, dgamma2_r in _row_blocks(dg, g, z, c, gamma2, dz, dc, dgamma2):
        x, rstd = _normalize(z_r)
        gx = torch.addcmul(c_r, gamma2_r, x)
        s = _sum(dg_r * x)
        dgx = torch.addcmul(dg_r.sub(_sum(dg_r), alpha=inv_d), x, s, value=-inv_d, out=dc_r).mul_(rstd)
        dgamma2_r += (dgx * x).sum(dim=1, keepdim=True)
        dx = gamma2_r * dgx
        dx.addcmul_(dg_r, rstd * _sum(gx * x), value=-inv_d)
        dx.addcmul_(gx, rstd * s, value=-inv_d)
        t = _sum(dx * x) + _sum(dg_r * g_r)  # the second term: through the gradient's own 1/std factor
        dx.sub_(_sum(dx), alpha=inv_d)
        torch.addcmul(dx, x, t, value=-inv_d, out=dz_r).mul_(rstd)


def _gelu(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``gelu_tanh(x) = x * sigmoid(2u)``, ``u = c (x + a x^3)``: the same function as ``0.5 x (1 + tanh(u))`` and
    about twice as fast on CPU as PyTorch's tanh GELU (its vectorised tanh is slower than its sigmoid)."""
    a, c = 0.044715, math.sqrt(2.0 / math.pi)
    s = torch.mul(x, x, out=out)
    return s.mul_(2.0 * c * a).add_(2.0 * c).mul_(x).sigmoid_().mul_(x)


def _gelu_grad(dy: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``dy * gelu_tanh'(x)``, fused."""
    if out is None:
        return torch.ops.aten.gelu_backward(dy, x, approximate="tanh")
    return torch.ops.aten.gelu_backward.grad_input(dy, x, approximate="tanh", grad_input=out)


def _gelu_grad2(x: Tensor) -> Tensor:
    """``gelu_tanh''(x)``: with ``u = c (x + a x^3)`` and ``t = tanh(u)``, ``(1 - t^2) (u' - x t u'^2 + x u'' / 2)``."""
    a, c = 0.044715, math.sqrt(2.0 / math.pi)
    x2 = x * x
    t = torch.mul(x2, a).add_(1.0).mul_(x).mul_(c).tanh_()
    du = torch.mul(x2, 3.0 * a * c).add_(c)
    out = torch.mul(t, x).mul_(du).mul_(du).neg_().add_(du).add_(x2.mul_(3.0 * a * c))
    return out.mul_(t.mul_(t).neg_().add_(1.0))


def _masks(commits: list[int], like: Tensor) -> dict[int, Tensor | None]:
    """Per distinct commit count, a [BH, 1, 1] 0/1 mask of the rows that have it (None: all rows)."""
    if len(set(commits)) == 1:
        return {commits[0]: None}
    c = torch.tensor(commits, device=like.device)
    return {n: (c == n).to(like.dtype)[:, None, None] for n in sorted(set(commits))}


def _masked(x: Tensor, m: Tensor | None) -> Tensor:
    return x if m is None else x * m


def _chunked(x: Tensor, b: int) -> Tensor:
    """[B, L, H, ...] -> [N, B * H, b, ...] (a copy), ``N = L // b``."""
    B, L, H = x.shape[:3]
    tail = tuple(range(4, x.dim() + 1))
    return x.reshape(B, L // b, b, H, *x.shape[3:]).permute(1, 0, 3, 2, *tail).reshape(L // b, B * H, b, *x.shape[3:])


def _unchunked(x: Tensor, B: int) -> Tensor:
    """Inverse of :func:`_chunked`."""
    N, BH, b = x.shape[:3]
    tail = tuple(range(4, x.dim() + 1))
    return x.reshape(N, B, BH // B, b, *x.shape[3:]).permute(1, 0, 3, 2, *tail).reshape(B, N * b, BH // B, *x.shape[3:])


class _Layout:
    """The loop's layout of the aligned inputs ``q, k, v`` [B, L, H, D] and ``e`` [B, L, H] (eta, zero on padding):
    mini-batch ``n`` of head-row ``r`` (``BH = B * H`` of them) at ``[n, r]``.

    ``kq`` [N, BH, 2b, D + 1] holds ``[[xk, 1]; [xq, 1]]`` per mini-batch (the 1 column carries the bias), ``e``
    [N, BH, b, 1], ``el = token_idx[-1] * e`` (the committed step), ``upd = el * [xk, 1]`` [N, BH, b, D + 1] (the
    keys of the commit), ``E = tril(token_idx_i * eta_j)`` [N, BH, b, b], ``kvb = xk - xv + beta`` and ``c = gamma
    * kvb`` [N, BH, b, D] (the constant of the LN-fused gradient).
    """

    def __init__(self, q, k, v, e, tok, gamma, beta):
        B, L, H, D = q.shape
        b = tok.numel()
        N = L // b
        self.B, self.H, self.D, self.b, self.N, self.BH = B, H, D, b, N, B * H
        self.tok, self.gamma, self.beta = tok, gamma, beta
        self.kq = q.new_empty(N, B * H, 2 * b, D + 1)
        kq6 = self.kq.view(N, B, H, 2 * b, D + 1)
        kq6[:, :, :, :b, :D] = k.view(B, N, b, H, D).permute(1, 0, 3, 2, 4)
        kq6[:, :, :, b:, :D] = q.view(B, N, b, H, D).permute(1, 0, 3, 2, 4)
        self.kq[..., D] = 1.0
        self.xk, self.xq = self.kq[:, :, :b], self.kq[:, :, b:]
        self.e = _chunked(e[..., None], b)
        self.el = tok[-1] * self.e
        self.upd = self.xk * self.el
        self.E = torch.tril(tok[:, None] * self.e.mT)
        self.kvb = torch.sub(self.xk[..., :D], _chunked(v, b)).add_(beta)
        self.c = self.kvb * gamma
        self.gamma2 = gamma * gamma

    def view(self, x: Tensor, n: int) -> Tensor:
        """Mini-batch ``n`` of ``x`` [B, L, H, ...] as a [B, H, b, ...] view."""
        return x[:, n * self.b : (n + 1) * self.b].transpose(1, 2)

    def output(self, yhat: Tensor, out: Tensor) -> Tensor:
        """``xq + gamma * yhat + beta`` of the normalised ``yhat`` [N, BH, b, D] (overwritten) into ``out``
        [B, L, H, D]: two passes, the second writing ``out`` in its own layout."""
        N, BH, b, D = yhat.shape
        y = torch.addcmul(self.beta, yhat, self.gamma, out=yhat).unflatten(1, (self.B, self.H))
        o = out.view(self.B, N, b, self.H, D).permute(1, 0, 3, 2, 4)
        torch.add(y, self.xq[..., :D].unflatten(1, (self.B, self.H)), out=o)
        return out

    def scatter(self, x: Tensor) -> Tensor:
        """[N, BH, b, ...] -> [B, L, H, ...]."""
        return _unchunked(x, self.B)


def _pending(lay: _Layout, n: int, g: Tensor) -> Tensor:
    """``sum_j eta_j [xk_j, 1]^T g_j`` over mini-batch ``n`` (the first layer's accumulator)."""
    return (lay.xk[n] * lay.e[n]).mT @ g


def _input_grads(lay: _Layout, gamma, dgamma2, dc, do_c, dkq, de, dgamma, dbeta, b: int, D: int):
    """The backward's common tail (TTT-Linear and TTT-MLP): the LN parameters' gradients (accumulated into
    `dgamma`, `dbeta` in place) and dq, dk, dv, de scattered back to the inputs' layout. `dc` is consumed."""
    dgamma += 2 * gamma * dgamma2 + (dc * lay.kvb).sum(dim=(0, 2))[:, None]
    dbeta += (dc * gamma).sum(dim=(0, 2))[:, None]
    dc *= gamma  # c = gamma * (beta + xk - xv)
    dq = lay.scatter(do_c + dkq[:, :, b:, :D])
    dk = lay.scatter(dc + dkq[:, :, :b, :D])
    dv = lay.scatter(dc.neg_())
    return dq, dk, dv, lay.scatter(de)[..., 0]


class _ChunkLinear(torch.autograd.Function):
    """TTT-Linear dual form with a hand-written backward.

    Inputs ``q, k, v`` [B, L, H, D] (aligned to whole mini-batches), ``e`` [B, L, H] (eta, zero on padding), ``tok``
    [b], ``gamma, beta`` [BH, 1, D], ``w`` and ``acc`` (or None) [BH, D + 1, D] (``[W1; b1]``). Outputs ``o``
    [B, L, H, D] and the per-row state ``(w, acc)`` after ``commits[r]`` committed mini-batches.

    The loop holds only the recurrence (two batched matmuls and the LN-fused gradient per mini-batch); ``E * (xq xk^T
    + 1)`` is formed before it and the outputs after it, for all mini-batches at once.
    """

    @staticmethod
    def forward(ctx, commits, save, q, k, v, e, tok, gamma, beta, w, acc):
        lay = _Layout(q, k, v, e, tok, gamma, beta)
        N, BH, b, D = lay.N, lay.BH, lay.b, lay.D
        masks = _masks(commits, w)
        # anchors: all of them for the backward, else one buffer updated in place
        ws = w.new_empty(N + 1 if save else 1, BH, D + 1, D)
        ws[0] = w
        zz = q.new_empty(N, BH, 2 * b, D)  # [keys; queries] @ anchor
        G = q.new_empty(N, BH, b, D)  # LN-fused gradients at the anchor
        snaps = {}
        # views per mini-batch made once (indexing in the loop costs about as much as its small kernels)
        kq_l, c_l, upd_l = lay.kq.unbind(0), lay.c.unbind(0), lay.upd.mT.unbind(0)
        zz_l, zk_l, G_l, ws_l = zz.unbind(0), zz[:, :, :b].unbind(0), G.unbind(0), ws.unbind(0)
        for n in range(N):
            w_n, w_next = (ws_l[n], ws_l[n + 1]) if save else (ws_l[0], ws_l[0])
            if n in masks:
                snaps[n] = w_n if save else w_n.clone()
            torch.bmm(kq_l[n], w_n, out=zz_l[n])
            _ln_l2_grad(zk_l[n], c_l[n], lay.gamma2, out=G_l[n])
            torch.baddbmm(w_n, upd_l[n], G_l[n], alpha=-1.0, out=w_next)
            if n == 0 and acc is not None:
                w_next.addcmul_(acc, tok[-1], value=-1.0)
        snaps[N] = ws[N if save else 0]

        A = torch.matmul(lay.xq, lay.xk.mT).mul_(lay.E)  # E * (xq xk^T + 1)
        zq = torch.baddbmm(zz[:, :, b:].flatten(0, 1), A.flatten(0, 1), G.flatten(0, 1), alpha=-1.0)
        zq = zq.view(N, BH, b, D)
        if acc is not None:
            zq[0] -= tok[:, None] * (lay.xq[0] @ acc)
        yhat, mu_q, rstd_q = _ln(zq, (D,), None, None, LN_EPS)
        o = lay.output(yhat, torch.empty_like(q))

        w_out = sum(_masked(snaps[n], m) for n, m in masks.items())
        pending = {n: torch.zeros_like(w) if n == N else _pending(lay, n, G[n]) for n in masks}
        if 0 in pending and acc is not None:
            pending[0] = pending[0] + acc
        acc_out = sum(_masked(pending[n], m) for n, m in masks.items())
        ctx.commits = commits
        if save:
            ctx.save_for_backward(q, k, v, e, tok, gamma, beta, acc, ws, zz, G, zq, mu_q, rstd_q)
        return o, w_out, acc_out

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dw_out, dacc_out):
        q, k, v, e, tok, gamma, beta, acc, ws, zz, G, zq, mu_q, rstd_q = ctx.saved_tensors
        lay = _Layout(q, k, v, e, tok, gamma, beta)
        N, b, D = lay.N, lay.b, lay.D
        masks = _masks(ctx.commits, dw_out)
        xk, xq, E = lay.xk, lay.xq, lay.E

        # o = xq + gamma * LN(zq) + beta, zq = [xq, 1] @ w - (E * S) @ G (- tok * [xq, 1] @ acc in mini-batch 0)
        do_c = _chunked(do, b)
        dgamma = (zq - mu_q).mul_(rstd_q).mul_(do_c).sum(dim=(0, 2))[:, None]
        dbeta = do_c.sum(dim=(0, 2))[:, None]
        dzq = _ln_grad(do_c * gamma, zq, mu_q, rstd_q)
        S = xq @ xk.mT
        dA = (dzq @ G.mT).neg_()
        dS = dA * E
        dE = torch.tril(dA * S)
        dG = ((E * S).mT @ dzq).neg_()  # plus, in the loop, the commit's share
        dkq = torch.cat([dS.mT @ xq, dS @ xk], dim=2)  # [N, BH, 2b, D + 1]
        dtok = (dE @ lay.e).sum(dim=(0, 1))[:, 0]
        de = dE.mT @ tok[:, None]  # [N, BH, b, 1]
        dacc = None
        if acc is not None:
            tz = tok[:, None] * dzq[0]
            dkq[0, :, b:] -= tz @ acc.mT
            dacc = -(xq[0].mT @ tz)
            dtok -= (dzq[0] * (xq[0] @ acc)).sum(dim=(0, 2))

        # the recurrence backwards; dws[n] is the gradient w.r.t. the anchor after mini-batch n
        dzz = torch.empty_like(zz)
        dzz[:, :, b:] = dzq
        dc = torch.empty_like(G)
        dws = torch.empty_like(ws[1:])
        dws[N - 1] = _masked(dw_out, masks[N]) if N in masks else 0.0
        dgamma2 = torch.zeros_like(gamma)
        dw = None
        for n in reversed(range(N)):
            dw = dws[n]
            if n in masks:  # acc_out = sum_j eta_j [xk_j, 1]^T g_j for the rows that stop here
                dG[n] += _masked((xk[n] * lay.e[n]) @ dacc_out, masks[n])
            dg = dG[n].baddbmm_(lay.upd[n], dw, alpha=-1.0)  # w_next = w - (el [xk, 1])^T g
            _ln_l2_grad_vjp(dg, G[n], zz[n, :, :b], lay.c[n], lay.gamma2, dzz[n, :, :b], dc[n], dgamma2)
            dw = torch.baddbmm(dw, lay.kq[n].mT, dzz[n], out=dws[n - 1] if n > 0 else None)
            if n in masks:
                dw += _masked(dw_out, masks[n])

        flat = torch.Tensor.flatten
        flat(dkq, 0, 1).baddbmm_(flat(dzz, 0, 1), flat(ws[:N], 0, 1).mT)
        du = (G @ dws.mT).neg_()  # through w_next = w - (el [xk, 1])^T g
        dkq[:, :, :b] += lay.el * du
        d_el = (du * xk).sum(dim=-1, keepdim=True)
        de += tok[-1] * d_el
        dtok[-1] += (d_el * lay.e).sum()
        for n, m in masks.items():
            if n < N:
                dxke = _masked(G[n] @ dacc_out.mT, m)
                dkq[n, :, :b] += lay.e[n] * dxke
                de[n] += (dxke * xk[n]).sum(dim=-1, keepdim=True)
        if acc is not None:
            dacc -= tok[-1] * dws[0]
            dtok[-1] -= (acc * dws[0]).sum()
            if 0 in masks:
                dacc += _masked(dacc_out, masks[0])
        dq, dk, dv, de = _input_grads(lay, gamma, dgamma2, dc, do_c, dkq, de, dgamma, dbeta, b, D)
        return None, None, dq, dk, dv, de, dtok, dgamma, dbeta, dw, dacc


class _ChunkMLP(torch.autograd.Function):
    """TTT-MLP dual form with a hand-written backward.

    As :class:`_ChunkLinear`, with the state ``w1`` [BH, D + 1, F] (``[W1; b1]``), ``w2`` [BH, F, D], ``b2``
    [BH, 1, D] and the accumulators ``a1, a2, a3`` (or all None) of the same shapes.

    With a backward to follow, every anchor and inner gradient is kept and the outputs are formed after the loop.
    Without one, the outputs are formed inside the loop from the current anchor: keeping the second layer's anchor
    of every mini-batch would cost ``N * F * D`` floats per head.
    """

    @staticmethod
    def forward(ctx, commits, save, q, k, v, e, tok, gamma, beta, w1, w2, b2, a1, a2, a3):
        lay = _Layout(q, k, v, e, tok, gamma, beta)
        N, BH, b, D = lay.N, lay.BH, lay.b, lay.D
        Fh = w1.shape[-1]
        acc = None if a1 is None else (a1, a2, a3)
        masks = _masks(commits, w1)
        n_anchors = N + 1 if save else 1  # all of them for the backward, else one buffer updated in place
        w1s = w1.new_empty(n_anchors, BH, D + 1, Fh)
        w2s, b2s = w2.new_empty(n_anchors, BH, Fh, D), b2.new_empty(n_anchors, BH, 1, D)
        w1s[0], w2s[0], b2s[0] = w1, w2, b2
        if save:
            zz1 = q.new_empty(N, BH, 2 * b, Fh)  # [keys; queries] @ anchor
            x2, G1 = q.new_empty(N, BH, b, Fh), q.new_empty(N, BH, b, Fh)
            G2 = q.new_empty(N, BH, b, D)
        else:
            o = torch.empty_like(q)
        A1 = torch.matmul(lay.xq, lay.xk.mT).mul_(lay.E)  # E * (xq xk^T + 1)
        out_state = [torch.zeros_like(t) for t in (w1, w2, b2)]
        out_acc = [torch.zeros_like(t) for t in (w1, w2, b2)]
        # views per mini-batch made once (indexing in the loop costs about as much as its small kernels)
        kq_l, c_l, E_l, A1_l, el_l = (t.unbind(0) for t in (lay.kq, lay.c, lay.E, A1, lay.el))
        upd_l, xq_l = lay.upd.mT.unbind(0), lay.xq[..., :D].unflatten(1, (lay.B, lay.H)).unbind(0)
        w1s_l, w2s_l, b2s_l = w1s.unbind(0), w2s.unbind(0), b2s.unbind(0)
        for n in range(N):
            i, j = (n, n + 1) if save else (0, 0)
            w1_n, w2_n, b2_n = w1s_l[i], w2s_l[i], b2s_l[i]
            zz1_n = torch.bmm(kq_l[n], w1_n, out=zz1[n] if save else None)
            z1 = zz1_n[:, :b]
            x2_n = _gelu(z1, out=x2[n] if save else None)
            g2 = _ln_l2_grad(torch.baddbmm(b2_n, x2_n, w2_n), c_l[n], lay.gamma2,
                             out=G2[n] if save else torch.empty_like(lay.c[n]))  # fmt: skip
            g1 = _gelu_grad(torch.bmm(g2, w2_n.mT), z1, out=G1[n] if save else None)
            if n in masks:  # rows that stop here: this anchor, and this mini-batch's gradients pending
                g2e = g2 * lay.e[n]
                pending = [_pending(lay, n, g1), x2_n.mT @ g2e, g2e.sum(dim=1, keepdim=True)]
                for t, p in zip(out_state, (w1_n, w2_n, b2_n), strict=True):
                    t += _masked(p, masks[n])
                for t, x, a in zip(out_acc, pending, acc or (None,) * 3, strict=True):
                    t += _masked(x if n > 0 or a is None else x + a, masks[n])
            if not save:
                z1q = torch.baddbmm(zz1_n[:, b:], A1_l[n], g1, alpha=-1.0)
                if n == 0 and acc is not None:
                    z1q -= tok[:, None] * (lay.xq[0] @ a1)
                x2q = _gelu(z1q)
                z2q = torch.baddbmm(b2_n, x2q, w2_n)
                z2q.baddbmm_(torch.addcmul(E_l[n], E_l[n], x2q @ x2_n.mT), g2, alpha=-1.0)  # E (x2q x2^T + 1)
                if n == 0 and acc is not None:
                    z2q -= tok[:, None] * torch.baddbmm(a3, x2q, a2)
                for z2q_r, gamma_r, beta_r in _row_blocks(z2q, gamma, beta):
                    yhat = _normalize(z2q_r)[0]
                    z2q_r.copy_(torch.addcmul(beta_r, yhat, gamma_r, out=yhat))
                torch.add(z2q.view(lay.B, lay.H, b, D), xq_l[n], out=lay.view(o, n))
            g2e = g2 * el_l[n]
            torch.baddbmm(w1_n, upd_l[n], g1, alpha=-1.0, out=w1s_l[j])  # in place when j == i
            torch.baddbmm(w2_n, x2_n.mT, g2e, alpha=-1.0, out=w2s_l[j])
            torch.sub(b2_n, g2e.sum(dim=1, keepdim=True), out=b2s_l[j])
            if n == 0 and acc is not None:
                for t, a in zip((w1s[j], w2s[j], b2s[j]), acc, strict=True):
                    t.addcmul_(a, tok[-1], value=-1.0)
        if N in masks:
            i = N if save else 0
            for t, p in zip(out_state, (w1s[i], w2s[i], b2s[i]), strict=True):
                t += _masked(p, masks[N])
        ctx.commits = commits
        if not save:
            return o, *out_state, *out_acc

        def flat(t):
            return t.flatten(0, 1)

        z1q = torch.baddbmm(flat(zz1[:, :, b:]), flat(A1), flat(G1), alpha=-1.0).view(N, BH, b, Fh)
        if acc is not None:
            z1q[0] -= tok[:, None] * (lay.xq[0] @ a1)
        x2q = _gelu(z1q)
        A2 = torch.addcmul(lay.E, lay.E, x2q @ x2.mT)  # E * (x2q x2^T + 1)
        z2q = torch.baddbmm(flat(b2s[:N]), flat(x2q), flat(w2s[:N]))
        z2q = z2q.baddbmm_(flat(A2), flat(G2), alpha=-1.0).view(N, BH, b, D)
        if acc is not None:
            z2q[0] -= tok[:, None] * torch.baddbmm(a3, x2q[0], a2)
        yhat, mu_q, rstd_q = _ln(z2q, (D,), None, None, LN_EPS)
        o = lay.output(yhat, torch.empty_like(q))
        ctx.save_for_backward(
            q, k, v, e, tok, gamma, beta, a1, a2, a3, w1s, w2s, b2s, zz1, x2, G1, G2, z1q, x2q, z2q, mu_q, rstd_q
        )
        return o, *out_state, *out_acc

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dw1_out, dw2_out, db2_out, da1_out, da2_out, da3_out):
        (q, k, v, e, tok, gamma, beta, a1, a2, a3, w1s, w2s, b2s, zz1, x2, G1, G2, z1q, x2q, z2q, mu_q, rstd_q) = (
            ctx.saved_tensors
        )
        lay = _Layout(q, k, v, e, tok, gamma, beta)
        N, BH, b, D = lay.N, lay.BH, lay.b, lay.D
        Fh = w1s.shape[-1]
        acc = None if a1 is None else (a1, a2, a3)
        masks = _masks(ctx.commits, dw1_out)
        d_out, da_out = (dw1_out, dw2_out, db2_out), (da1_out, da2_out, da3_out)
        xk, xq, E = lay.xk, lay.xq, lay.E

        def flat(t):
            return t.flatten(0, 1)

        # o = xq + gamma * LN(z2q) + beta; z2q = x2q @ w2 + b2 - (E * (x2q x2^T + 1)) @ G2 (- tok * (x2q @ a2 + a3))
        do_c = _chunked(do, b)
        dgamma = (z2q - mu_q).mul_(rstd_q).mul_(do_c).sum(dim=(0, 2))[:, None]
        dbeta = do_c.sum(dim=(0, 2))[:, None]
        dz2q = _ln_grad(do_c * gamma, z2q, mu_q, rstd_q)
        S2 = (x2q @ x2.mT).add_(1.0)
        dA2 = (dz2q @ G2.mT).neg_()
        dS2 = dA2 * E
        dE = torch.tril(dA2 * S2)
        w2T = flat(w2s[:N]).mT
        dx2q = torch.bmm(flat(dz2q), w2T).view(N, BH, b, Fh)
        flat(dx2q).baddbmm_(flat(dS2), flat(x2))
        dG2 = ((E * S2).mT @ dz2q).neg_()  # plus, in the loop, the inner-loop shares
        dx2 = dS2.mT @ x2q
        dtok = torch.zeros_like(tok)
        dacc = None
        if acc is not None:
            tz = tok[:, None] * dz2q[0]
            dx2q[0] -= tz @ a2.mT
            dacc = [torch.zeros_like(a1), -(x2q[0].mT @ tz), -tz.sum(dim=1, keepdim=True)]
            dtok -= (dz2q[0] * torch.baddbmm(a3, x2q[0], a2)).sum(dim=(0, 2))
        # x2q = gelu(z1q), z1q = [xq, 1] @ w1 - (E * S1) @ G1 (- tok * [xq, 1] @ a1)
        dz1q = _gelu_grad(dx2q, z1q, out=dx2q)
        S1 = xq @ xk.mT
        dA1 = (dz1q @ G1.mT).neg_()
        dS1 = dA1 * E
        dE += torch.tril(dA1 * S1)
        dG1 = ((E * S1).mT @ dz1q).neg_()
        dkq = torch.cat([dS1.mT @ xq, dS1 @ xk], dim=2)  # [N, BH, 2b, D + 1]
        dtok += (dE @ lay.e).sum(dim=(0, 1))[:, 0]
        de = dE.mT @ tok[:, None]  # [N, BH, b, 1]
        if acc is not None:
            tz = tok[:, None] * dz1q[0]
            dkq[0, :, b:] -= tz @ a1.mT
            dacc[0] -= xq[0].mT @ tz
            dtok -= (dz1q[0] * (xq[0] @ a1)).sum(dim=(0, 2))

        # the recurrence backwards, carrying the gradients w.r.t. the state after mini-batch n
        z1 = zz1[:, :, :b]
        q2 = torch.bmm(flat(G2), w2T).view(N, BH, b, Fh).mul_(_gelu_grad2(z1))  # (G2 w2^T) * gelu''(z1)
        z2 = torch.baddbmm(flat(b2s[:N]), flat(x2), flat(w2s[:N])).view(N, BH, b, D)
        dz2q_sum = dz2q.sum(dim=2, keepdim=True)
        dzz1 = torch.empty_like(zz1)
        dzz1[:, :, b:] = dz1q
        dc, dz2 = torch.empty_like(G2), torch.empty_like(G2[0])
        d_el = torch.empty_like(lay.e)
        dgamma2 = torch.zeros_like(gamma)
        # updated in place below: own copies
        dst = [_masked(t, masks[N]).clone() if N in masks else torch.zeros_like(t) for t in d_out]
        dw1, dw2, db2 = dst
        for n in reversed(range(N)):
            if n == 0 and acc is not None:  # the commit of mini-batch 0 also subtracts token_idx[-1] * acc
                for i in range(3):
                    dacc[i] -= tok[-1] * dst[i]
                    dtok[-1] -= (acc[i] * dst[i]).sum()
            el, xk_n, g1, g2, x2n, w2n = lay.el[n], xk[n], G1[n], G2[n], x2[n], w2s[n]
            # the commit: w1 - (el [xk, 1])^T g1, w2 - x2^T (el g2), b2 - sum(el g2)
            dg1 = dG1[n].baddbmm_(lay.upd[n], dw1, alpha=-1.0)
            du1 = torch.bmm(g1, dw1.mT)
            dkq[n, :, :b].addcmul_(el, du1, value=-1.0)
            y = torch.baddbmm(db2, x2n, dw2)
            dg2 = dG2[n].addcmul_(el, y, value=-1.0)
            dx2n = dx2[n].baddbmm_(g2 * el, dw2.mT, alpha=-1.0)
            d_el[n] = -(du1 * xk_n).sum(dim=-1, keepdim=True) - (g2 * y).sum(dim=-1, keepdim=True)
            if n in masks:  # acc_out = ([xk, 1]^T (e g1), x2^T (e g2), sum(e g2)) for the rows that stop here
                m, e_n = masks[n], lay.e[n]
                dg1 += _masked((xk_n * e_n) @ da_out[0], m)
                dxke = _masked(g1 @ da_out[0].mT, m)
                dkq[n, :, :b] += e_n * dxke
                y = _masked(torch.baddbmm(da_out[2], x2n, da_out[1]), m)
                dg2 += e_n * y
                dx2n += _masked((g2 * e_n) @ da_out[1].mT, m)
                de[n] += (dxke * xk_n).sum(dim=-1, keepdim=True) + (g2 * y).sum(dim=-1, keepdim=True)
            # G1 = (G2 w2^T) * gelu'(z1), G2 = ln_l2_grad(x2 w2 + b2), x2 = gelu(z1)
            dm1 = _gelu_grad(dg1, z1[n])
            dg2.baddbmm_(dm1, w2n)
            _ln_l2_grad_vjp(dg2, g2, z2[n], lay.c[n], lay.gamma2, dz2, dc[n], dgamma2)
            dx2n.baddbmm_(dz2, w2n.mT)
            dzz1[n, :, :b] = _gelu_grad(dx2n, z1[n]).addcmul_(dg1, q2[n])
            dw1.baddbmm_(lay.kq[n].mT, dzz1[n])
            dw2.baddbmm_(x2q[n].mT, dz2q[n]).baddbmm_(x2n.mT, dz2).baddbmm_(dm1.mT, g2)
            db2 += dz2q_sum[n]
            db2 += dz2.sum(dim=1, keepdim=True)
            if n in masks:
                for t, d in zip(dst, d_out, strict=True):
                    t += _masked(d, masks[n])

        flat(dkq).baddbmm_(flat(dzz1), flat(w1s[:N]).mT)
        de += tok[-1] * d_el
        dtok[-1] += (d_el * lay.e).sum()
        if acc is not None and 0 in masks:
            for i in range(3):
                dacc[i] += _masked(da_out[i], masks[0])
        dq, dk, dv, de = _input_grads(lay, gamma, dgamma2, dc, do_c, dkq, de, dgamma, dbeta, b, D)
        return None, None, dq, dk, dv, de, dtok, dgamma, dbeta, *dst, *(dacc or (None,) * 3)


def _chunk(kind, q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads, offsets):
    B, T, H, D = q.shape
    b = token_idx.numel()
    dt = compute_dtype(q, params[0])
    L = -(-(max(offsets) + T) // b) * b
    # fp32: inner-loop updates underflow in bf16, so the whole op runs outside autocast
    with torch.autocast(q.device.type, enabled=False):
        xq, xk, xv = (_align(t.to(dt), offsets, L) for t in (q, k, v))
        e = _align(eta.to(dt), offsets, L)  # [B, L, H]
        if L != T:
            slots = torch.arange(L, device=q.device)
            start = torch.tensor(offsets, device=q.device)[:, None]
            e = torch.where(((slots >= start) & (slots < start + T))[..., None], e, 0.0)
        gamma = ln_weight.to(dt).repeat(B, 1)[:, None, :]  # [BH, 1, D]
        beta = ln_bias.to(dt).repeat(B, 1)[:, None, :]
        state = _fold([p.to(dt) for p in params], B * H)
        acc = None if grads is None else _fold([g.to(dt) for g in grads], B * H)
        commits = [(o + T) // b for o in offsets for _ in range(H)]  # mini-batches each row commits
        inputs = (xq, xk, xv, e, token_idx.to(dt), gamma, beta)
        save = torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *state, *(acc or ())))
        if kind == "linear":
            o, w, g = _ChunkLinear.apply(commits, save, *inputs, state[0], None if acc is None else acc[0])
            new_state, new_acc = [w], [g]
        else:
            o, *rest = _ChunkMLP.apply(commits, save, *inputs, *state, *(acc or (None,) * 3))
            new_state, new_acc = rest[:3], rest[3:]
        o = _unalign(o, offsets, T).to(q.dtype)
    return o, _unfold(new_state, B, H, D), _unfold(new_acc, B, H, D)


def _fold(ts: Sequence[Tensor], BH: int) -> list[Tensor]:
    """Fast weights [B, H, ...] -> the loop's layout, with the first layer's bias as an extra row of its weight.

    Linear: ``[W1; b1]`` [BH, D + 1, D]. MLP: ``[W1; b1]`` [BH, D + 1, F], ``W2`` [BH, F, D], ``b2`` [BH, 1, D].
    """
    first = torch.cat([ts[0], ts[1]], dim=-2)
    return [first.reshape(BH, *first.shape[2:])] + [t.reshape(BH, *t.shape[2:]) for t in ts[2:]]


def _unfold(ts: list[Tensor], B: int, H: int, D: int) -> tuple[Tensor, ...]:
    """Inverse of :func:`_fold`."""
    ts = [t.view(B, H, *t.shape[1:]) for t in ts]
    return (ts[0][..., :D, :], ts[0][..., D:, :], *ts[1:])
