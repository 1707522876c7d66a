import math
import wave

import numpy as np
import pytest
import sphn
import torch
from data_helpers import babble

from ttt_speech.data.audio import load_audio, num_frames, resample


@pytest.mark.parametrize(("src", "dst"), [(16000, 24000), (22050, 24000), (44100, 24000), (48000, 24000),
                                          (24000, 16000)])
def test_resample_keeps_time_and_amplitude(src, dst) -> None:
    length = int(1.37 * src)
    impulse = torch.zeros(1, length)
    impulse[0, src // 2] = 1.0  # at 0.5 s
    out = resample(impulse, src, dst)
    assert out.shape == (1, math.ceil(length * dst / src))
    assert out[0].argmax().item() == dst // 2  # no delay
    assert out.sum().item() * src / dst == pytest.approx(1.0, abs=1e-3)  # DC gain 1
    t = torch.arange(length) / src
    sine = torch.sin(2 * math.pi * 440 * t)[None].repeat(2, 1)
    out = resample(sine, src, dst)
    ref = torch.sin(2 * math.pi * 440 * torch.arange(out.shape[-1]) / dst)
    assert (out[:, 400:-400] - ref[400:-400]).abs().max() < 2e-3
    assert resample(sine, src, src) is not None and torch.equal(resample(sine, src, src), sine)


def test_load_audio_mono_gets_a_silent_right_channel(tmp_path) -> None:
    mono = babble(1.0, 24000, seed=0)
    sphn.write_wav(str(tmp_path / "m.wav"), mono, 24000)
    wav = load_audio(tmp_path / "m.wav")
    assert wav.shape == (2, 24000) and wav.dtype == torch.float32
    assert torch.allclose(wav[0], torch.from_numpy(mono[0]), atol=1e-4)
    assert torch.count_nonzero(wav[1]) == 0

    stereo = babble(0.5, 16000, seed=1, channels=2)
    sphn.write_wav(str(tmp_path / "s.wav"), stereo, 16000)
    wav = load_audio(tmp_path / "s.wav")
    assert wav.shape == (2, 12000)
    assert torch.allclose(wav, resample(stereo, 16000, 24000), atol=1e-3)

    with wave.open(str(tmp_path / "t.wav"), "wb") as f:
        f.setnchannels(3)
        f.setsampwidth(2)
        f.setframerate(24000)
        f.writeframes(np.zeros((100, 3), "<i2").tobytes())
    with pytest.raises(ValueError, match="expected mono or stereo audio"):
        load_audio(tmp_path / "t.wav")


def test_num_frames() -> None:
    assert num_frames(10.0) == 125
    assert num_frames(0.08) == 1 and num_frames(0.0801) == 2 and num_frames(0.01) == 1
    assert num_frames(160) == 2000
