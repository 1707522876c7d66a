"""The Moshi TTT block with TTTConfig's input options (pre_conv, short convs, centring, ...): streaming == parallel,
per-row state, exact causality, config validation and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_moshi_ttt import forward_text_input, random_codes, stream

from ttt_speech.config import from_dict
from ttt_speech.integrations.moshi import (
    TINY_LM_KWARGS,
    MoshiTTTConfig,
    apply_ttt,
    build_lm,
    load_ttt_lm,
    save_ttt_checkpoint,
    ttt_modules,
)
from ttt_speech.nn import RECALL_OPTIONS, REFERENCE_OPTIONS, TTTConfig

OPTS = {"qk_norm": "l2", "conv_size": 3, "use_rope": False, "eta_schedule": "sum", "centre": True, "pre_conv": True}
NO_SQK = {"ttt_share_qk": False}  # conv_size and the reference layer need share_qk off (the default has it on)
SETS = {
    "default": ({}, None),  # MoshiTTTConfig's defaults: the recall preset (share_qk, l2, centre, no RoPE, eta sum)
    "all": (NO_SQK, OPTS),
    "pre_conv": (NO_SQK, {"pre_conv": True}),
    "share_qk+pre_conv+centre": ({"ttt_share_qk": True}, {"pre_conv": True, "centre": True, "conv_kernel": 3}),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def options_model(name: str = "all", layer_type: str = "linear", mini_batch: int = 4) -> torch.nn.Module:
    fields, options = SETS[name]
    model = build_lm(seed=0)
    if options is not None:
        fields = {**fields, "ttt_options": options}
    cfg = MoshiTTTConfig(kind="block", layers=[1, 3], ttt_mini_batch_size=mini_batch, ttt_num_heads=2,
                         ttt_layer_type=layer_type, gate_init=0.5, **fields)
    apply_ttt(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in ttt_modules(model).values():
            for name_ in ("q_conv", "k_conv", "v_conv"):
                if hasattr(block.ttt, name_):  # off the identity init, so that a lost tail shows
                    conv = getattr(block.ttt, name_)
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
    return model.eval()


@pytest.mark.parametrize("name", list(SETS))
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_block_with_options_parallel_equals_pieces_equals_frame_by_frame(name: str, layer_type: str) -> None:
    model = options_model(name, layer_type)
    B, T = 2, 17
    seq = forward_text_input(model, random_codes(model, B, T))
    with torch.no_grad():
        full, _ = model.forward_text(seq)
    for pieces in ([6, 1, 7, 3], [1] * T):
        torch.testing.assert_close(stream(model, seq, pieces), full, rtol=1e-5, atol=1e-5)


def test_block_options_state_resets_per_row_and_is_float32() -> None:
    model = options_model()
    B, T, cut = 2, 11, 5
    seq = forward_text_input(model, random_codes(model, B, T))

    def check_state() -> None:
        state = ttt_modules(model)[1]._streaming_state.ttt
        assert sorted(state.input_state) == ["centre_count", "centre_sum", "pre_conv", "qkv_conv"]
        assert all(t.dtype == torch.float32 for t in state.input_state.values())

    stepped = stream(model, seq, [1] * T, reset_at=cut, inspect=check_state)
    with torch.no_grad():
        whole, _ = model.forward_text(seq)
        fresh_row0, _ = model.forward_text(seq[:1, :, cut:])
    torch.testing.assert_close(stepped[1:], whole[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stepped[:1, cut:], fresh_row0, rtol=1e-5, atol=1e-5)


def test_exec_mask_freezes_the_input_state_of_masked_rows() -> None:
    model = options_model()
    seq = forward_text_input(model, random_codes(model, 2, 6))
    block = ttt_modules(model)[1]
    with torch.no_grad(), model.streaming(2):
        model.forward_text(seq[:, :, :3])
        before = {n: t.clone() for n, t in block._streaming_state.ttt.input_state.items()}
        model.set_exec_mask(torch.tensor([True, False]))
        model.forward_text(seq[:, :, 3:4])
        after = block._streaming_state.ttt.input_state
        for n, t in before.items():
            assert torch.equal(after[n][1], t[1]), n
            assert not torch.equal(after[n][0], t[0]), n


@pytest.mark.parametrize("name", [None, "default", "all", "share_qk+pre_conv+centre"])
def test_block_is_causal_exactly(name: str | None) -> None:
    """Changing the block's inputs at positions >= t changes none of its outputs before t, bit for bit (None:
    ttt-lm-pytorch's layer)."""
    model = options_model(name) if name else apply_ttt(
        build_lm(seed=0), MoshiTTTConfig(kind="block", layers=[1, 3], ttt_mini_batch_size=4, ttt_num_heads=2,
                                         gate_init=0.5, ttt_share_qk=False, ttt_options={})).eval()
    block = ttt_modules(model)[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 23, block.gate_alpha.shape[0], generator=g)
    for t in (1, 4, 9, 22):
        x2 = x.clone()
        x2[:, t:] = torch.randn(x2[:, t:].shape, generator=g)
        with torch.no_grad():
            y, y2 = block(x), block(x2)
        assert torch.equal(y[:, :t], y2[:, :t]), t
        assert not torch.equal(y[:, t], y2[:, t])


