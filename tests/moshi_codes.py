"""The random Moshi codes the tests feed to a (tiny) LMModel: one helper, also the `random_codes` fixture
(tests/conftest.py). Import it as `from moshi_codes import random_codes` (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import torch


def random_codes(model, B: int, T: int, seed: int = 0) -> torch.Tensor:
    """LongTensor [B, K, T] from a generator seeded with `seed`: audio codes < `model.card`, the text row (0)
    < `model.text_card`."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.card, (B, model.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, model.text_card, (B, T), generator=g)
    return codes
