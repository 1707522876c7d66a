"""Moshi: building models and checking that our patch series is in place.

The only module (with its siblings in `integrations/`) that imports moshi. The patch series in
`patches/moshi/` opens three doors that the TTT code here uses:

- `StreamingTransformerLayer.layer_idx`: each layer of a `StreamingTransformer` knows its index;
- `StreamingTransformerLayer.ttt_block`: a module slot between self-attention and the FFN (`None`);
- `token_embeddings`: `LMModel.forward_text` threads the text-token embeddings to the FFN gating of
  every main-transformer layer whose gating sets `takes_token_embeddings = True`.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from moshi.models.lm import LMGen, LMModel
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer

# Moshi 7B's LM architecture (moshi.models.loaders._lm_kwargs), scaled down to run in milliseconds on a CPU.
# Everything structural is kept: 8+8 audio codebooks plus text, acoustic delays, SiLU gating, RMSNorm,
# RoPE, a depformer with weights per step.
TINY_LM_KWARGS: dict[str, Any] = {
    "dim": 64,
    "text_card": 96,
    "existing_text_padding_id": 3,
    "n_q": 16,
    "dep_q": 8,
    "card": 48,
    "num_heads": 4,
    "num_layers": 4,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 32,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 32,
    "depformer_dim_feedforward": int(4.125 * 32),
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}


class PatchMissingError(RuntimeError):
    """The installed moshi lacks a hook of our series: `make apply-patches` was not run in this environment."""


def tiny_lm_kwargs(**overrides: Any) -> dict[str, Any]:
    """A copy of `TINY_LM_KWARGS` with `overrides` applied; unknown keys are refused."""
    unknown = set(overrides) - set(TINY_LM_KWARGS) - set(inspect.signature(LMModel.__init__).parameters)
    if unknown:
        raise ValueError(f"not LMModel arguments: {sorted(unknown)}")
    kwargs = copy.deepcopy(TINY_LM_KWARGS)
    kwargs.update(overrides)
    return kwargs


def build_lm(lm_kwargs: dict[str, Any] | None = None, *, seed: int = 0, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> LMModel:
    """A randomly initialised `LMModel` (tiny by default), built deterministically from `seed`."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LMModel(**(lm_kwargs or TINY_LM_KWARGS), device=device, dtype=dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def check_patched() -> None:
    """Raise `PatchMissingError` naming the missing hook if the imported moshi is not our patched checkout."""
    import moshi

    layer_params = inspect.signature(StreamingTransformerLayer.forward).parameters
    forward_text_src = inspect.getsource(LMModel.forward_text)
    init_src = inspect.getsource(StreamingTransformer.__init__)
    missing = []
    if "layer_idx" not in init_src:
        missing.append("0001 layer index (StreamingTransformer sets layer.layer_idx)")
    if "token_embeddings" not in layer_params or "token_embeddings=" not in forward_text_src:
        missing.append("0002 token_embeddings (LMModel.forward_text -> layer -> gating)")
    if "ttt_block" not in inspect.getsource(StreamingTransformerLayer.__init__):
        missing.append("0003 ttt_block slot (StreamingTransformerLayer.ttt_block)")
    if missing:
        raise PatchMissingError(
            f"moshi imported from {moshi.__file__} lacks our hooks: {'; '.join(missing)}. "
            "Run `make apply-patches` (it installs upstream/moshi editable into .venv).")


def make_lm_gen(model: LMModel, **kwargs: Any) -> LMGen:
    """An `LMGen` for streaming generation; `model` is switched to eval mode first, as LMGen requires."""
    model.eval()
    return LMGen(model, **kwargs)
