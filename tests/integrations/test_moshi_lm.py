"""integrations/moshi_lm.py: the wrappers of moshi's private names keep LMModel's meaning."""

import pytest
import torch

from ttt_speech.integrations.moshi import build_lm, tiny_lm_kwargs
from ttt_speech.integrations.moshi_lm import (
    delay_codes,
    load_moshi_lm,
    moshi_7b_lm_kwargs,
    undelay_logits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_delay_and_undelay_rebuild_lm_forward(random_codes):
    """The teacher-forced forward written with delay_codes / undelay_logits equals `LMModel.forward`, bit for bit."""
    model = build_lm(seed=0).eval()
    codes = random_codes(model, 2, 12, seed=1)
    with torch.no_grad():
        ref = model(codes)
        initial = model._get_initial_token().expand(2, -1, -1)
        delayed = torch.cat([initial, delay_codes(model.delays, codes, initial)], dim=2)
        out, text_logits = model.forward_text(delayed[:, :, :-1])
        audio = model.forward_depformer_training(delayed[:, :, 1:], out)
        audio, mask = undelay_logits(model.delays[model.audio_offset:model.audio_offset + model.dep_q], audio)
        text, text_mask = undelay_logits(model.delays[:1], text_logits)
    audio_ok = mask & (codes[:, model.audio_offset:model.audio_offset + model.dep_q] != model.zero_token_id)
    assert torch.equal(audio_ok, ref.mask) and torch.equal(text_mask & (codes[:, :1] != model.zero_token_id),
                                                          ref.text_mask)
    assert torch.equal(audio[ref.mask], ref.logits[ref.mask]) and torch.equal(text[ref.text_mask],
                                                                            ref.text_logits[ref.text_mask])
    assert (~mask).any() and torch.isnan(audio[~mask]).all()  # the delayed streams' last frames are invalid


def test_delay_round_trip_and_shape_errors():
    delays = [0, 2, 1]
    codes = torch.arange(2 * 3 * 6).reshape(2, 3, 6)
    initial = torch.full((2, 3, 1), -1)
    delayed = delay_codes(delays, codes, initial)
    assert delayed[0, 1].tolist() == [-1, -1, 6, 7, 8, 9]
    back, mask = undelay_logits(delays, delayed.float())
    assert torch.equal(back[mask], codes.float()[mask]) and mask.sum().item() == 2 * (6 + 4 + 5)
    with pytest.raises(ValueError, match=r"codes must be \[B, 2, T\].*\[2, 3, 6\]"):
        delay_codes([0, 1], codes, initial)
    with pytest.raises(ValueError, match=r"logits must be \[B, 4, T, \.\.\.\]"):
        undelay_logits([0, 1, 1, 1], delayed.float())


def test_moshi_7b_kwargs_is_a_copy_and_load_is_strict(tmp_path):
    kwargs = moshi_7b_lm_kwargs()
    assert kwargs["dim"] == 4096 and kwargs["num_layers"] == 32
    kwargs["dim"] = 1
    assert moshi_7b_lm_kwargs()["dim"] == 4096
    from safetensors.torch import save_file

    model = build_lm(seed=0)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_moshi_lm(path, lm_kwargs=tiny_lm_kwargs())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_moshi_lm(path, lm_kwargs=tiny_lm_kwargs(dim=96))
