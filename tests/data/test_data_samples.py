"""The generated sample set (data/samples, built by `make samples`)."""

import subprocess
import sys

import numpy as np
import pytest
import sentencepiece
import sphn

from ttt_speech.data.loader import DataConfig, build_loader
from ttt_speech.data.manifest import MAIN_SPEAKER, read_alignments, read_manifest

MS = 24  # samples per millisecond at 24 kHz


def check_exact_alignment(channel: np.ndarray, spans: list[tuple[float, float]], others: list[tuple[float, float]]):
    """Sound right after every word's start and right before its end; silence between words and during others'."""
    silent = np.ones(channel.shape[-1], bool)
    for start, end in spans:
        a, b = round(start * 24000), round(end * 24000)
        assert np.abs(channel[a:a + 20 * MS]).max() > 0.01 and np.abs(channel[b - 20 * MS:b]).max() > 0.01
        silent[max(0, a - 2 * MS):b + 2 * MS] = False  # 2 ms: the resampling filter's spread
    assert np.abs(channel[silent]).max() < 0.003
    for start, end in others:
        assert np.abs(channel[round(start * 24000):round(end * 24000)]).max() < 0.003


def test_dialogues_are_stereo_with_the_main_speaker_on_the_left(samples) -> None:
    entries = read_manifest(samples / "dialogues.jsonl")
    assert len(entries) == 4
    for entry in entries:
        audio, rate = sphn.read(str(entry.path))
        assert rate == 24000 and audio.shape[0] == 2
        assert audio.shape[1] / 24000 == pytest.approx(entry.duration, abs=1e-6)
        words = read_alignments(entry.alignment_path)
        assert {w.speaker for w in words} == {MAIN_SPEAKER, "SPEAKER_OTHER"}
        main = [(w.start, w.end) for w in words if w.speaker == MAIN_SPEAKER]
        other = [(w.start, w.end) for w in words if w.speaker != MAIN_SPEAKER]
        check_exact_alignment(audio[0], main, other)
        check_exact_alignment(audio[1], other, main)
        assert words == sorted(words, key=lambda w: w.start) and words[-1].end < entry.duration


def test_audiobook_is_long_mono_with_exact_alignments(samples) -> None:
    (entry,) = read_manifest(samples / "audiobook.jsonl")
    audio, rate = sphn.read(str(entry.path))
    assert rate == 24000 and audio.shape[0] == 1 and entry.duration > 180
    words = read_alignments(entry.alignment_path)
    assert len(words) > 400 and {w.speaker for w in words} == {MAIN_SPEAKER}
    check_exact_alignment(audio[0], [(w.start, w.end) for w in words], [])
    text = (samples / "text.txt").read_text()
    assert " ".join(w.text for w in words) in text


def test_tokenizer_matches_the_tiny_lm(samples) -> None:
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(samples / "tokenizer.model"))
    assert tokenizer.vocab_size() == 96
    assert [tokenizer.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert 0 not in tokenizer.encode((samples / "text.txt").read_text())  # every character is known


def test_loader_reads_the_dialogues(samples, mimi) -> None:
    cfg = DataConfig(train_manifest=str(samples / "dialogues.jsonl"), duration_sec=10.0, batch_size=2,
                     tokenizer=str(samples / "tokenizer.model"))
    loader = build_loader(cfg, mimi=mimi)
    batch = next(loader)
    assert batch.shape == (2, 17, 125)
    assert loader.sampler.num_samples == 8
    text = batch[:, 0]
    assert ((text > 3) & (text < 96)).any() and (text == 0).any() and (text == 3).any()


def test_make_samples_is_idempotent(samples) -> None:
    script = samples.parents[1] / "scripts" / "make_samples.py"
    for _ in range(2):  # the first run rebuilds a stale set; the second must find it current
        out = subprocess.run([sys.executable, str(script), "--out", str(samples)], capture_output=True, text=True,
                             check=True).stdout
    assert "up to date" in out
