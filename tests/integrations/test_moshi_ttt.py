"""In-Place TTT in a real (tiny, random) moshi LMModel: training forward, pieces, streaming, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moshi_codes import random_codes  # noqa: F401  (also imported from here by other test modules)

from ttt_speech.integrations.moshi import (
    MoshiTTTConfig,
    apply_ttt,
    build_lm,
    load_ttt_lm,
    make_lm_gen,
    save_ttt_checkpoint,
    ttt_modules,
    ttt_parameter_names,
)
from ttt_speech.integrations.moshi_inplace import InPlaceTTTGating
from ttt_speech.integrations.moshi_lm import delay_codes


def forward_text_input(model, codes: torch.Tensor) -> torch.Tensor:
    """The delayed sequence LMModel.forward feeds to forward_text (initial token first)."""
    initial = model._get_initial_token().expand(codes.shape[0], -1, -1)
    return torch.cat([initial, delay_codes(model.delays, codes, initial)], dim=2)[:, :, :-1]


def stream(model, seq: torch.Tensor, pieces: list[int], reset_at: int | None = None, inspect=None) -> torch.Tensor:
    """forward_text over `seq` in streaming, in calls of `pieces` frames; row 0 is reset before frame `reset_at`;
    `inspect()` runs inside the streaming context at the end."""
    outs, start = [], 0
    with torch.no_grad(), model.streaming(seq.shape[0]):
        for n in pieces:
            if start == reset_at:
                model.reset_streaming(torch.tensor([True] + [False] * (seq.shape[0] - 1)))
            outs.append(model.forward_text(seq[:, :, start:start + n])[0])
            start += n
        if inspect is not None:
            inspect()
    return torch.cat(outs, 1)


def ttt_model(seed: int = 0, lr: float = 0.5, **cfg) -> torch.nn.Module:
    """A tiny TTT model whose TTT actually matters: random conv and target instead of the zero-conv init."""
    model = build_lm(seed=seed)
    cfg = {"layers": [0, 2], "chunk_size": 4, "lr": lr} | cfg
    apply_ttt(model, MoshiTTTConfig(**cfg))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in ttt_modules(model).values():
            m.ttt_conv.weight.copy_(torch.randn(m.ttt_conv.weight.shape, generator=g) * 0.3)
            m.ttt_target.weight.copy_(torch.randn(m.ttt_target.weight.shape, generator=g) * 0.3)
    return model.eval()


def test_lr_zero_equals_the_base_model_through_the_ttt_path() -> None:
    base = build_lm(seed=0)
    model = ttt_model(lr=0.0)
    calls = []
    for m in ttt_modules(model).values():
        m.register_forward_hook(lambda *_: calls.append(1))
    codes = random_codes(model, 2, 13)
    out, ref = model(codes), base(codes)
    assert len(calls) == 2
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(out.text_logits, ref.text_logits, rtol=0, atol=1e-6, equal_nan=True)
    live = ttt_model(lr=0.5)(codes)
    assert (live.logits - ref.logits).nan_to_num().abs().max() > 1e-3


def test_default_init_starts_as_the_base_model() -> None:
    base = build_lm(seed=0)
    model = build_lm(seed=0)
    apply_ttt(model, MoshiTTTConfig(layers=[1, 3], chunk_size=3, lr=1.0))
    codes = random_codes(model, 1, 10)
    torch.testing.assert_close(model(codes).logits, base(codes).logits, rtol=0, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 8])
@pytest.mark.parametrize("conv", ["centred", "next"])
def test_parallel_equals_pieces_equals_frame_by_frame(chunk_size: int, conv: str) -> None:
    model = ttt_model(chunk_size=chunk_size, conv=conv)
    B, T = 2, 19  # not a multiple of any chunk size above but 1
    seq = forward_text_input(model, random_codes(model, B, T))
    with torch.no_grad():
        full, _ = model.forward_text(seq)
    for pieces in ([T], [5, 1, 9, 4], [1] * T):
        torch.testing.assert_close(stream(model, seq, pieces), full, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, p=pieces: f"pieces {p}: {m}")


def test_streaming_updates_only_when_a_chunk_completes() -> None:
    model = ttt_model(chunk_size=4)
    gating = ttt_modules(model)[0]
    seq = forward_text_input(model, random_codes(model, 1, 9))
    with torch.no_grad(), model.streaming(1):
        w_start = gating._streaming_state.w.clone()
        for t in range(9):
            model.forward_text(seq[:, :, t:t + 1])
            state = gating._streaming_state
            assert state.pos.item() == (t + 1) % 4
            changed = not torch.equal(state.w, w_start)
            assert changed == (t >= 3), t


def test_rows_are_independent_and_individually_reset() -> None:
    model = ttt_model(chunk_size=3)
    B, T, cut = 2, 14, 7
    seq = forward_text_input(model, random_codes(model, B, T))
    stepped = stream(model, seq, [1] * T, reset_at=cut)
    with torch.no_grad():
        whole, _ = model.forward_text(seq)
        fresh_row0, _ = model.forward_text(seq[:1, :, cut:])
    torch.testing.assert_close(stepped[1:], whole[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stepped[:1, :cut], whole[:1, :cut], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stepped[:1, cut:], fresh_row0, rtol=1e-5, atol=1e-5)
    solo, _ = model.forward_text(seq[1:])
    torch.testing.assert_close(solo, whole[1:], rtol=1e-5, atol=1e-5)


def test_lmgen_streams_with_ttt_and_resets_rows() -> None:
    model = ttt_model(chunk_size=2)
    gating = ttt_modules(model)[2]
    lm_gen = make_lm_gen(model)
    codes = random_codes(model, 2, 9)
    with torch.no_grad(), lm_gen.streaming(2):
        for t in range(9):
            lm_gen.step(codes[:, model.dep_q + 1:, t:t + 1])
        state = gating._streaming_state
        assert not torch.equal(state.w[0], gating.initial_fast_weight())
        lm_gen.reset_streaming(torch.tensor([True, False]))
        assert torch.equal(state.w[0], gating.initial_fast_weight())
        assert not torch.equal(state.w[1], gating.initial_fast_weight())
        assert state.pos.tolist()[0] == 0


def test_fast_weights_are_float32_in_a_bf16_model() -> None:
    model = build_lm(seed=0, dtype=torch.bfloat16)
    apply_ttt(model, MoshiTTTConfig(layers=[0], chunk_size=2))
    seq = forward_text_input(model, random_codes(model, 1, 5))
    with torch.no_grad(), model.streaming(1):
        out, _ = model.forward_text(seq)
        state = ttt_modules(model)[0]._streaming_state
    assert out.dtype == torch.bfloat16
    assert {state.w.dtype, state.z_buf.dtype, state.x0_buf.dtype, state.w0.dtype} == {torch.float32}


def test_w0_is_the_loaded_linear_out_also_through_meta_and_assign() -> None:
    donor = build_lm(seed=7)
    loaded = build_lm(seed=0)
    loaded_state = donor.state_dict()
    apply_ttt(loaded, MoshiTTTConfig(layers=[1]))
    meta = build_lm(device="meta")
    apply_ttt(meta, MoshiTTTConfig(layers=[1]))
    for model in (loaded, meta):
        state = dict(loaded_state)
        state.update({k: v for k, v in loaded.state_dict().items() if k in ttt_parameter_names(loaded)})
        model.load_state_dict(state, assign=True)
        gating = ttt_modules(model)[1]
        expected = loaded_state["transformer.layers.1.gating.linear_out.weight"]
        torch.testing.assert_close(gating.initial_fast_weight(), expected, rtol=0, atol=0)
        with model.streaming(2):
            torch.testing.assert_close(gating._streaming_state.w, expected.expand(2, -1, -1), rtol=0, atol=0)


def test_gradients_reach_conv_and_target_from_init() -> None:
    model = build_lm(seed=0)
    apply_ttt(model, MoshiTTTConfig(layers=[1], chunk_size=3))
    gating = ttt_modules(model)[1]
    codes = random_codes(model, 2, 12)

    def loss() -> torch.Tensor:
        out = model(codes)
        return out.logits[out.mask].float().logsumexp(-1).mean()

    loss().backward()
    assert gating.ttt_conv.weight.grad.abs().sum() > 0
    # V = conv(X0) W_target^T with the conv at zero: W_target's gradient is exactly zero at init (the paper's
    # init); it is non-zero as soon as the conv has moved.
    assert gating.ttt_target.weight.grad is not None
    with torch.no_grad():
        gating.ttt_conv.weight -= 1e-2 * gating.ttt_conv.weight.grad
    model.zero_grad()
    loss().backward()
    assert gating.ttt_target.weight.grad.abs().sum() > 0
    assert gating.linear_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("target", ["input_embeddings", "token_embeddings"])
def test_target_sources_are_checked(target: str) -> None:
    model = ttt_model(target=target)
    gating = ttt_modules(model)[0]
    x = torch.randn(2, 5, model.dim)
    with pytest.raises(ValueError, match=rf"{target} must be \[2, 5, 64\], got \[2, 4, 64\]"):
        gating(x, **{target: torch.randn(2, 4, model.dim)})
    with pytest.raises(ValueError, match=f"needs {target}"):
        gating(x)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = ttt_model(chunk_size=3)
    save_ttt_checkpoint(model, tmp_path / "ckpt", lm_kwargs=None)
    assert json.loads((tmp_path / "ckpt" / "ttt_config.json").read_text())["chunk_size"] == 3
    from ttt_speech.integrations.moshi import TINY_LM_KWARGS

    restored = load_ttt_lm(tmp_path / "ckpt", lm_kwargs=TINY_LM_KWARGS).eval()
    codes = random_codes(model, 2, 11)
    torch.testing.assert_close(restored(codes).logits, model(codes).logits, rtol=0, atol=0, equal_nan=True)
    assert isinstance(restored.transformer.layers[2].gating, InPlaceTTTGating)


def test_base_checkpoint_loads_into_a_ttt_model_and_other_gaps_are_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ttt_speech.integrations.moshi import TINY_LM_KWARGS

    base = build_lm(seed=3)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(state, str(tmp_path / "base.safetensors"))
    cfg = MoshiTTTConfig(layers=[0, 3], chunk_size=4)
    model = load_ttt_lm(tmp_path / "base.safetensors", cfg, TINY_LM_KWARGS)
    codes = random_codes(base, 1, 9)
    torch.testing.assert_close(model(codes).logits, base(codes).logits, rtol=0, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(ttt_modules(model)[3].initial_fast_weight(),
                               state["transformer.layers.3.gating.linear_out.weight"], rtol=0, atol=0)

    del state["transformer.layers.2.gating.linear_in.weight"]
    state["transformer.layers.9.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['transformer.layers.2.gating.linear_in.weight'\], "
                                         r"unexpected keys \['transformer.layers.9.extra'\]"):
        load_ttt_lm(tmp_path / "broken.safetensors", cfg, TINY_LM_KWARGS)


def test_new_parameter_names_survive_moshi_finetune_savers() -> None:
    names = ttt_parameter_names(ttt_model())
    assert names and not any("lora" in n or "frozen" in n for n in names)


def test_exec_mask_freezes_the_state_of_masked_rows() -> None:
    model = ttt_model(chunk_size=2)
    gating = ttt_modules(model)[0]
    seq = forward_text_input(model, random_codes(model, 2, 6))
    with torch.no_grad(), model.streaming(2):
        model.forward_text(seq[:, :, :3])
        before = {k: getattr(gating._streaming_state, k).clone() for k in ("w", "z_buf", "x0_buf", "pos")}
        model.set_exec_mask(torch.tensor([True, False]))
        model.forward_text(seq[:, :, 3:4])
        after = gating._streaming_state
        for k, v in before.items():
            assert torch.equal(getattr(after, k)[1], v[1]), k
        assert not torch.equal(after.w[0], before["w"][0])


def block_model(mini_batch: int = 4, layer_type: str = "linear", **cfg) -> torch.nn.Module:
    model = build_lm(seed=0)
    cfg = {"kind": "block", "layers": [1, 3], "ttt_mini_batch_size": mini_batch, "ttt_num_heads": 2,
           "ttt_layer_type": layer_type, "gate_init": 0.5} | cfg
    return apply_ttt(model, MoshiTTTConfig(**cfg)).eval()


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("mini_batch", [1, 4, 5])
def test_block_parallel_equals_pieces_equals_frame_by_frame(layer_type: str, mini_batch: int) -> None:
    model = block_model(mini_batch, layer_type)
    B, T = 2, 17
    seq = forward_text_input(model, random_codes(model, B, T))
    with torch.no_grad():
        full, _ = model.forward_text(seq)
        assert (full - build_lm(seed=0).eval().forward_text(seq)[0]).abs().max() > 1e-4  # the block matters
    for pieces in ([6, 1, 7, 3], [1] * T):
        torch.testing.assert_close(stream(model, seq, pieces), full, rtol=1e-5, atol=1e-5)


def test_block_rows_reset_individually_and_state_is_float32() -> None:
    model = block_model(3)
    B, T, cut = 2, 11, 5
    seq = forward_text_input(model, random_codes(model, B, T))
    def fp32_state() -> None:
        state = ttt_modules(model)[1]._streaming_state.ttt
        assert all(t.dtype == torch.float32 for t in [*state.params.values(), *state.grads.values()])

    stepped = stream(model, seq, [1] * T, reset_at=cut, inspect=fp32_state)
    with torch.no_grad():
        whole, _ = model.forward_text(seq)
        fresh_row0, _ = model.forward_text(seq[:1, :, cut:])
    torch.testing.assert_close(stepped[1:], whole[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stepped[:1, cut:], fresh_row0, rtol=1e-5, atol=1e-5)


def test_block_is_nearly_the_base_model_at_init_and_sets_its_context(tmp_path: Path) -> None:
    from ttt_speech.integrations.moshi import TINY_LM_KWARGS

    model = build_lm(seed=0)
    apply_ttt(model, MoshiTTTConfig(kind="block", layers=[2], ttt_context=8, ttt_num_heads=2))
    block = ttt_modules(model)[2]
    torch.testing.assert_close(block.gate_alpha, torch.full_like(block.gate_alpha, 0.1))
    assert model.transformer.layers[2].self_attn.context == 8
    assert model.transformer.layers[1].self_attn.context == TINY_LM_KWARGS["context"]
    save_ttt_checkpoint(model, tmp_path / "ckpt", lm_kwargs=TINY_LM_KWARGS)
    restored = load_ttt_lm(tmp_path / "ckpt")
    codes = random_codes(model, 1, 9)
    torch.testing.assert_close(restored(codes).logits, model(codes).logits, rtol=0, atol=0, equal_nan=True)
    assert restored.transformer.layers[2].self_attn.context == 8


def test_block_from_a_base_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ttt_speech.integrations.moshi import TINY_LM_KWARGS

    base = build_lm(seed=3)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    model = load_ttt_lm(tmp_path / "base.safetensors", MoshiTTTConfig(kind="block", layers=[0], ttt_num_heads=2),
                        TINY_LM_KWARGS)
    block = ttt_modules(model)[0]
    assert not any(p.is_meta for p in model.parameters())
    torch.testing.assert_close(block.gate_alpha, torch.full_like(block.gate_alpha, 0.1))
    # explicitly initialised, not left as to_empty's garbage: the reference's init
    assert torch.equal(block.ttt.learnable_token_idx, torch.zeros_like(block.ttt.learnable_token_idx))
    assert 0.01 < block.ttt.W1.std().item() < 0.03
