"""In-Place TTT, parallel over chunks (the paper's context-parallel form, Algorithm 1).

For chunks i = 0, 1, ... of C tokens each:

    dW_i  = V_i^T Z_i                              [D, H]   (the negative gradient of -<Z_i W^T, V_i>_F)
    W^(i) = W^(0) + lr * sum_{j<i} clip(dW_j)       prefix sum, exclusive: chunk i never sees its own update
    O_i   = Z_i W^(i)^T

Bounded fast weights (both off by default, which is the paper's rule above): with Delta_i = W^(i) - W^(0),

    Delta_{i+1} = bound(decay * Delta_i + lr * clip(dW_i))     bound: scale down to ||.||_F <= max_delta ||W^(0)||_F

`decay` alone keeps the prefix-sum form (a discounted sum); `max_delta` makes the recurrence non-linear, so it
runs as a scan over chunks (one [B, D, H] add per chunk).

All arithmetic is float32 whatever the inputs' dtype, and outside autocast: each function casts its inputs at
entry and disables autocast around its body, so a bf16 autocast region around the caller cannot round W^(0) + Delta
to bf16 (an update of relative size 1e-3 would vanish). Callers cast the output back. A trailing partial chunk is
computed with the weights at its start and contributes no update: the caller keeps its tokens until the chunk
completes (streaming) or drops them (end of sequence).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CONV_MODES = ("centred", "next")


def fp32_no_autocast(fn):
    """Run `fn` with autocast disabled on its first tensor argument's device (its body casts to float32)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _check_chunked(x: torch.Tensor, chunk_size: int, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, T, D], got {list(x.shape)}")
    if x.shape[1] % chunk_size:
        raise ValueError(f"{name} must hold whole chunks of {chunk_size} tokens, got T={x.shape[1]}")


def check_bounds(decay: float | None, max_delta: float | None) -> None:
    """`decay` in (0, 1] or None; `max_delta` > 0 or None."""
    if decay is not None and not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1] or None, got {decay}")
    if max_delta is not None and not max_delta > 0.0:
        raise ValueError(f"max_delta must be positive or None, got {max_delta}")


