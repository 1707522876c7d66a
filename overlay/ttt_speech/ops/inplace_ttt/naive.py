"""Plain references for In-Place TTT: one chunk at a time, exactly as the update rule reads."""

from __future__ import annotations

import torch

from ttt_speech.ops.inplace_ttt.chunk import clip_update


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


def naive_chunk_inplace_ttt(z: torch.Tensor, v: torch.Tensor, w0: torch.Tensor, lr: float, chunk_size: int,
                            clip_tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `chunk_inplace_ttt`: apply W to chunk i, then W += lr * clip(V_i^T Z_i)."""
    B, T, H = z.shape
    w = w0.float().expand(B, *w0.shape[-2:]).clone()
    outs = []
    for start in range(0, T, chunk_size):
        zi = z[:, start:start + chunk_size].float()
        outs.append(torch.bmm(zi, w.transpose(1, 2)))
        if zi.shape[1] == chunk_size:
            vi = v[:, start:start + chunk_size].float()
            w = w + lr * clip_update(torch.bmm(vi.transpose(1, 2), zi), clip_tau)
    return torch.cat(outs, dim=1), w
