import pytest


@pytest.fixture(autouse=True)
def _one_thread_in_eval_tests(one_thread):
    """Every eval test on one torch thread (tests/conftest.py)."""
    yield