@fp32_no_autocast
def chunk_conv1d(x: torch.Tensor, weight: torch.Tensor, chunk_size: int, mode: str = "centred") -> torch.Tensor:
    """Depthwise 1-D convolution run inside each chunk, with zero padding at chunk edges.

    No output position sees a token of another chunk, so dW_i depends on chunk i alone.

    Args:
        x: of shape [B, T, D], T a multiple of `chunk_size`.
        weight: of shape [D, K]. `mode="centred"`: K odd, output t reads t-(K-1)/2 .. t+(K-1)/2 (the official
            kernel 5). `mode="next"`: output t reads t .. t+K-1 (right padding; K=2 is the next-token form).
        chunk_size: C.
    Returns:
        of shape [B, T, D], float32.
    """
    _check_chunked(x, chunk_size, "x")
    if mode not in CONV_MODES:
        raise ValueError(f"conv mode must be one of {CONV_MODES}, got {mode!r}")
    B, T, D = x.shape
    K = weight.shape[-1]
    if weight.shape != (D, K):
        raise ValueError(f"conv weight must be [{D}, K], got {list(weight.shape)}")
    if mode == "centred" and K % 2 == 0:
        raise ValueError(f"a centred conv needs an odd kernel, got {K}")
    left = (K - 1) // 2 if mode == "centred" else 0
    chunks = x.float().reshape(B * (T // chunk_size), chunk_size, D).transpose(1, 2)  # [B*N, D, C]
    chunks = F.pad(chunks, (left, K - 1 - left))
    out = F.conv1d(chunks, weight.float().unsqueeze(1), groups=D)  # [B*N, D, C]
    return out.transpose(1, 2).reshape(B, T, D)


@fp32_no_autocast
def chunk_centre(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Subtract from each chunk its mean over the chunk's tokens (the chunk-centred update's targets).

    With ``Vc_i = V_i - 1 mean(V_i)^T``, ``Vc_i^T Z_i = V_i^T Zc_i = Vc_i^T Zc_i``: the update
    ``V_i^T Z_i = Vc_i^T Zc_i + C mean(V_i) mean(Z_i)^T`` loses its rank-one chunk-mean term, whichever side is
    centred. Centring V is the cheaper side (D <= H) and leaves Z, which the output uses, untouched.

    Args:
        x: of shape [B, n*C, D].
    Returns:
        of shape [B, n*C, D], float32; every chunk sums to zero over its tokens.
    """
    _check_chunked(x, chunk_size, "x")
    B, T, D = x.shape
    chunks = x.float().reshape(B, T // chunk_size, chunk_size, D)
    return (chunks - chunks.mean(2, keepdim=True)).reshape(B, T, D)


@fp32_no_autocast
def clip_update(dw: torch.Tensor, tau: float | None) -> torch.Tensor:
    """Scale each update of shape [..., D, H] down to Frobenius norm `tau` where it is larger (None: unchanged)."""
    if tau is None:
        return dw
    dw = dw.float()
    norm = torch.linalg.matrix_norm(dw).clamp_min(1e-30)[..., None, None]
    return dw * (tau / norm).clamp(max=1.0)


@fp32_no_autocast
def bound_delta(delta: torch.Tensor, w0: torch.Tensor, max_delta: float | None) -> torch.Tensor:
    """Scale each accumulated update `delta` [..., D, H] down to ||delta||_F <= max_delta * ||w0||_F (None: as is)."""
    if max_delta is None:
        return delta
    delta = delta.float()
    limit = max_delta * torch.linalg.matrix_norm(w0.float())[..., None, None]
    norm = torch.linalg.matrix_norm(delta).clamp_min(1e-30)[..., None, None]
    return delta * (limit / norm).clamp(max=1.0)


@fp32_no_autocast
def advance_fast_weight(w: torch.Tensor, w0: torch.Tensor, dw: torch.Tensor, lr: float, clip_tau: float | None = None,
                        decay: float | None = None, max_delta: float | None = None) -> torch.Tensor:
    """One chunk's step: W0 + bound(decay * (W - W0) + lr * clip(dW)). Shapes [B, D, H] (w0 may be [D, H])."""
    delta = w.float() - w0.float()
    if decay is not None:
        delta = decay * delta
    return w0.float() + bound_delta(delta + lr * clip_update(dw.float(), clip_tau), w0, max_delta)


@fp32_no_autocast
def chunk_inplace_ttt(z: torch.Tensor, v: torch.Tensor, w0: torch.Tensor, lr: float, chunk_size: int,
                      clip_tau: float | None = None, decay: float | None = None, max_delta: float | None = None,
                      w_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-Place TTT over a sequence that starts at a chunk boundary.

    Args:
        z: gated hidden activations Z, of shape [B, T, H], any T.
        v: targets V, of shape [B, n*C, D], one row per token of the n = T // C complete chunks.
        w0: fast weight at the start of the first chunk, of shape [B, D, H] or [D, H].
        lr: eta, the update's step size.
        chunk_size: C.
        clip_tau: optional bound on each chunk update's Frobenius norm.
        decay: optional factor on W - W_ref per chunk, in (0, 1]; None is 1 (the paper).
        max_delta: optional bound on ||W - W_ref||_F relative to ||W_ref||_F, applied after each chunk's update.
        w_ref: the initial weight that decay pulls towards and max_delta bounds around, [B, D, H] or [D, H];
            None: `w0` (a sequence from its start). Streaming and prefill in pieces pass the module's W0 here and
            the carried fast weight as `w0`.
    Returns:
        output O of shape [B, T, D] (float32), and the fast weight after the last complete chunk, [B, D, H].
    """
    return _chunk_inplace_ttt(z, v, w0, w0 if w_ref is None else w_ref, lr, chunk_size, clip_tau, decay, max_delta)


@fp32_no_autocast
def chunk_fast_weights(z: torch.Tensor, v: torch.Tensor, w0: torch.Tensor, w_ref: torch.Tensor, lr: float,
                       chunk_size: int, clip_tau: float | None = None, decay: float | None = None,
                       max_delta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast weight at the start of every chunk of :func:`chunk_inplace_ttt`, for callers that pick per row.

    Args:
        z: of shape [B, n*C, H] (whole chunks); v: of shape [B, n*C, D]; the rest as :func:`chunk_inplace_ttt`.
    Returns:
        ``zc`` of shape [B, n, C, H] (float32) and ``w`` of shape [B, n + 1, D, H]: ``w[:, i]`` is the weight chunk
        i reads, ``w[:, n]`` the weight after the last chunk.
    """
    _check_chunked(z, chunk_size, "z")
    zc, w, _, _, _ = _chunk_weights(z, v, w0, w_ref, lr, chunk_size, clip_tau, decay, max_delta)
    return zc, w


def _chunk_inplace_ttt(z, v, w_start, w_ref, lr, chunk_size, clip_tau, decay, max_delta):
    zc, w, T, n, n_full = _chunk_weights(z, v, w_start, w_ref, lr, chunk_size, clip_tau, decay, max_delta)
    B, D = z.shape[0], w.shape[-2]
    out = torch.einsum("bnch,bndh->bncd", zc, w[:, :n])
    return out.reshape(B, n * chunk_size, D)[:, :T], w[:, n_full]


def _chunk_weights(z, v, w_start, w_ref, lr, chunk_size, clip_tau, decay, max_delta):
    """The float32 fast weight of every chunk: ``(zc [B, n, C, H], w [B, n_full + 1, D, H], T, n, n_full)``."""
    if z.dim() != 3:
        raise ValueError(f"z must be [B, T, H], got {list(z.shape)}")
    check_bounds(decay, max_delta)
    B, T, H = z.shape
    n_full = T // chunk_size
    D = w_start.shape[-2]
    if v.shape != (B, n_full * chunk_size, D):
        raise ValueError(f"v must be [{B}, {n_full * chunk_size}, {D}] (the complete chunks), got {list(v.shape)}")
    for name, w in (("w0", w_start), ("w_ref", w_ref)):
        if w.shape[-2:] != (D, H) or w.dim() not in (2, 3) or (w.dim() == 3 and w.shape[0] != B):
            raise ValueError(f"{name} must be [{B}, {D}, {H}] or [{D}, {H}], got {list(w.shape)}")
    w_start = w_start.float().expand(B, D, H)
    w_ref = w_ref.float().expand(B, D, H)
    n = -(-T // chunk_size)
    zc = F.pad(z.float(), (0, 0, 0, n * chunk_size - T)).reshape(B, n, chunk_size, H)
    if n_full:
        vc = v.float().reshape(B, n_full, chunk_size, D)
        dw = clip_update(torch.einsum("bncd,bnch->bndh", vc, zc[:, :n_full]), clip_tau)  # [B, n_full, D, H]
        if max_delta is not None:  # non-linear: a scan over chunks
            ws = [w_start]
            for i in range(n_full):
                ws.append(advance_fast_weight(ws[-1], w_ref, dw[:, i], lr, None, decay, max_delta))
            w = torch.stack(ws, dim=1)  # [B, n_full + 1, D, H]
        else:
            delta0 = (w_start - w_ref)[:, None]  # [B, 1, D, H]
            if decay is None or decay == 1.0:
                # chunk i uses the updates of chunks < i: shift the inclusive prefix by one
                prefix = torch.cumsum(dw, dim=1) * lr
                deltas = torch.cat([delta0, delta0 + prefix], dim=1)
            else:
                i = torch.arange(n_full + 1, device=z.device, dtype=torch.float32)
                age = i[:, None] - 1 - i[None, :n_full]  # [n_full + 1, n_full]: chunk j's update seen at i
                weights = torch.where(age >= 0, decay ** age.clamp_min(0), torch.zeros_like(age))
                deltas = (decay ** i).view(1, -1, 1, 1) * delta0 + lr * torch.einsum("ij,bjdh->bidh", weights, dw)
            w = w_ref[:, None] + deltas  # [B, n_full + 1, D, H]
    else:
        w = w_start[:, None]
    return zc, w, T, n, n_full


def split_inplace_ttt(z: torch.Tensor, v: torch.Tensor, w0: torch.Tensor, w_base: torch.Tensor, lr: float,
                      chunk_size: int, clip_tau: float | None = None, decay: float | None = None,
                      max_delta: float | None = None,
                      out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunk_inplace_ttt` for a low-precision model, as two terms that keep their own precision.

    ``O_i = Z_i W_base^T + Z_i (W^(i) - W_base)^T``: the base term is ``F.linear(z, w_base)`` under the caller's
    dtype and autocast, i.e. bit-identical to the base model's down projection; the TTT term takes the deltas
    ``W^(i) - W_base`` in float32 (prefix sums, bounds, outside autocast), casts them to the base term's dtype
    and multiplies there. The update is then rounded relative to its own size, not to ``|W_base|``. The two
    terms are added in float32 and rounded once to `out_dtype`: where that is float32 (bf16 autocast over a
    float32 model) the TTT term is not rounded to the base term's ulp either.

    Args:
        z, v, lr, chunk_size, clip_tau, decay, max_delta: as :func:`chunk_inplace_ttt`.
        w0: the fast weight at the start of the first chunk, [B, D, H] or [D, H] (float32 when streaming).
        w_base: the module's own weight ``W^(0)``, [D, H], in the model's dtype (also what decay and max_delta
            act around).
        out_dtype: the output's dtype; None: the base product's.
    Returns:
        ``(O [B, T, D]`` in `out_dtype`, the float32 fast weight after the last complete chunk).
    """
    if z.dim() != 3 or w_base.dim() != 2:
        raise ValueError(f"z must be [B, T, H] and w_base [D, H], got {list(z.shape)} and {list(w_base.shape)}")
    base = F.linear(z, w_base)  # [B, T, D]; the base model's product, its dtype and autocast
    with torch.autocast(z.device.type, enabled=False):
        zc, w, T, n, n_full = _chunk_weights(z, v, w0, w_base, lr, chunk_size, clip_tau, decay, max_delta)
        delta = (w[:, :n] - w_base.float()).to(base.dtype)  # [B, n, D, H]: float32 deltas, cast once
        ttt = torch.einsum("bnch,bndh->bncd", zc.to(base.dtype), delta)
        out = split_sum(base, ttt.reshape(base.shape[0], n * chunk_size, -1)[:, :T], out_dtype)
    return out, w[:, n_full]


def split_sum(base: torch.Tensor, ttt: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``base + ttt`` added in float32 and rounded once to `out_dtype` (None: base's dtype). Where ``ttt`` is
    exactly zero the result is ``base`` bit for bit (a float32 round trip of a bf16/fp16 value is exact)."""
    return (base.float() + ttt.float()).to(base.dtype if out_dtype is None else out_dtype)
