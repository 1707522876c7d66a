"""In-Place TTT ops: the parallel prefix-sum form against the chunk-by-chunk reference."""

from __future__ import annotations

import pytest
import torch

from ttt_speech.ops.inplace_ttt import (
    advance_fast_weight,
    chunk_conv1d,
    chunk_inplace_ttt,
    chunk_update_spectrum,
    clip_update,
    naive_chunk_conv1d,
    naive_chunk_inplace_ttt,
    naive_chunk_update_spectrum,
    spectrum_summary,
)

BOUNDS = [{}, {"decay": 0.7}, {"max_delta": 0.05}, {"decay": 0.9, "max_delta": 0.02, "clip_tau": 3.0}]


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


def _inputs(B: int, T: int, H: int, D: int, C: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, generator=g), torch.randn(B, T // C * C, D, generator=g) * scale,
            torch.randn(D, H, generator=g))


@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("T,C", [(23, 5), (63, 16), (4, 5)])
def test_bounded_parallel_equals_chunk_by_chunk(bounds: dict, T: int, C: int) -> None:
    z, v, w0 = _inputs(2, T, 12, 8, C, seed=T)
    out, w = chunk_inplace_ttt(z, v, w0, 0.3, C, **bounds)
    ref_out, ref_w = naive_chunk_inplace_ttt(z, v, w0, 0.3, C, **bounds)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bounds", BOUNDS)
