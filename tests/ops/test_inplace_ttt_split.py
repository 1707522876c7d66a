"""split_inplace_ttt: the base term bit-identical to the base model's bf16 product, the TTT term from fp32 deltas."""

import pytest
import torch
import torch.nn.functional as F

from ttt_speech.ops.inplace_ttt import chunk_inplace_ttt, split_inplace_ttt
from ttt_speech.ops.inplace_ttt.chunk import _chunk_weights


def _inputs(seed=0, B=2, T=37, H=48, D=24, C=8):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, H, generator=g)
    v = torch.randn(B, (T // C) * C, D, generator=g)
    w = torch.randn(D, H, generator=g) * 0.2
    return z, v, w, C


def test_split_equals_chunk_in_fp32():
    z, v, w, C = _inputs()
    for kw in ({}, {"decay": 0.9}, {"max_delta": 0.05, "clip_tau": 1.0}):
        ref, w_ref = chunk_inplace_ttt(z, v, w, 1e-2, C, **kw)
        out, w_last = split_inplace_ttt(z, v, w, w, 1e-2, C, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w_last, w_ref, rtol=0, atol=0)


def _ttt_tolerance(zb, v, wb, lr, C, out):
    """Bound on |out - (base_bf16 + ttt_fp32)| from the two roundings the split allows: the deltas cast to bf16
    (2^-9 relative each, summed over H with fp32 accumulation) and the bf16 sum (half an ulp of out); doubled."""
    zc, ws, T, n, _ = _chunk_weights(zb, v, wb, wb, lr, C, None, None, None)
    delta = (ws[:, :n] - wb.float()).abs()
    mag = torch.einsum("bnch,bndh->bncd", zc.abs(), delta).reshape(zb.shape[0], -1, wb.shape[0])[:, :T]
    return 2.0**-8 * (out.float().abs() + mag)


@pytest.mark.parametrize("lr", [1e-4, 1e-2])
def test_bf16_base_bit_identical_and_ttt_term_pinned_against_fp32(lr):
    z, v, w, C = _inputs(1)
    zb, wb = z.bfloat16(), w.bfloat16()
    out, w_last = split_inplace_ttt(zb, v, wb, wb, lr, C)
    base = F.linear(zb, wb)
    assert out.dtype == torch.bfloat16 and w_last.dtype == torch.float32
    assert torch.equal(out[:, :C], base[:, :C])  # chunk 0 reads W0: the base model's product, bit for bit
    assert torch.equal(split_inplace_ttt(zb, v, wb, wb, 0.0, C)[0], base)  # no update: the base model
    # the TTT part against float32 arithmetic on the same bf16-valued inputs
    ref, w_ref = chunk_inplace_ttt(zb.float(), v, wb.float(), lr, C)
    torch.testing.assert_close(w_last, w_ref, rtol=1e-6, atol=1e-7)  # the carried fast weight stays fp32
    ttt_ref = ref - F.linear(zb.float(), wb.float())
    err = (out.float() - (base.float() + ttt_ref)).abs()
    tol = _ttt_tolerance(zb, v, wb, lr, C, out)
    assert bool((err <= tol).all()), (err / tol).max().item()
    # the bound catches the alternative it replaces: W0 + Delta rounded to bf16 before one product
    zc, ws, T, n, _ = _chunk_weights(zb, v, wb, wb, lr, C, None, None, None)
    rounded = torch.einsum("bnch,bndh->bncd", zc.bfloat16(), ws[:, :n].bfloat16()).flatten(1, 2)[:, :T]
    assert not bool(((rounded.float() - (base.float() + ttt_ref)).abs() <= tol).all())
    # and a lost update: the base alone violates it once the update is visible
    if lr >= 1e-2:
        assert not bool(((base.float() - (base.float() + ttt_ref)).abs() <= tol).all())


def test_base_follows_autocast():
    z, v, w, C = _inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = split_inplace_ttt(z, v, w, w, 0.0, C)
        base = F.linear(z, w)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)


def test_bad_shapes_raise():
    z, v, w, C = _inputs()
    with pytest.raises(ValueError, match="w_base"):
        split_inplace_ttt(z, v, w, w[None], 1e-2, C)


def test_chunk_fast_weights_are_the_weights_each_chunk_reads():
    from ttt_speech.ops.inplace_ttt import chunk_fast_weights, naive_chunk_inplace_ttt

    z, v, w, C = _inputs(3, T=32)
    start = w + 0.01 * torch.randn(2, *w.shape, generator=torch.Generator().manual_seed(4))
    for kw in ({}, {"decay": 0.8}, {"max_delta": 0.05, "clip_tau": 1.0}):
        zc, ws = chunk_fast_weights(z, v, start, w, 1e-2, C, **kw)
        assert zc.shape == (2, 4, C, z.shape[-1]) and ws.shape == (2, 5, *w.shape)
        torch.testing.assert_close(ws[:, 0], start, rtol=0, atol=0)
        for i in range(1, 5):  # the naive reference over the first i chunks ends on the weight chunk i reads
            _, w_i = naive_chunk_inplace_ttt(z[:, :i * C], v[:, :i * C], start, 1e-2, C, w_ref=w, **kw)
            torch.testing.assert_close(ws[:, i], w_i, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="whole chunks"):
        chunk_fast_weights(z[:, :30], v[:, :24], w, w, 1e-2, C)


def test_split_sum_adds_in_float32_and_rounds_once():
    from ttt_speech.ops.inplace_ttt import split_sum

    base = torch.tensor([1.0], dtype=torch.bfloat16)
    ttt = torch.tensor([2.0**-8 + 2.0**-17])  # just over half an ulp of 1.0 in bf16
    assert torch.equal(split_sum(base, torch.zeros(1)), base)
    assert split_sum(base, ttt, torch.float32).item() == 1.0 + 2.0**-8 + 2.0**-17  # a float32 output keeps it
    # bf16: one rounding of the exact sum (up to 1 + 2^-7); rounding the term to bf16 first gives a tie, kept at 1
    assert split_sum(base, ttt).item() == 1.0 + 2.0**-7
    assert (base + ttt.bfloat16()).item() == 1.0
