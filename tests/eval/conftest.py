from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


@pytest.fixture(autouse=True)
def _one_thread_in_eval_tests(one_thread):
    """Every eval test on one torch thread (tests/conftest.py)."""
    yield


@pytest.fixture
def tokenizer() -> Path:
    """The sample set's SentencePiece model (`make samples`)."""
    path = SAMPLES / "tokenizer.model"
    if not path.is_file():
        pytest.fail(f"sample set missing at {SAMPLES}: run `make samples`", pytrace=False)
    return path
