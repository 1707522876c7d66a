"""In-Place TTT ops: the parallel prefix-sum form against the chunk-by-chunk reference."""

from __future__ import annotations

import pytest
import torch

from ttt_speech.ops.inplace_ttt import (
    chunk_conv1d,
    chunk_inplace_ttt,
    clip_update,
    naive_chunk_conv1d,
    naive_chunk_inplace_ttt,
)


@pytest.mark.parametrize("mode,kernel", [("centred", 5), ("centred", 3), ("next", 2), ("next", 3)])
@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunk_conv1d_matches_reference(mode: str, kernel: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3 * chunk, 6, generator=g)
    w = torch.randn(6, kernel, generator=g)
    torch.testing.assert_close(chunk_conv1d(x, w, chunk, mode), naive_chunk_conv1d(x, w, chunk, mode),
                               rtol=1e-5, atol=1e-6)


def test_chunk_conv1d_never_reads_another_chunk() -> None:
    C = 5
    x = torch.randn(1, 4 * C, 3)
    w = torch.randn(3, 5)
    base = chunk_conv1d(x, w, C)
    for first_of_next in range(C, 4 * C, C):
        y = x.clone()
        y[:, first_of_next] += 100.0
        out = chunk_conv1d(y, w, C)
        torch.testing.assert_close(out[:, :first_of_next], base[:, :first_of_next], rtol=0, atol=0)
        assert not torch.allclose(out[:, first_of_next:first_of_next + C], base[:, first_of_next:first_of_next + C])


@pytest.mark.parametrize("T,C", [(23, 5), (20, 5), (3, 5), (63, 16), (1, 1)])
@pytest.mark.parametrize("tau", [None, 0.5])
def test_parallel_equals_chunk_by_chunk(T: int, C: int, tau: float | None) -> None:
    g = torch.Generator().manual_seed(T * 100 + C)
    B, H, D = 2, 12, 8
    z = torch.randn(B, T, H, generator=g)
    v = torch.randn(B, T // C * C, D, generator=g)
    w0 = torch.randn(D, H, generator=g)
    out, w = chunk_inplace_ttt(z, v, w0, 0.3, C, tau)
    ref_out, ref_w = naive_chunk_inplace_ttt(z, v, w0, 0.3, C, tau)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-5)


def test_gradients_match_reference() -> None:
    g = torch.Generator().manual_seed(3)
    B, T, H, D, C = 2, 17, 6, 5, 4
    inputs = [torch.randn(B, T, H, generator=g, dtype=torch.float64),
              torch.randn(B, T // C * C, D, generator=g, dtype=torch.float64),
              torch.randn(D, H, generator=g, dtype=torch.float64)]
    cot = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    grads = []
    for fn in (chunk_inplace_ttt, naive_chunk_inplace_ttt):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, w = fn(*[leaf.double() for leaf in leaves], 0.3, C, 2.0)
        ((out.double() * cot).sum() + w.double().square().sum()).backward()
        grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_chunk_uses_w0_and_updates_come_from_earlier_chunks_only() -> None:
    B, C, H, D = 1, 4, 3, 2
    z = torch.randn(B, 3 * C, H)
    v = torch.randn(B, 3 * C, D)
    w0 = torch.randn(D, H)
    out, _ = chunk_inplace_ttt(z, v, w0, 1.0, C)
    torch.testing.assert_close(out[:, :C], z[:, :C] @ w0.t())
    w1 = w0 + v[0, :C].t() @ z[0, :C]
    torch.testing.assert_close(out[:, C:2 * C], z[:, C:2 * C] @ w1.t(), rtol=1e-5, atol=1e-5)


def test_clip_update_bounds_the_frobenius_norm() -> None:
    dw = torch.randn(3, 4, 5) * 10
    clipped = clip_update(dw, 1.0)
    torch.testing.assert_close(torch.linalg.matrix_norm(clipped), torch.ones(3))
    small = torch.randn(4, 5) * 1e-3
    torch.testing.assert_close(clip_update(small, 1.0), small)


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="v must be"):
        chunk_inplace_ttt(torch.randn(1, 8, 3), torch.randn(1, 7, 2), torch.randn(2, 3), 0.1, 4)
    with pytest.raises(ValueError, match="whole chunks"):
        chunk_conv1d(torch.randn(1, 7, 3), torch.randn(3, 5), 4)
    with pytest.raises(ValueError, match="odd kernel"):
        chunk_conv1d(torch.randn(1, 8, 3), torch.randn(3, 2), 4, "centred")
