"""`ttt-speech quickstart`: the patched Moshi on the embedded tiny config, in training and in streaming.

It checks that the installed moshi carries our hooks, installs In-Place TTT in two layers, runs the training-path
forward (`LMModel.forward`, with acoustic delays), checks that frame-by-frame streaming reproduces the parallel
forward, streams with `LMGen`, and prints what it did.
"""

from __future__ import annotations

import time

import torch

from ttt_speech.integrations import moshi as moshi_int


def run(batch_size: int = 2, frames: int = 48, seed: int = 0) -> dict:
    import moshi

    moshi_int.check_patched()
    model = moshi_int.build_lm(seed=seed)
    cfg = moshi_int.MoshiTTTConfig(kind="inplace", layers=[0, 2], chunk_size=8, lr=0.3)
    moshi_int.apply_ttt(model, cfg)
    with torch.no_grad():  # move the conv off its zero init so TTT visibly acts in this demo
        for m in moshi_int.ttt_modules(model).values():
            m.ttt_conv.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"moshi {moshi.__version__} from {moshi.__file__.removesuffix('/__init__.py')} (patched: 4 patches present)")
    print(f"tiny LMModel: {len(model.transformer.layers)} layers, dim {model.dim}, "
          f"attention context {model.context} frames, {n_params / 1e6:.2f}M parameters, seed {seed}")

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.card, (batch_size, model.num_codebooks, frames), generator=gen)
    codes[:, 0] = torch.randint(0, model.text_card, (batch_size, frames), generator=gen)
    t0 = time.perf_counter()
    out = model(codes)
    audio_nll = torch.nn.functional.cross_entropy(out.logits[out.mask].float(), codes[:, 1:1 + model.dep_q][out.mask])
    text_nll = torch.nn.functional.cross_entropy(out.text_logits[out.text_mask].float(), codes[:, :1][out.text_mask])
    t_fwd = time.perf_counter() - t0
    print(f"training forward: codes {list(codes.shape)} -> audio logits {list(out.logits.shape)}, text logits "
          f"{list(out.text_logits.shape)}; NLL text {text_nll.item():.3f} audio {audio_nll.item():.3f} "
          f"(random init: about ln(card)); {t_fwd * 1e3:.0f} ms")

    seq = torch.cat([model._get_initial_token().expand(batch_size, -1, -1), codes[:, :, :-1]], dim=2)
    with torch.no_grad():
        parallel, _ = model.forward_text(seq)
        with model.streaming(batch_size):
            stepped = torch.cat([model.forward_text(seq[:, :, t:t + 1])[0] for t in range(frames)], dim=1)
    diff = (parallel - stepped).abs().max().item()
    print(f"In-Place TTT in layers {cfg.layers}, chunk {cfg.chunk_size} frames, lr {cfg.lr}: frame-by-frame "
          f"streaming vs parallel forward, max |diff| {diff:.2e} (one semantics: <= 1e-5)")
    if diff > 1e-5:
        raise RuntimeError(f"streaming and parallel disagree by {diff:.2e}")

    lm_gen = moshi_int.make_lm_gen(model, temp=0.8, temp_text=0.7)
    user = codes[:, model.dep_q + 1:]
    produced = []
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad(), lm_gen.streaming(batch_size):
        for t in range(frames):
            tokens = lm_gen.step(user[:, :, t:t + 1])
            if tokens is not None:
                produced.append(tokens)
    t_stream = time.perf_counter() - t0
    out_codes = torch.cat(produced, dim=-1)
    print(f"streaming: LMGen, {batch_size} rows x {frames} frames, one frame per step -> "
          f"{list(out_codes.shape)} codes (first {frames - out_codes.shape[-1]} steps fill the acoustic delay); "
          f"{batch_size * frames / t_stream:.0f} frames/s")
    return {"text_nll": text_nll.item(), "audio_nll": audio_nll.item(), "stream_codes": list(out_codes.shape),
            "stream_vs_parallel": diff}