def test_bounded_gradients_match_reference(bounds: dict) -> None:
    g = torch.Generator().manual_seed(5)
    B, T, H, D, C = 2, 17, 6, 5, 4
    inputs = [torch.randn(B, T, H, generator=g, dtype=torch.float64),
              torch.randn(B, T // C * C, D, generator=g, dtype=torch.float64),
              torch.randn(D, H, generator=g, dtype=torch.float64)]
    cot = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    grads = []
    for fn in (chunk_inplace_ttt, naive_chunk_inplace_ttt):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, w = fn(*leaves, 0.3, C, **bounds)
        ((out.double() * cot).sum() + w.double().square().sum()).backward()
        grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bounds", BOUNDS)
def test_continuing_from_a_carried_weight_equals_one_call(bounds: dict) -> None:
    C, T = 4, 22
    z, v, w0 = _inputs(2, T, 6, 5, C, seed=1)
    full, w_full = chunk_inplace_ttt(z, v, w0, 0.5, C, **bounds)
    cut = 12  # a chunk boundary
    first, w_mid = chunk_inplace_ttt(z[:, :cut], v[:, :cut], w0, 0.5, C, **bounds)
    rest, w_end = chunk_inplace_ttt(z[:, cut:], v[:, cut:], w_mid, 0.5, C, **bounds, w_ref=w0)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_end, w_full, rtol=1e-5, atol=1e-5)
    # one chunk at a time through advance_fast_weight, as streaming does
    w = w0.expand(2, -1, -1)
    for start in range(0, T // C * C, C):
        dw = v[:, start:start + C].transpose(1, 2) @ z[:, start:start + C]
        w = advance_fast_weight(w, w0, dw, 0.5, **bounds)
    torch.testing.assert_close(w, w_full, rtol=1e-5, atol=1e-5)


def test_max_delta_bounds_the_accumulated_update_and_decay_forgets() -> None:
    C, n = 4, 40
    z, v, w0 = _inputs(1, n * C, 6, 5, C, seed=2)
    v = v.abs()
    z = z.abs()  # every update points the same way: the unbounded sum grows linearly
    limit = 0.1 * torch.linalg.matrix_norm(w0)
    w_free = chunk_inplace_ttt(z, v, w0, 1.0, C)[1]
    w_bound = chunk_inplace_ttt(z, v, w0, 1.0, C, max_delta=0.1)[1]
    assert torch.linalg.matrix_norm(w_free - w0) > 10 * limit
    assert torch.linalg.matrix_norm(w_bound - w0) <= limit * (1 + 1e-5)
    # decay 0.5: the last update dominates; far older chunks have no influence
    z2 = z.clone()
    z2[:, :C] *= 100.0
    a = chunk_inplace_ttt(z, v, w0, 1.0, C, decay=0.5)[1]
    b = chunk_inplace_ttt(z2, v, w0, 1.0, C, decay=0.5)[1]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(chunk_inplace_ttt(z, v, w0, 1.0, C)[1], chunk_inplace_ttt(z2, v, w0, 1.0, C)[1])


def test_bounds_are_validated() -> None:
    z, v, w0 = _inputs(1, 8, 3, 2, 4, seed=0)
    with pytest.raises(ValueError, match="decay must be in"):
        chunk_inplace_ttt(z, v, w0, 0.1, 4, decay=1.5)
    with pytest.raises(ValueError, match="max_delta must be positive"):
        chunk_inplace_ttt(z, v, w0, 0.1, 4, max_delta=0.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bounds", BOUNDS)
def test_ops_are_immune_to_bf16_autocast(bounds: dict) -> None:
    """Under a bf16 autocast region the ops compute exactly what they compute in fp32 (1e-5 relative): W0 + dW must
    not be rounded to bf16, where an update of relative size 1e-3 vanishes."""
    C, T = 8, 40
    z, v, w0 = _inputs(2, T, 32, 16, C, seed=4, scale=1e-3)
    x0 = torch.randn(2, T // C * C, 16)
    conv_w = torch.randn(16, 5)
    dw = v.transpose(1, 2) @ z

    def run():
        return (*chunk_inplace_ttt(z, v, w0, 0.5, C, **bounds), chunk_conv1d(x0, conv_w, C),
                chunk_update_spectrum(v, z, C), clip_update(dw, 1e-4),
                advance_fast_weight(w0, w0, dw, 0.5, **bounds), *naive_chunk_inplace_ttt(z, v, w0, 0.5, C, **bounds))

    ref = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    names = ["out", "w", "conv", "spectrum", "clip", "advance", "naive out", "naive w"]
    for name, a, b in zip(names, got, ref, strict=True):
        assert a.dtype == torch.float32, name
        assert _rel(a, b) <= 1e-5, name
    out = got[0]
    # the TTT part (out minus lr=0) is what rounding would destroy: it too is exact
    ttt_ref = ref[0] - chunk_inplace_ttt(z, v, w0, 0.0, C)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ttt_got = out - chunk_inplace_ttt(z, v, w0, 0.0, C)[0]
    assert _rel(ttt_got, ttt_ref) <= 1e-5


@pytest.mark.parametrize("C,D,H", [(4, 6, 9), (16, 8, 12), (8, 24, 5)])
def test_spectrum_matches_the_dense_svd(C: int, D: int, H: int) -> None:
    g = torch.Generator().manual_seed(C)
    v, z = torch.randn(2, 3 * C, D, generator=g), torch.randn(2, 3 * C, H, generator=g)
    s = chunk_update_spectrum(v, z, C)
    torch.testing.assert_close(s, naive_chunk_update_spectrum(v, z, C), rtol=1e-4, atol=1e-5)
    assert s.shape == (2, 3, min(C, D, H))


def test_a_target_without_content_gives_a_degenerate_update() -> None:
    """The LibriLight failure: X0 the same vector at every frame makes each chunk update rank one."""
    g = torch.Generator().manual_seed(0)
    C, D, H = 32, 16, 40
    z = torch.randn(1, 4 * C, H, generator=g)
    constant = torch.randn(D, generator=g).expand(1, 4 * C, D)
    varied = torch.randn(1, 4 * C, D, generator=g)
    share, rank = spectrum_summary(chunk_update_spectrum(constant, z, C))
    assert (share > 0.999).all() and (rank < 1.01).all()
    share, rank = spectrum_summary(chunk_update_spectrum(varied, z, C))
    assert (share < 0.3).all() and (rank > 8).all()
    share, rank = spectrum_summary(torch.zeros(2, 3))
    assert share.isnan().all() and rank.isnan().all()
