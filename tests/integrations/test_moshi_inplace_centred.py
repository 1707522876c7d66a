"""`ttt.centre_update` on the tiny Moshi: one semantics (parallel == pieces == frame by frame), the module against
the op references, the off default unchanged, the config checked and carried by a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_moshi_ttt import forward_text_input, random_codes, stream, ttt_model

from ttt_speech.integrations.moshi import (
    TINY_LM_KWARGS,
    MoshiTTTConfig,
    load_ttt_lm,
    save_ttt_checkpoint,
    ttt_modules,
)
from ttt_speech.integrations.moshi_inplace import InPlaceTTTConfig
from ttt_speech.ops.inplace_ttt import naive_chunk_centre, naive_chunk_conv1d, naive_chunk_inplace_ttt


@pytest.mark.parametrize("chunk_size,bounds", [(3, {}), (4, {"decay": 0.9}), (2, {"decay": 0.8, "max_delta": 0.05})])
def test_centred_parallel_equals_pieces_equals_frame_by_frame(chunk_size: int, bounds: dict) -> None:
    model = ttt_model(chunk_size=chunk_size, centre_update=True, **bounds)
    B, T = 2, 19
    seq = forward_text_input(model, random_codes(model, B, T))
    with torch.no_grad():
        full, _ = model.forward_text(seq)
        plain, _ = ttt_model(chunk_size=chunk_size, **bounds).forward_text(seq)
    assert (full - plain).abs().amax() > 1e-4  # centring changes the update
    for pieces in ([T], [5, 1, 9, 4], [1] * T):
        torch.testing.assert_close(stream(model, seq, pieces), full, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, p=pieces: f"pieces {p}: {m}")


def test_module_equals_the_op_references() -> None:
    """The gating's output is the naive chunk-by-chunk update on centred targets, built from the naive conv."""
    C = 4
    model = ttt_model(chunk_size=C, centre_update=True, decay=0.9)
    gating = ttt_modules(model)[0]
    seq = forward_text_input(model, random_codes(model, 2, 18))
    captured = {}
    gating.register_forward_hook(lambda m, a, kw, out: captured.update(x=a[0], kw=kw, out=out), with_kwargs=True)
    with torch.no_grad():
        model.forward_text(seq)
        x, x0 = captured["x"], captured["kw"]["input_embeddings"]
        h = gating.linear_in(x).view(*x.shape[:2], 2, -1)
        z = gating.activation(h[..., 0, :]) * h[..., 1, :]
        n_full = x.shape[1] // C * C
        conv = naive_chunk_conv1d(x0[:, :n_full], gating.ttt_conv.weight[:, 0], C)
        v = naive_chunk_centre(conv @ gating.ttt_target.weight.t(), C)
        ref, _ = naive_chunk_inplace_ttt(z, v, gating.linear_out.weight, gating.config.lr, C, decay=0.9)
    torch.testing.assert_close(captured["out"], ref, rtol=1e-5, atol=1e-5)


def test_off_by_default_and_checked() -> None:
    assert InPlaceTTTConfig().centre_update is False
    assert MoshiTTTConfig().centre_update is False
    with pytest.raises(ValueError, match="centre_update needs chunk_size >= 2"):
        InPlaceTTTConfig(chunk_size=1, centre_update=True)
    assert MoshiTTTConfig.from_dict({"centre_update": True}).centre_update is True


def test_checkpoint_carries_centre_update(tmp_path: Path) -> None:
    model = ttt_model(chunk_size=3, centre_update=True)
    save_ttt_checkpoint(model, tmp_path / "ckpt", lm_kwargs=None)
    assert json.loads((tmp_path / "ckpt" / "ttt_config.json").read_text())["centre_update"] is True
    restored = load_ttt_lm(tmp_path / "ckpt", lm_kwargs=TINY_LM_KWARGS).eval()
    assert all(m.config.centre_update for m in ttt_modules(restored).values())
    codes = random_codes(model, 2, 11)
    torch.testing.assert_close(restored(codes).logits, model(codes).logits, rtol=0, atol=0, equal_nan=True)
