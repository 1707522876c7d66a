"""Reading recordings as Mimi wants them: two channels (left = main speaker, right = user) at 24 kHz.

Mono files (LibriLight) get a silent right channel. Files at another rate are resampled with a windowed-sinc
filter that is symmetric, so it delays nothing: word times in the alignments stay valid.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from ttt_speech.constants import FRAME_RATE, SAMPLE_RATE
from ttt_speech.errors import DataError


def num_frames(duration_sec: float, frame_rate: float = FRAME_RATE, sample_rate: int = SAMPLE_RATE) -> int:
    """Mimi frames of `duration_sec` seconds of audio (the last partial frame counts)."""
    frame_size = round(sample_rate / frame_rate)
    return math.ceil(round(duration_sec * sample_rate) / frame_size)


@functools.lru_cache(maxsize=16)
def _sinc_kernel(up: int, down: int, zero_crossings: int, rolloff: float) -> tuple[torch.Tensor, int]:
    # output n sits at n * down / up input samples; phase j = n % up is a filter over input samples
    cutoff = rolloff * min(1.0, up / down)  # in cycles per input sample, times 2
    half = math.ceil(zero_crossings / cutoff)
    taps = torch.arange(2 * half + down + 1, dtype=torch.float64)  # input offsets from base - half
    shift = torch.arange(up, dtype=torch.float64)[:, None] * down / up
    t = taps[None] - half - shift  # [up, K], in input samples
    window = torch.where(t.abs() <= half, torch.cos(math.pi * t / (2 * half)) ** 2, 0.0)
    kernel = cutoff * torch.sinc(cutoff * t) * window
    return kernel[:, None].float(), half  # [up, 1, K]


def resample(wav: np.ndarray | torch.Tensor, src_rate: int, dst_rate: int, zero_crossings: int = 16,
              rolloff: float = 0.95) -> torch.Tensor:
    """Resample without delay.

    Args:
        wav: audio of shape [C, S].
        src_rate, dst_rate: sample rates in Hz.
        zero_crossings: half-width of the sinc filter, in zero crossings of the lower rate.
        rolloff: cutoff as a fraction of the lower Nyquist frequency.

    Returns:
        float32 audio of shape [C, ceil(S * dst_rate / src_rate)]; sample n is at time n / dst_rate.
    """
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if wav.dim() != 2:
        raise ValueError(f"wav must be [C, S], got {list(wav.shape)}")
    if src_rate == dst_rate:
        return wav
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    kernel, half = _sinc_kernel(up, down, zero_crossings, rolloff)
    length = wav.shape[-1]
    out_len = math.ceil(length * up / down)
    steps = math.ceil(out_len / up)  # output samples per phase
    right = max(0, (steps - 1) * down + kernel.shape[-1] - half - length)
    x = torch.nn.functional.pad(wav[:, None], (half, right))  # [C, 1, S + pads]
    y = torch.nn.functional.conv1d(x, kernel, stride=down)  # [C, up, steps]
    return y.transpose(1, 2).reshape(wav.shape[0], -1)[:, :out_len].contiguous()


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A recording as float32 audio of shape [2, S] at `sample_rate`: left = main speaker, right = user.

    Mono files get a silent (all-zero) right channel. More than two channels, no samples, NaN or Inf samples and
    unreadable files are `DataError`s naming the file.
    """
    import sphn

    try:
        data, rate = sphn.read(str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: cannot read the audio ({e})") from e
    if data.ndim != 2 or data.shape[0] not in (1, 2):
        raise DataError(f"{path}: expected mono or stereo audio, got shape {list(data.shape)}")
    if data.shape[-1] == 0:
        raise DataError(f"{path}: the file holds no audio samples")
    finite = np.isfinite(data)
    if not finite.all():
        first = int(np.flatnonzero((~finite).any(axis=0))[0])
        channel = int(np.flatnonzero(~finite[:, first])[0])
        raise DataError(f"{path}: {int((~finite).sum())} NaN or Inf samples (the first at {first / rate:.3f} s, "
                        f"channel {channel}); fix or drop the file")
    wav = resample(data, int(rate), sample_rate)
    if wav.shape[0] == 1:
        wav = torch.cat([wav, torch.zeros_like(wav)])
    return wav
