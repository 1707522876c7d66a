"""In-Place TTT, parallel over chunks (the paper's context-parallel form, Algorithm 1).

For chunks i = 0, 1, ... of C tokens each:

    dW_i  = V_i^T Z_i                              [D, H]   (the negative gradient of -<Z_i W^T, V_i>_F)
    W^(i) = W^(0) + lr * sum_{j<i} clip(dW_j)       prefix sum, exclusive: chunk i never sees its own update
    O_i   = Z_i W^(i)^T

All arithmetic is float32 whatever the inputs' dtype (cast point: the entry of each function); callers cast the
output back. A trailing partial chunk is computed with the weights at its start and contributes no update: the
caller keeps its tokens until the chunk completes (streaming) or drops them (end of sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_MODES = ("centred", "next")


def _check_chunked(x: torch.Tensor, chunk_size: int, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, T, D], got {list(x.shape)}")
    if x.shape[1] % chunk_size:
        raise ValueError(f"{name} must hold whole chunks of {chunk_size} tokens, got T={x.shape[1]}")


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


def clip_update(dw: torch.Tensor, tau: float | None) -> torch.Tensor:
    """Scale each update of shape [..., D, H] down to Frobenius norm `tau` where it is larger (None: unchanged)."""
    if tau is None:
        return dw
    norm = torch.linalg.matrix_norm(dw).clamp_min(1e-30)[..., None, None]
    return dw * (tau / norm).clamp(max=1.0)


def chunk_inplace_ttt(z: torch.Tensor, v: torch.Tensor, w0: torch.Tensor, lr: float, chunk_size: int,
                      clip_tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-Place TTT over a sequence that starts at a chunk boundary.

    Args:
        z: gated hidden activations Z, of shape [B, T, H], any T.
        v: targets V, of shape [B, n*C, D], one row per token of the n = T // C complete chunks.
        w0: fast weight at the start of the first chunk, of shape [B, D, H] or [D, H].
        lr: eta, the update's step size.
        chunk_size: C.
        clip_tau: optional bound on each chunk update's Frobenius norm.
    Returns:
        output O of shape [B, T, D] (float32), and the fast weight after the last complete chunk, [B, D, H].
    """
    if z.dim() != 3:
        raise ValueError(f"z must be [B, T, H], got {list(z.shape)}")
    B, T, H = z.shape
    n_full = T // chunk_size
    D = w0.shape[-2]
    if v.shape != (B, n_full * chunk_size, D):
        raise ValueError(f"v must be [{B}, {n_full * chunk_size}, {D}] (the complete chunks), got {list(v.shape)}")
    if w0.shape[-1] != H:
        raise ValueError(f"w0 must be [B, {D}, {H}] or [{D}, {H}], got {list(w0.shape)}")
    w0 = w0.float().expand(B, D, H)
    n = -(-T // chunk_size)
    zc = F.pad(z.float(), (0, 0, 0, n * chunk_size - T)).reshape(B, n, chunk_size, H)
    if n_full:
        vc = v.float().reshape(B, n_full, chunk_size, D)
        dw = clip_update(torch.einsum("bncd,bnch->bndh", vc, zc[:, :n_full]), clip_tau)  # [B, n_full, D, H]
        prefix = torch.cumsum(dw, dim=1) * lr
        # chunk i uses the updates of chunks < i: shift the inclusive prefix by one
        w = torch.cat([w0[:, None], w0[:, None] + prefix], dim=1)  # [B, n_full + 1, D, H]
    else:
        w = w0[:, None]
    out = torch.einsum("bnch,bndh->bncd", zc, w[:, :n])
    return out.reshape(B, n * chunk_size, D)[:, :T], w[:, n_full]
