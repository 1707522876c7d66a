"""Teacher-forced per-frame NLL of a Moshi LMModel, per stream, in the parallel forward or in streaming.

Positions are those of the codes (moshi undelays its logits), so frame t's NLL is that of predicting codes[:, k, t]
for every stream k, whatever its acoustic delay. Invalid positions (the first frames of delayed streams, whose
context does not exist yet, and zero tokens) are NaN.

- parallel: `LMModel.forward` in one call (the training path);
- streaming: the main transformer runs under `model.streaming(B)` in pieces of `step` frames, through the ring
  KV cache and the TTT streaming state (as `LMGen` runs it); the text head and the depformer, which have no state
  across frames, then run on the collected outputs as `LMModel.forward` does. Both modes give the same NLL where
  the attention context covers the sequence, and frame by frame (`step` 1) for any length. A `step` above 1 on a
  sequence longer than a layer's context is refused: moshi's ring KV cache holds exactly `context` keys, so the
  first frames of a multi-frame call would lose keys that frame-by-frame streaming and the parallel forward keep.
"""

from __future__ import annotations

import torch

from ttt_speech.errors import ConfigError
from ttt_speech.integrations.moshi_lm import delay_codes, undelay_logits

STREAMS = ["text"] + [f"audio{k}" for k in range(8)]


def _nll(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, K, T, V], [B, K, T], [B, K, T] -> [B, K, T] float32, NaN where not mask."""
    logp = torch.log_softmax(torch.where(mask[..., None], logits.float(), 0.0), dim=-1)
    nll = -logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
    return torch.where(mask, nll, torch.nan)


@torch.no_grad()
def frame_nll(model, codes: torch.Tensor, mode: str = "streaming", step: int = 1,
              depformer_window: int = 512) -> torch.Tensor:
    """NLL of shape [B, 1 + dep_q, T] (text, then Moshi's audio codebooks) for codes of shape [B, K, T].

    Args:
        mode: "parallel" or "streaming".
        step: frames per streaming call (1 = frame by frame, as LMGen).
        depformer_window: frames per depformer call (bounds the memory of the [B, dep_q, T, card] logits).
    """
    B, K, T = codes.shape
    if K != model.num_codebooks:
        raise ValueError(f"codes must be [B, {model.num_codebooks}, T], got {list(codes.shape)}")
    if mode == "parallel":
        out = model(codes)
        audio = _nll(out.logits, codes[:, model.audio_offset:model.audio_offset + model.dep_q], out.mask)
        return torch.cat([_nll(out.text_logits, codes[:, :1], out.text_mask), audio], dim=1)
    if mode != "streaming":
        raise ValueError(f"mode must be 'parallel' or 'streaming', got {mode!r}")
    contexts = [layer.self_attn.context for layer in model.transformer.layers if layer.self_attn.context is not None]
    if step > 1 and contexts and T > min(contexts):
        raise ConfigError(
            f"streaming step {step} on {T} frames: the attention context is {min(contexts)} frames, and moshi's ring "
            f"KV cache holds exactly that many keys, so a multi-frame call would drop keys its first frames need; "
            f"use step 1 (as LMGen) or mode 'parallel' (equal NLL)")
    initial = model._get_initial_token().expand(B, -1, -1)
    delayed = torch.cat([initial, delay_codes(model.delays, codes, initial)], dim=2)
    outs = []
    with model.streaming(B):
        for t in range(0, T, step):
            out, _ = model.forward_text(delayed[:, :, t:min(t + step, T)])
            outs.append(out)
    transformer_out = torch.cat(outs, dim=1)  # [B, T, D]
    text_logits = model.text_linear(transformer_out)[:, None]
    audio_logits = torch.cat([
        model.forward_depformer_training(delayed[:, :, 1 + t:1 + min(t + depformer_window, T)],
                                         transformer_out[:, t:t + depformer_window])
        for t in range(0, T, depformer_window)], dim=2)
    audio_logits, audio_mask = undelay_logits(model.delays[model.audio_offset:model.audio_offset + model.dep_q],
                                              audio_logits)
    audio_mask &= codes[:, model.audio_offset:model.audio_offset + model.dep_q] != model.zero_token_id
    text_logits, text_mask = undelay_logits(model.delays[:1], text_logits)
    text_mask &= codes[:, :1] != model.zero_token_id
    audio = _nll(audio_logits, codes[:, model.audio_offset:model.audio_offset + model.dep_q], audio_mask)
    return torch.cat([_nll(text_logits, codes[:, :1], text_mask), audio], dim=1)
