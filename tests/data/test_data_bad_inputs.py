"""Bad data refused with the file named, or warned about when legal but suspicious (issue "Nothing lost, nothing
silent"). Each test failed before the fix: a raw traceback deep in Mimi or the embedding, or silent padding."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from data_helpers import write_recording

from ttt_speech.data.audio import load_audio
from ttt_speech.data.codes import pre_encode
from ttt_speech.data.loader import DataConfig, DataWarning, build_loader
from ttt_speech.data.manifest import MAIN_SPEAKER, Word, build_manifest, write_manifest
from ttt_speech.errors import DataError


def write_float_wav(path: Path, data: np.ndarray, rate: int = 24000) -> Path:
    """A 32-bit float WAV, which can hold NaN (sphn writes 16-bit PCM)."""
    data = np.asarray(data, dtype="<f4")
    body = data.T.tobytes()
    fmt = struct.pack("<IHHIIHH", 16, 3, data.shape[0], rate, rate * data.shape[0] * 4, data.shape[0] * 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVEfmt " + fmt + b"data"
                     + struct.pack("<I", len(body)) + body)
    return path


def test_a_wav_without_samples_or_unreadable_is_named(tmp_path: Path) -> None:
    empty = write_float_wav(tmp_path / "empty.wav", np.zeros((2, 0)))
    with pytest.raises(DataError, match=r"empty\.wav: the file holds no audio samples"):
        load_audio(empty)
    zero = tmp_path / "zero.wav"
    zero.write_bytes(b"")
    with pytest.raises(DataError, match=r"zero\.wav: cannot read the audio"):
        load_audio(zero)
    (tmp_path / "empty.json").write_text('{"alignments": []}')
    with pytest.raises(DataError, match=r"no samples: \[.*empty\.wav"):
        build_manifest(tmp_path, tmp_path / "m.jsonl")


def test_nan_or_inf_samples_are_refused(tmp_path: Path) -> None:
    audio = np.full((2, 24000), 0.01, dtype=np.float32)
    audio[1, 12000] = np.inf
    audio[0, 18000] = np.nan
    path = write_float_wav(tmp_path / "bad.wav", audio)
    with pytest.raises(DataError, match=r"bad\.wav: 2 NaN or Inf samples \(the first at 0\.500 s, channel 1\)"):
        load_audio(path)


def loader_for(tmp_path: Path, tokenizer: Path, words: list[Word], mimi, **cfg) -> object:
    wav, duration = write_recording(tmp_path / "rec.wav", 3.0, seed=3, words=words)
    write_manifest(tmp_path / "m.jsonl", [(wav, duration)])
    return build_loader(DataConfig(train_manifest=str(tmp_path / "m.jsonl"), duration_sec=1.0, batch_size=1,
                                   tokenizer=str(tokenizer), **cfg), mimi=mimi)


@pytest.mark.parametrize(("words", "message"), [
    ([Word("hello", 500.0, 900.0, MAIN_SPEAKER), Word("there", 1000.0, 1400.0, MAIN_SPEAKER)],
     r"rec\.json: word times reach 1400 s but the recording lasts 3\.04 s; are the times in milliseconds\?"),
    ([Word("hello", 5.0, 5.4, MAIN_SPEAKER)], r"rec\.json: word times reach 5\.4 s but the recording lasts 3\.04 s"),
    ([Word("hello", 0.5, 0.9, "SPEAKER_0")], r"rec\.json: no word is spoken by 'SPEAKER_MAIN' \(speakers: SPEAKER_0\)"),
], ids=["milliseconds", "past-the-end", "wrong-speaker"])
def test_alignments_that_give_no_text_are_warned_about_once(tmp_path, tokenizer_path, mimi, words, message) -> None:
    loader = loader_for(tmp_path, tokenizer_path, words, mimi, shuffle=False, random_crop=False)
    with pytest.warns(DataWarning, match=message) as caught:
        batch = next(loader)
    assert "the text stream is all padding" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per file
        next(loader)
    assert batch.shape == (1, 17, 12)


def test_good_alignments_are_not_warned_about(tmp_path, tokenizer_path, mimi) -> None:
    words = [Word("hello", 0.2, 0.5, MAIN_SPEAKER), Word("there", 0.6, 0.9, MAIN_SPEAKER)]
    loader = loader_for(tmp_path, tokenizer_path, words, mimi, shuffle=False, random_crop=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(loader)


def test_codes_with_a_stale_manifest_duration_are_refused(corpus, corpus_codes, tokenizer_path, tmp_path) -> None:
    lines = [json.loads(ln) for ln in corpus.read_text().splitlines()]
    lines[1]["duration"] += 4.0  # edited after encoding
    stale = corpus.parent / "stale.jsonl"  # beside the corpus: its paths are relative
    stale.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError, match=r"stale\.jsonl:2: duration .* but its codes in .* hold \d+ frames .* stale"):
        build_loader(DataConfig(train_manifest=str(stale), tokenizer=str(tokenizer_path),
                                codes_dir=str(corpus_codes)))


def test_another_manifest_with_the_same_sample_count_is_refused_on_resume(tmp_path, tokenizer_path, mimi) -> None:
    recs = [write_recording(tmp_path / f"r{i}.wav", 2.5, seed=i) for i in range(4)]
    write_manifest(tmp_path / "a.jsonl", recs[:2])
    write_manifest(tmp_path / "b.jsonl", recs[2:])
    cfg = {"duration_sec": 1.0, "tokenizer": str(tokenizer_path)}
    a = build_loader(DataConfig(train_manifest=str(tmp_path / "a.jsonl"), **cfg), mimi=mimi)
    b = build_loader(DataConfig(train_manifest=str(tmp_path / "b.jsonl"), **cfg), mimi=mimi)
    assert a.sampler.num_samples == b.sampler.num_samples
    with pytest.raises(DataError, match=r"manifest_sha256: saved \d+, now \d+.*b\.jsonl is not the manifest this run"):
        b.load_state_dict(a.state_dict())


def test_a_tokenizer_larger_than_text_card_or_not_sentencepiece(tmp_path, tokenizer_path, mimi) -> None:
    wav, duration = write_recording(tmp_path / "rec.wav", 2.0, seed=1)
    write_manifest(tmp_path / "m.jsonl", [(wav, duration)])
    cfg = {"train_manifest": str(tmp_path / "m.jsonl"), "duration_sec": 1.0}
    with pytest.raises(DataError, match=r"tok\.model: \d+ pieces, but the model's text vocabulary \(text_card\) has 8"):
        build_loader(DataConfig(tokenizer=str(tokenizer_path), text_card=8, **cfg), mimi=mimi)
    build_loader(DataConfig(tokenizer=str(tokenizer_path), text_card=96, **cfg), mimi=mimi)
    with pytest.raises(DataError, match=r"rec\.wav: not a SentencePiece model"):
        build_loader(DataConfig(tokenizer=str(wav), **cfg), mimi=mimi)


def test_pre_encoding_names_a_bad_file(tmp_path, mimi) -> None:
    audio = np.zeros((2, 24000), dtype=np.float32)
    audio[0, 10] = np.nan
    write_float_wav(tmp_path / "nan.wav", audio)
    (tmp_path / "nan.json").write_text('{"alignments": []}')
    write_manifest(tmp_path / "m.jsonl", [(tmp_path / "nan.wav", 1.0)])
    with pytest.raises(DataError, match=r"nan\.wav: 1 NaN or Inf samples"):
        pre_encode(tmp_path / "m.jsonl", tmp_path / "codes", model=mimi)
