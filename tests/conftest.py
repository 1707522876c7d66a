import os

import pytest
from moshi_codes import random_codes as _random_codes

# moshi compiles some functions on first call otherwise (~14 s each on CPU); set before moshi is imported.
os.environ.setdefault("NO_TORCH_COMPILE", "1")


@pytest.fixture
def random_codes():
    """`random_codes(model, B, T, seed=0)`: seeded valid codes [B, K, T] for a moshi LMModel (tests/moshi_codes.py)."""
    return _random_codes
