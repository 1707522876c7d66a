"""Moshi TTT on CUDA in bf16: fp32 fast weights, streaming close to parallel (In-Place TTT under LMGen's CUDA
graphs: tests/integrations/test_inplace_streaming_sync.py)."""

from __future__ import annotations

import pytest
import torch
from moshi_codes import random_codes

from ttt_speech.integrations.moshi import MoshiTTTConfig, apply_ttt, build_lm, ttt_modules

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def seq_for(model, B: int, T: int) -> torch.Tensor:
    return random_codes(model, B, T).cuda()


@pytest.mark.parametrize("kind", ["inplace", "block"])
def test_bf16_cuda_streaming_matches_parallel_with_fp32_state(kind: str) -> None:
    model = build_lm(device="cuda", dtype=torch.bfloat16).eval()
    apply_ttt(model, MoshiTTTConfig(kind=kind, layers=[0, 2], chunk_size=4, ttt_mini_batch_size=4, ttt_num_heads=2))
    seq = seq_for(model, 2, 19)
    with torch.no_grad():
        full, _ = model.forward_text(seq)
        with model.streaming(2):
            stepped = torch.cat([model.forward_text(seq[:, :, t:t + 1])[0] for t in range(19)], dim=1)
            module = ttt_modules(model)[0]
            state = module._streaming_state
            tensors = [state.w, state.z_buf] if kind == "inplace" else list(state.ttt.params.values())
            assert all(t.dtype == torch.float32 and t.is_cuda for t in tensors)
    assert full.dtype == torch.bfloat16 and torch.isfinite(full).all()
    # bf16 activations: batched and one-frame matmuls round differently; fp32 runs agree to 1e-5 (CPU tests)
    torch.testing.assert_close(stepped.float(), full.float(), rtol=0.05, atol=0.05)
