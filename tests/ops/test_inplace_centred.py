"""The chunk-centred In-Place update (`chunk_centre`): against its reference, the identity that makes centring V,
Z or both the same update, and what it removes (the rank-one chunk-mean term that dominates the quickstart's
updates)."""

from __future__ import annotations

import pytest
import torch

from ttt_speech.ops.inplace_ttt import (
    chunk_centre,
    chunk_inplace_ttt,
    chunk_update_spectrum,
    naive_chunk_centre,
    naive_chunk_inplace_ttt,
    spectrum_summary,
)

BOUNDS = [{}, {"decay": 0.9}, {"decay": 0.9, "max_delta": 0.02, "clip_tau": 3.0}]


def _update(v: torch.Tensor, z: torch.Tensor, C: int) -> torch.Tensor:
    """Every chunk's V_i^T Z_i, [B, n, D, H]."""
    B, T, D = v.shape
    return torch.einsum("bncd,bnch->bndh", v.reshape(B, T // C, C, D), z[:, :T].reshape(B, T // C, C, -1))


@pytest.mark.parametrize("T,C", [(15, 5), (64, 16), (6, 2), (7, 7)])
def test_chunk_centre_matches_reference_and_every_chunk_sums_to_zero(T: int, C: int) -> None:
    x = torch.randn(3, T, 6, generator=torch.Generator().manual_seed(T)) + 4.0
    got = chunk_centre(x, C)
    torch.testing.assert_close(got, naive_chunk_centre(x, C), rtol=1e-5, atol=1e-5)
    sums = got.reshape(3, T // C, C, 6).sum(2)
    assert sums.abs().max() < 1e-4
    # within a chunk the differences between tokens are kept
    torch.testing.assert_close(got[:, 1:C] - got[:, :C - 1], x[:, 1:C] - x[:, :C - 1], rtol=1e-5, atol=1e-5)


def test_centring_v_z_or_both_is_the_same_update_without_the_chunk_mean_term() -> None:
    g = torch.Generator().manual_seed(1)
    B, C, n, D, H = 2, 8, 3, 5, 7
    v = torch.randn(B, n * C, D, generator=g) + torch.randn(D, generator=g) * 3
    z = torch.randn(B, n * C, H, generator=g) + torch.randn(H, generator=g) * 3
    centred_v = _update(chunk_centre(v, C), z, C)
    torch.testing.assert_close(centred_v, _update(v, chunk_centre(z, C), C), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(centred_v, _update(chunk_centre(v, C), chunk_centre(z, C), C), rtol=1e-4, atol=1e-4)
    v_mean = v.reshape(B, n, C, D).mean(2)
    z_mean = z.reshape(B, n, C, H).mean(2)
    mean_term = C * torch.einsum("bnd,bnh->bndh", v_mean, z_mean)
    torch.testing.assert_close(centred_v, _update(v, z, C) - mean_term, rtol=1e-4, atol=1e-4)


def test_a_per_chunk_constant_in_v_or_z_changes_no_centred_update() -> None:
    """The chunk mean (a document's constant direction) no longer enters the fast weight; a target constant over
    each chunk gives no update at all."""
    g = torch.Generator().manual_seed(2)
    B, C, n, D, H = 1, 6, 4, 5, 9
    v, z = torch.randn(B, n * C, D, generator=g), torch.randn(B, n * C, H, generator=g)
    shift_v = torch.randn(B, n, 1, D, generator=g).expand(B, n, C, D).reshape(B, n * C, D)
    shift_z = torch.randn(B, n, 1, H, generator=g).expand(B, n, C, H).reshape(B, n * C, H)
    torch.testing.assert_close(_update(chunk_centre(v + shift_v, C), z + shift_z, C),
                               _update(chunk_centre(v, C), z, C), rtol=1e-4, atol=1e-4)
    w0 = torch.randn(D, H, generator=g)
    _, w = chunk_inplace_ttt(z, chunk_centre(shift_v, C), w0, 1.0, C)
    torch.testing.assert_close(w[0], w0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("T,C", [(23, 5), (63, 16)])
def test_centred_parallel_equals_chunk_by_chunk_reference(bounds: dict, T: int, C: int) -> None:
    g = torch.Generator().manual_seed(T)
    z, v, w0 = torch.randn(2, T, 12, generator=g), torch.randn(2, T // C * C, 8, generator=g) + 2.0, \
        torch.randn(8, 12, generator=g)
    out, w = chunk_inplace_ttt(z, chunk_centre(v, C), w0, 0.3, C, **bounds)
    ref_out, ref_w = naive_chunk_inplace_ttt(z, naive_chunk_centre(v, C), w0, 0.3, C, **bounds)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-5)


def test_centre_gradients_match_reference() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 5, generator=g, dtype=torch.float64)
    cot = torch.randn(2, 12, 5, generator=g)
    grads = []
    for fn in (chunk_centre, naive_chunk_centre):
        leaf = x.clone().requires_grad_()
        (fn(leaf, 4) * cot).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert grads[0].reshape(2, 3, 4, 5).sum(2).abs().max() < 1e-5  # the gradient is centred too


def test_centring_removes_the_dominant_direction_of_a_biased_update() -> None:
    """Targets and activations with a large common offset (the quickstart's case: 83-86% of each update in one
    direction) give a near rank-one update; centred, the update spans many directions."""
    g = torch.Generator().manual_seed(4)
    C, n, D, H = 32, 4, 16, 40
    v = torch.randn(1, n * C, D, generator=g) + torch.randn(D, generator=g) * 2
    z = torch.randn(1, n * C, H, generator=g) + torch.randn(H, generator=g) * 2
    share, _ = spectrum_summary(chunk_update_spectrum(v, z, C))
    assert (share > 0.8).all()
    share, rank = spectrum_summary(chunk_update_spectrum(chunk_centre(v, C), z, C))
    assert (share < 0.3).all() and (rank > 8).all()


def test_centre_is_immune_to_bf16_autocast_and_checks_shapes() -> None:
    x = torch.randn(2, 16, 8) * 1e-3 + 1.0
    ref = chunk_centre(x, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunk_centre(x, 8)
    assert got.dtype == torch.float32
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5
    with pytest.raises(ValueError, match="whole chunks of 4"):
        chunk_centre(torch.randn(1, 7, 3), 4)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        chunk_centre(torch.randn(7, 3), 4)
