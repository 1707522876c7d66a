"""Plain references for In-Place TTT: one chunk at a time, exactly as the update rule reads."""

from __future__ import annotations

import torch

from ttt_speech.ops.inplace_ttt.chunk import bound_delta, check_bounds, clip_update, fp32_no_autocast


@fp32_no_autocast
def naive_chunk_conv1d(x: torch.Tensor, weight: torch.Tensor, chunk_size: int, mode: str = "centred"):
    """Reference for `chunk_conv1d`: an explicit sum over kernel taps, chunk by chunk, zeros outside the chunk."""
    B, T, D = x.shape
    K = weight.shape[-1]
    left = (K - 1) // 2 if mode == "centred" else 0
    out = torch.zeros(B, T, D, dtype=torch.float32, device=x.device)
    for start in range(0, T, chunk_size):
        chunk = x[:, start:start + chunk_size].float()
        for t in range(chunk.shape[1]):
            for k in range(K):
                s = t - left + k
                if 0 <= s < chunk.shape[1]:
                    out[:, start + t] += weight[:, k].float() * chunk[:, s]
    return out


@fp32_no_autocast
def naive_chunk_centre(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Reference for `chunk_centre`: each chunk minus the explicit sum of its rows over C."""
    out = x.float().clone()
    for start in range(0, x.shape[1], chunk_size):
        chunk = x[:, start:start + chunk_size].float()
        total = torch.zeros_like(chunk[:, 0])
        for t in range(chunk.shape[1]):
            total += chunk[:, t]
        out[:, start:start + chunk_size] -= (total / chunk.shape[1])[:, None]
    return out


@fp32_no_autocast
def naive_chunk_inplace_ttt(z: torch.Tensor, v: torch.Tensor, w0: torch.Tensor, lr: float, chunk_size: int,
                            clip_tau: float | None = None, decay: float | None = None,
                            max_delta: float | None = None,
                            w_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `chunk_inplace_ttt`: apply W to chunk i, then
    W = W_ref + bound(decay * (W - W_ref) + lr * clip(V_i^T Z_i))."""
    check_bounds(decay, max_delta)
    B, T, H = z.shape
    w = w0.float().expand(B, *w0.shape[-2:]).clone()
    ref = w.clone() if w_ref is None else w_ref.float().expand(B, *w_ref.shape[-2:])
    outs = []
    for start in range(0, T, chunk_size):
        zi = z[:, start:start + chunk_size].float()
        outs.append(torch.bmm(zi, w.transpose(1, 2)))
        if zi.shape[1] == chunk_size:
            vi = v[:, start:start + chunk_size].float()
            delta = (w - ref) * (1.0 if decay is None else decay)
            w = ref + bound_delta(delta + lr * clip_update(torch.bmm(vi.transpose(1, 2), zi), clip_tau), ref, max_delta)
    return torch.cat(outs, dim=1), w
