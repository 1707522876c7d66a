import pytest
import torch
from data_helpers import babble

from ttt_speech.integrations.mimi import FRAME_RATE, load_mimi
from ttt_speech.integrations.mimi import encode as mimi_encode


@pytest.mark.parametrize("seconds", [0.08, 1.0, 2.3])
def test_tiny_random_codes_shape_at_12_5_hz(mimi, seconds) -> None:
    wav = torch.from_numpy(babble(seconds, 24000, seed=0, channels=3))
    codes = mimi_encode(mimi, wav)
    frames = round(seconds * 24000) // 1920 + (round(seconds * 24000) % 1920 > 0)
    assert codes.shape == (3, 8, frames) and codes.dtype == torch.long
    assert mimi.frame_rate == FRAME_RATE and mimi.sample_rate == 24000
    assert 0 <= codes.min() and codes.max() < mimi.cardinality


def test_tiny_random_is_deterministic_and_informative(mimi) -> None:
    wav = torch.from_numpy(babble(3.0, 24000, seed=1, channels=2))
    codes = mimi_encode(mimi, wav)
    assert torch.equal(mimi_encode(load_mimi("tiny-random"), wav), codes)
    assert not torch.equal(mimi_encode(load_mimi("tiny-random", seed=1), wav), codes)
    for k in range(8):  # every codebook follows the audio
        assert codes[0, k].unique().numel() > 5
    assert not torch.equal(codes[0], codes[1])
    silence = mimi_encode(mimi, torch.zeros(1, 24000))
    assert (silence == silence[..., :1]).all()  # silence: one code per codebook
    assert load_mimi("tiny-random", num_codebooks=4).num_codebooks == 4


def test_chunked_streaming_equals_one_pass(mimi) -> None:
    wav = torch.from_numpy(babble(2.5, 24000, seed=2, channels=2))
    codes = mimi_encode(mimi, wav)
    assert torch.equal(mimi_encode(mimi, wav, chunk_frames=7), codes)
    with torch.no_grad():
        assert torch.equal(mimi.encode(wav[:, None]), codes)


def test_real_weights_need_a_local_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="Mimi weights not found at .*nope.safetensors"):
        load_mimi(tmp_path / "nope.safetensors")
