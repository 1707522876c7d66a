"""Fixtures of the data tests: a tiny SentencePiece model, a shared tiny-random Mimi, a synthetic corpus."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from data_helpers import SAMPLES, TEXT, one_torch_thread, words_for, write_recording

from ttt_speech.data.manifest import MAIN_SPEAKER, write_manifest


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=model, vocab_size=40, hard_vocab_limit=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    path = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="session")
def mimi():
    from ttt_speech.integrations.mimi import load_mimi

    return load_mimi("tiny-random")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A manifest of 5 recordings: stereo and mono, 24 and 16 kHz, one shorter than a 2 s crop."""
    root = tmp_path_factory.mktemp("corpus")
    listing = [
        write_recording(root / "a" / "talk.wav", 5.3, seed=1, words=words_for(5.3, 1, (MAIN_SPEAKER, "OTHER"))),
        write_recording(root / "a" / "mono.wav", 4.1, channels=1, seed=2),
        write_recording(root / "b" / "low_rate.wav", 3.0, rate=16000, seed=3),
        write_recording(root / "b" / "short.wav", 1.3, seed=4),
        write_recording(root / "b" / "long.wav", 9.7, channels=1, seed=5),
    ]
    write_manifest(root / "train.jsonl", listing)
    return root / "train.jsonl"


@pytest.fixture
def samples() -> Path:
    """The generated sample set; `make test` builds it first."""
    if not (SAMPLES / "samples.json").is_file():
        pytest.fail(f"sample set missing at {SAMPLES}: run `make samples` "
                    "(or `python scripts/make_samples.py --out data/samples`)", pytrace=False)
    return SAMPLES


@pytest.fixture(scope="session")
def corpus_codes(corpus, mimi, tmp_path_factory) -> Path:
    """`corpus` pre-encoded with the tiny-random Mimi."""
    from ttt_speech.data.codes import pre_encode

    codes_dir = tmp_path_factory.mktemp("codes")
    with one_torch_thread():
        pre_encode(corpus, codes_dir, model=mimi)
    return codes_dir


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield
