"""Mimi (moshi's audio codec): building it through moshi's own loader, and encoding long audio.

`load_mimi(spec)` accepts either a local weights file (moshi's `tokenizer-e351c8d8-checkpoint125.safetensors`, or a
torch `{"model": state_dict}` package), loaded by `moshi.models.loaders.get_mimi`, or `"tiny-random"`: the same
architecture (SEANet, encoder/decoder transformers, split RVQ, 24 kHz in, 12.5 Hz out) with small dimensions and
seeded random weights, for tests and the CPU quickstart. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from moshi.models.compression import MimiModel
from moshi.models.loaders import _mimi_config, get_mimi
from moshi.utils.compile import no_cuda_graph

from ttt_speech.constants import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE  # noqa: F401  (FRAME_*: the old import path)
from ttt_speech.integrations.moshi import TINY_LM_KWARGS

TINY_RANDOM = "tiny-random"
# long audio is encoded in streaming chunks of this many frames (60 s), so memory does not grow with the file
ENCODE_CHUNK_FRAMES = 750


def tiny_mimi_config(card: int = TINY_LM_KWARGS["card"]) -> dict[str, Any]:
    """moshi's Mimi config (`loaders._mimi_config`) with small SEANet/transformer/quantizer dimensions.

    The hop (ratios 8*6*5*4 = 960 at 24 kHz, then a stride-2 learnt downsampling) is kept, so frames are 12.5 Hz
    exactly as with the real model. `card` is the codebook size; it defaults to the tiny LM's audio cardinality.
    """
    config = copy.deepcopy(_mimi_config)
    dim = 32
    config["seanet"].update(dimension=dim, n_filters=4)
    config["quantizer"].update(dimension=16, n_q=8, bins=card, input_dimension=dim, output_dimension=dim)
    config["transformer"].update(d_model=dim, num_heads=2, num_layers=1, context=64, dim_feedforward=64,
                                 input_dimension=dim, output_dimensions=[dim])
    return config


def load_mimi(spec: str | Path, device: str | torch.device = "cpu", num_codebooks: int = 8,
              seed: int = 0) -> MimiModel:
    """A Mimi model in eval mode on `device`, using `num_codebooks` codebooks.

    Args:
        spec: a local weights file for moshi's `get_mimi`, or "tiny-random".
        device: where the model lives.
        num_codebooks: active codebooks (Moshi uses 8 per stream).
        seed: initialisation seed of "tiny-random" (ignored for real weights).
    """
    if str(spec) == TINY_RANDOM:
        generator_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
        try:
            torch.manual_seed(seed)
            # tiny ops: one thread is faster, and immune to OpenMP stalls on a busy machine
            torch.set_num_threads(1)
            model = get_mimi(None, tiny_mimi_config(), device="cpu", num_codebooks=num_codebooks)
            _init_tiny_random(model)
        finally:
            torch.random.set_rng_state(generator_state)
            torch.set_num_threads(threads)
        return model.to(device)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"Mimi weights not found at {path}; give a local file (e.g. moshi's "
            f"tokenizer-e351c8d8-checkpoint125.safetensors) or {TINY_RANDOM!r}")
    return get_mimi(path, device=device, num_codebooks=num_codebooks)


@torch.no_grad()
def _init_tiny_random(model: MimiModel, calibration_sec: float = 2.0) -> None:
    """Make a freshly built Mimi's codes depend on its input.

    With moshi's default init every input collapses to nearly the same latent, and the codebooks are zero (they
    are learnt by k-means). Convolutions get variance-preserving weights and zero biases, then moshi's own
    training-mode quantizer initialises one RVQ level per call by k-means on seeded calibration noise with
    random loudness envelopes, as it does during Mimi's training.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            weight = module.weight  # Conv1d: [out, in, k]; ConvTranspose1d: [in, out, k]
            fan_in = weight.shape[1 if isinstance(module, torch.nn.Conv1d) else 0] * weight.shape[2]
            torch.nn.init.normal_(weight, std=1.5 / math.sqrt(fan_in))
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    levels = model.quantizer.total_codebooks
    envelope = torch.rand(2 * levels, int(calibration_sec * 25)).repeat_interleave(SAMPLE_RATE // 25, dim=-1)
    noise = 0.1 * envelope * torch.randn_like(envelope)  # loudness changes every 40 ms
    latent = model._encode_to_unquantized_latent(noise[:, None])  # [2 * levels, D, F]
    model.quantizer.train()
    for batch in latent.chunk(levels):  # each call initialises the next level, from a batch of its own
        model.quantizer(batch, model.frame_rate)
    model.quantizer.eval()
    for module in model.quantizer.modules():
        if hasattr(module, "_embedding"):
            module._embedding = None  # cached centroids, recomputed from the EMA buffers on next use


@torch.no_grad()
def encode(mimi: MimiModel, wav: torch.Tensor, chunk_frames: int = ENCODE_CHUNK_FRAMES) -> torch.Tensor:
    """Mimi codes of whole recordings, encoded in streaming chunks.

    The result depends only on the audio and `chunk_frames` (not on how long the file is), so codes encoded once
    and sliced later equal codes encoded now.

    Args:
        wav: float audio at 24 kHz of shape [B, S]; it is zero-padded to a whole number of frames.
        chunk_frames: frames per streaming step.

    Returns:
        codes of shape [B, K, ceil(S / 1920)], on the CPU, dtype long.
    """
    if wav.dim() != 2:
        raise ValueError(f"wav must be [B, S], got {list(wav.shape)}")
    batch, length = wav.shape
    num_frames = math.ceil(length / mimi.frame_size)
    device = next(mimi.parameters()).device
    x = torch.nn.functional.pad(wav.float(), (0, num_frames * mimi.frame_size - length))[:, None].to(device)
    chunk = chunk_frames * mimi.frame_size
    codes = []
    # no CUDA graphs: the last chunk is shorter, and a graph per 60 s chunk shape would only cost memory
    with no_cuda_graph(), mimi.streaming(batch):
        for start in range(0, x.shape[-1], chunk):
            codes.append(mimi.encode(x[..., start:start + chunk]).cpu())
    return torch.cat(codes, dim=-1).long() if codes else torch.zeros(batch, mimi.num_codebooks, 0, dtype=torch.long)
