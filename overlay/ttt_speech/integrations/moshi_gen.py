"""Free-running generation with moshi's `LMGen`, from an optional teacher-forced prompt.

`LMGen` runs the model frame by frame, as Moshi does live: each step takes the user's audio codes of one frame and
samples the model's text token and its audio codebooks (through the depformer), with moshi's acoustic delays.
During the prompt, the model's own stream is forced to the prompt's tokens: the audio through LMGen's
`depformer_replace_tokens`, the text by overwriting the sampled token in `on_text_hook` (LMGen writes that very
tensor into its cache; `tests/eval/test_generate.py` checks the prompt comes back out unchanged). After the prompt
the model runs free: what it reads back is what it sampled. LMGen samples, at step t, the text and the undelayed
codebooks of frame t and a codebook with acoustic delay d of frame t - d; so the prompt covers frames < P of the
text and undelayed codebooks, and frames < P - d of a delayed one (the model samples the rest of the boundary
frames, conditioned on the prompt, as it would live).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from moshi.models.lm import LMModel
from moshi.utils.compile import no_cuda_graph

from ttt_speech.integrations.moshi import make_lm_gen


@dataclasses.dataclass
class Generation:
    """What `free_run` produced.

    Args:
        tokens: the model's stream, frame-aligned (delays undone), of shape [B, 1 + dep_q, T]: text, then audio.
        text_entropy: the entropy (nats) of the text logits at each frame (temperature 1), of shape [B, T].
        pad_ids: the text ids that mean "no word here" (moshi's padding and end-of-padding tokens).
    """

    tokens: torch.Tensor
    text_entropy: torch.Tensor
    pad_ids: tuple[int, ...]


def user_stream_frames(model: LMModel) -> int:
    """How many codebooks of the user's audio `LMGen.step` takes per frame."""
    return model.num_codebooks - model.dep_q - 1


@torch.no_grad()
def free_run(model: LMModel, user_codes: torch.Tensor, frames: int, prompt: torch.Tensor | None = None,
             seed: int = 0, progress: Callable[[int], None] | None = None, **sampling) -> Generation:
    """Generate `frames` frames with `LMGen`, the first `prompt.shape[-1]` of them forced to the prompt.

    Args:
        model: a moshi `LMModel` (with or without TTT); it is put in eval mode.
        user_codes: the user's audio codes of shape [B, n_user, T_user]; cycled when shorter than the generation.
        frames: frames to generate (prompt included).
        prompt: the model's own stream to force first, of shape [B, 1 + dep_q, P] (text, audio), P <= frames.
        seed: seeds torch's generator for the sampling (the global RNG state is restored afterwards).
        progress: called with 1 after every LMGen step.
        sampling: `LMGen` arguments (temp, temp_text, top_k, top_k_text, use_sampling).
    """
    B, n_user, T_user = user_codes.shape
    if n_user != user_stream_frames(model) or T_user < 1:
        raise ValueError(f"user_codes must be [B, {user_stream_frames(model)}, T >= 1], got {list(user_codes.shape)}")
    P = 0 if prompt is None else prompt.shape[-1]
    if prompt is not None and (prompt.shape[:2] != (B, 1 + model.dep_q) or P > frames):
        raise ValueError(f"prompt must be [{B}, {1 + model.dep_q}, P <= {frames}], got {list(prompt.shape)}")
    device = next(model.parameters()).device
    delays = list(model.delays[:1 + model.dep_q])
    max_delay = max(model.delays)
    text_entropy: list[torch.Tensor] = []
    step = [0]

    def on_text_logits(logits: torch.Tensor) -> None:  # [B, 1, 1, card]
        if step[0] < frames:
            logp = torch.log_softmax(logits[:, 0, 0].float(), dim=-1)
            text_entropy.append(-(logp.exp() * logp).sum(-1))

    def on_text(token: torch.Tensor) -> None:  # [B], the tensor LMGen then writes into its cache
        if step[0] < P:
            token.copy_(prompt[:, 0, step[0]])

    lm_gen = make_lm_gen(model, on_text_logits_hook=on_text_logits, on_text_hook=on_text, **sampling)
    outs = []
    devices = [device] if device.type == "cuda" else []
    # no CUDA graphs: In-Place TTT decides on the host when a chunk completes (and speed is not measured here)
    with torch.random.fork_rng(devices=devices), no_cuda_graph(), lm_gen.streaming(B):
        torch.manual_seed(seed)
        for t in range(frames + max_delay):
            step[0] = t
            user = user_codes[:, :, t % T_user:t % T_user + 1].to(device)
            forced = None
            if t < P:  # audio codebook k with delay d is written at step t for frame t - d
                forced = torch.stack([prompt[:, 1 + k, max(t - d, 0)] for k, d in enumerate(delays[1:])], dim=1)
                forced = forced[:, :, None].to(device)
            out = lm_gen.step(user, depformer_replace_tokens=forced)
            if out is not None:
                outs.append(out.cpu())
            if progress is not None:
                progress(1)
    tokens = torch.cat(outs, dim=2)[:, :, :frames]
    return Generation(tokens=tokens, text_entropy=torch.stack(text_entropy, dim=1).cpu(),
                      pad_ids=(model.text_padding_token_id, model.end_of_text_padding_id))
