import os

import pytest
import torch
from moshi_codes import random_codes as _random_codes

# moshi compiles some functions on first call otherwise (~14 s each on CPU); set before moshi is imported.
os.environ.setdefault("NO_TORCH_COMPILE", "1")


@pytest.fixture
def random_codes():
    """`random_codes(model, B, T, seed=0)`: seeded valid codes [B, K, T] for a moshi LMModel (tests/moshi_codes.py)."""
    return _random_codes


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny shapes only add synchronisation with a second intra-op thread, which is
    much slower on a shared, busy CPU. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
