"""How many directions a chunk update dW_i = V_i^T Z_i spans: its singular values, top-direction energy share and
effective rank.

A target without content (X0 the same vector at every frame, e.g. an all-padding text stream) makes every dW_i
(near) rank one along a fixed direction: the fast weight then only accumulates a running sum of activations. The
trainer's monitor logs these numbers per layer and warns when one direction holds more than 95% of the energy.
"""

from __future__ import annotations

import torch

from ttt_speech.ops.inplace_ttt.chunk import _check_chunked, fp32_no_autocast


@fp32_no_autocast
def chunk_update_spectrum(v: torch.Tensor, z: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Singular values of each chunk update V_i^T Z_i without forming the [D, H] matrix.

    With reduced QRs V_i^T = Q_v R_v and Z_i^T = Q_z R_z (Q with orthonormal columns), V_i^T Z_i =
    Q_v (R_v R_z^T) Q_z^T has the singular values of the small R_v R_z^T, [min(D, C), min(H, C)].

    Args:
        v: targets of shape [B, n*C, D]; z: activations of shape [B, n*C, H].
    Returns:
        of shape [B, n, k], k = min(D, H, C), descending, float32.
    """
    _check_chunked(v, chunk_size, "v")
    _check_chunked(z, chunk_size, "z")
    B, T, D = v.shape
    n = T // chunk_size
    vt = v.float().reshape(B, n, chunk_size, D).transpose(-1, -2)  # [B, n, D, C]
    zt = z.float().reshape(B, n, chunk_size, z.shape[-1]).transpose(-1, -2)  # [B, n, H, C]
    r_v = torch.linalg.qr(vt, mode="r").R  # [B, n, min(D, C), C]
    r_z = torch.linalg.qr(zt, mode="r").R  # [B, n, min(H, C), C]
    s = torch.linalg.svdvals(r_v @ r_z.transpose(-1, -2))
    return s[..., :min(D, z.shape[-1], chunk_size)]


@fp32_no_autocast
def naive_chunk_update_spectrum(v: torch.Tensor, z: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Reference for `chunk_update_spectrum`: the singular values of the dense V_i^T Z_i."""
    B, T, D = v.shape
    n = T // chunk_size
    dw = torch.einsum("bncd,bnch->bndh", v.float().reshape(B, n, chunk_size, D),
                      z.float().reshape(B, n, chunk_size, -1))
    return torch.linalg.svdvals(dw)[..., :min(D, z.shape[-1], chunk_size)]


def spectrum_summary(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-direction energy share s_1^2 / sum s^2 and effective rank exp(entropy of s^2 / sum s^2), per row of
    `s` [..., k]. A zero update gives share NaN and rank NaN (no direction at all)."""
    energy = s.float().square()
    total = energy.sum(-1, keepdim=True)
    p = energy / total
    share = p[..., 0]
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return share, entropy.exp()
