"""Helpers of the data tests: speech-like synthetic recordings with alignments."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from ttt_speech.data.manifest import MAIN_SPEAKER, Word, write_alignments

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"
TEXT = ["the cat sat on the mat", "a dog ran to the park", "hello there how are you", "good morning to you all"]


def babble(seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    """Speech-like noise: bursts with random loudness every 80 ms, float32 [channels, S]."""
    rng = np.random.default_rng(seed)
    length = round(seconds * rate)
    step = max(1, rate * 2 // 25)
    envelope = np.repeat(rng.uniform(0, 1, (channels, length // step + 1)), step, axis=1)[:, :length]
    return (0.2 * envelope * rng.standard_normal((channels, length))).astype(np.float32)


def words_for(seconds: float, seed: int, speakers=(MAIN_SPEAKER,)) -> list[Word]:
    rng = np.random.default_rng(seed)
    vocab = " ".join(TEXT).split()
    words, t = [], 0.3
    while t + 0.4 < seconds:
        length = float(rng.uniform(0.15, 0.4))
        words.append(Word(str(rng.choice(vocab)), round(t, 3), round(t + length, 3),
                          speakers[len(words) % len(speakers)]))
        t += length + float(rng.uniform(0.05, 0.3))
    return words


def write_recording(path: Path, seconds: float, *, rate: int = 24000, channels: int = 2, seed: int = 0,
                    words: list[Word] | None = None) -> tuple[Path, float]:
    import sphn

    path.parent.mkdir(parents=True, exist_ok=True)
    audio = babble(seconds, rate, seed, channels)
    sphn.write_wav(str(path), audio, rate)
    write_alignments(path.with_suffix(".json"), words if words is not None else words_for(seconds, seed))
    return path, audio.shape[-1] / rate


@contextlib.contextmanager
def one_torch_thread():
    """The tiny Mimi's ops are small: one thread is faster, and a second one stalls (50x) on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