def test_model_with_a_block_is_causal_exactly() -> None:
    """The same through the whole LMModel: its outputs before frame t do not see codes at frames >= t."""
    model = options_model()
    codes = random_codes(model, 2, 15)
    seq = forward_text_input(model, codes)
    t = 8
    other = random_codes(model, 2, 15, seed=7)
    seq2 = forward_text_input(model, torch.cat([codes[..., :t], other[..., t:]], dim=-1))
    first = int((seq != seq2).any(1).any(0).nonzero()[0])  # the initial token shifts frame t to position t + 1
    assert first == t + 1
    with torch.no_grad():
        a, _ = model.forward_text(seq)  # [B, T, dim]
        b, _ = model.forward_text(seq2)
    assert torch.equal(a[:, :first], b[:, :first])
    assert not torch.equal(a[:, first], b[:, first])


def test_ttt_options_are_validated_by_name() -> None:
    with pytest.raises(ValueError, match=r"ttt.ttt_options: TTTConfig.qk_norm must be one of"):
        MoshiTTTConfig(kind="block", ttt_options={"qk_norm": "rms"})
    with pytest.raises(ValueError, match=r"ttt.ttt_options.num_heads: set it with ttt_num_heads"):
        MoshiTTTConfig(kind="block", ttt_options={"num_heads": 2})
    with pytest.raises(ValueError, match=r"unknown TTTConfig field 'qk_nrom'; known: .*qk_norm"):
        MoshiTTTConfig(kind="block", ttt_options={"qk_nrom": "l2"})
    parsed = from_dict(MoshiTTTConfig, {"kind": "block", "ttt_share_qk": False,
                                        "ttt_options": {"centre": True, "conv_size": 4}})
    assert parsed.block_config(64, 4).centre and parsed.block_config(64, 4).conv_size == 4
    with pytest.raises(ValueError, match=r"ttt.ttt_options: TTTConfig.conv_size needs share_qk=False.*"
                                         r"ttt.ttt_share_qk is True"):
        MoshiTTTConfig(kind="block", ttt_options={"conv_size": 4})


def test_the_default_block_is_the_recall_preset_and_a_given_mapping_replaces_it() -> None:
    default = MoshiTTTConfig(kind="block").block_config(64, 4)
    assert default == TTTConfig.recall(64, 1)
    assert default.options() == RECALL_OPTIONS and default.num_heads == 1
    reference = MoshiTTTConfig(kind="block", ttt_share_qk=False, ttt_num_heads=None, ttt_options={})
    assert reference.block_config(64, 4) == TTTConfig.reference(64, 4)
    only_pre_conv = MoshiTTTConfig(kind="block", ttt_options={"pre_conv": True}).block_config(64, 4)
    assert only_pre_conv.options() == {**REFERENCE_OPTIONS, "share_qk": True, "pre_conv": True}
    # a saved config (every field, as written by to_dict) keeps its meaning
    assert MoshiTTTConfig.from_dict(reference.to_dict()).block_config(64, 4) == TTTConfig.reference(64, 4)


def test_block_options_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    model = options_model()
    save_ttt_checkpoint(model, tmp_path / "ckpt", lm_kwargs=TINY_LM_KWARGS)
    restored = load_ttt_lm(tmp_path / "ckpt")
    assert restored.ttt_config.ttt_options == OPTS
    assert "transformer.layers.1.ttt_block.ttt.pre_conv.conv.weight" in restored.state_dict()
    codes = random_codes(model, 1, 9)
    torch.testing.assert_close(restored(codes).logits, model(codes).logits, rtol=0, atol=0, equal_nan=True)
