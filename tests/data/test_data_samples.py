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


def check_exact_alignment(channel: np.ndarray, spans: list[tuple[float, float]], others: list[tuple[float, float]],
                          loud: float = 0.01):
    """Sound right after every word's start and right before its end; silence between words and during others'."""
    silent = np.ones(channel.shape[-1], bool)
    for start, end in spans:
        a, b = round(start * 24000), round(end * 24000)
        assert np.abs(channel[a:a + 20 * MS]).max() > loud and np.abs(channel[b - 20 * MS:b]).max() > loud
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


def _recall(samples):
    import json

    return json.loads((samples / "recall.json").read_text())


def test_recall_documents_hold_out_voices_and_content(samples) -> None:
    meta = _recall(samples)
    docs = {split: [d for d in meta["documents"] if d["split"] == split] for split in ("train", "heldout")}
    assert len(docs["heldout"]) >= 16 and len(docs["train"]) >= 8
    voices = {split: {d["voice"] for d in ds} for split, ds in docs.items()}
    assert not voices["train"] & voices["heldout"] and len(voices["heldout"]) >= 4 and len(voices["train"]) >= 3
    rates = meta["spec"]["rates"]
    assert {d["rate"] for d in meta["documents"]} == set(rates) and len(rates) >= 2
    assert {d["kind"] for d in docs["heldout"]} == {"name", "digits", "phrase"}
    # no training bank holds a held-out voice or a held-out name or phrase word
    heldout_words = {w.rstrip(".") for d in docs["heldout"] if d["kind"] != "digits"
                     for c in (d["content"], d["unrelated"]) for w in c.split()}
    for bank in meta["banks"].values():
        if bank["split"] == "train":
            assert bank["voice"] not in voices["heldout"]
            assert not {w.rstrip(".") for w in bank["units"]} & heldout_words
    for split, ds in docs.items():
        manifest = read_manifest(samples / f"recall_{split}.jsonl")
        assert [e.path for e in manifest] == [(samples / d["path"]).resolve() for d in ds]


def test_recall_documents_layout(samples) -> None:
    """Parts tile the document on Mimi frame boundaries, every word starts on one, the filler is long enough, A
    is said twice with the same words, and the word alignments are exact."""
    meta = _recall(samples)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(samples / "tokenizer.model"))
    frame = meta["spec"]["frame"]

    def on_grid(sec: float) -> bool:
        return abs(sec / frame - round(sec / frame)) < 1e-6

    for n, d in enumerate(meta["documents"]):
        parts = [d["parts"][p] for p in ("first", "filler", "repeat", "unrelated")]
        assert parts[0][0] == 0 and parts[-1][1] == pytest.approx(d["duration"])
        assert all(parts[i][1] == parts[i + 1][0] for i in range(3))
        assert all(on_grid(a) and on_grid(b) for a, b in parts)
        assert parts[1][1] - parts[1][0] >= meta["spec"]["min_filler"] - 1e-9
        words = read_alignments((samples / d["path"]).with_suffix(".json"))
        assert all(on_grid(w.start) for w in words)

        def said(span, words=words):
            return " ".join(w.text for w in words if span[0] <= w.start and w.end <= span[1]).rstrip(".")

        assert said(d["spans"]["first"]) == said(d["spans"]["repeat"]) == d["content"]
        assert said(d["spans"]["unrelated"]) == d["unrelated"]
        for name, (a, b) in d["parts"].items():  # no word crosses a part boundary
            assert all(w.end <= b for w in words if a <= w.start < b), name
        assert all(0 not in tokenizer.encode(w.text) for w in words)
        if n % 11 == 0:  # a few documents: the audio matches the alignments exactly
            audio, rate = sphn.read(str(samples / d["path"]))
            assert rate == 24000 and audio.shape == (1, round(d["duration"] * 24000))
            # words are trimmed at 0.01 of full scale before resampling, which can leave 0.0098 at an edge
            check_exact_alignment(audio[0], [(w.start, w.end) for w in words], [], loud=0.005)
