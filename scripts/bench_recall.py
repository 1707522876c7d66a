#!/usr/bin/env python3
"""Long-range recall: can the model carry information past its attention window?

A tiny Moshi-shaped model (real `LMModel`, attention context `--context` frames) is trained on sequences whose
later part repeats a random earlier segment from further back than the context:

    [ segment S (L frames) | random filler (gap frames, gap > context) | S again | random filler ]

The text stream carries random tokens from a small vocabulary; the model has 2 + 2 audio codebooks (its own generated
by the depformer, as Moshi's 8 + 8 are), each repeating the text token shifted by k, so they carry no extra
information. A model that remembers S predicts the second
copy; one that cannot see it can only guess (NLL ln(vocab)). Reported: the text NLL on the repeated segment
(positions 1.. of the copy: its first token announces the copy and cannot be predicted) and on the filler, for

- window: the base model with attention context `--context` (cannot see S from the copy);
- full: the same model with unlimited attention (the oracle);
- inplace: window + In-Place TTT (W_down fast weights, per-chunk updates);
- block: window + the gated TTT-Linear block.

Everything is seeded; each variant trains from the same initialisation and data order. Prints a table and writes
JSON and a plot. A script, not a test.

    python scripts/bench_recall.py [--steps 300] [--out bench/recall]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

from ttt_speech.eval.nll import frame_nll  # noqa: E402
from ttt_speech.integrations.moshi import MoshiTTTConfig, apply_ttt, build_lm, tiny_lm_kwargs  # noqa: E402
from ttt_speech.train.loss import moshi_loss  # noqa: E402


def make_batch(g: torch.Generator, batch: int, seg: int, gap: int, tail: int, vocab: int, card: int,
               n_q: int) -> tuple[torch.Tensor, slice, slice]:
    """codes [B, 1 + n_q, T]; the slices of the copy (scored part) and of the filler after S."""
    T = seg + gap + seg + tail
    text = torch.randint(4, 4 + vocab, (batch, T), generator=g)  # avoid moshi's special text ids 0..3
    text[:, seg + gap:2 * seg + gap] = text[:, :seg]
    audio = (text[:, None, :] + torch.arange(n_q).view(1, -1, 1)) % card
    codes = torch.cat([text[:, None], audio], dim=1)
    return codes, slice(seg + gap + 1, 2 * seg + gap), slice(seg, seg + gap)


def variant_model(name: str, args) -> torch.nn.Module:
    # Moshi-shaped (text + delayed audio codebooks, depformer), 2 + 2 codebooks instead of 8 + 8 for the CPU budget
    kwargs = tiny_lm_kwargs(dim=args.dim, num_heads=4, num_layers=args.layers, context=args.context,
                            text_card=4 + args.vocab, card=4 + args.vocab + 4, n_q=4, dep_q=2, delays=[0, 0, 1, 0, 1],
                            depformer_num_layers=1)
    if name == "full":
        kwargs["context"] = None
    model = build_lm(kwargs, seed=args.seed)
    if name == "inplace":
        apply_ttt(model, MoshiTTTConfig(kind="inplace", layers=args.ttt_layers, chunk_size=args.chunk,
                                        lr=args.inplace_lr, conv=args.inplace_conv,
                                        conv_kernel=args.inplace_kernel))
    elif name == "block":
        apply_ttt(model, MoshiTTTConfig(kind="block", layers=args.ttt_layers, ttt_mini_batch_size=args.chunk,
                                        ttt_num_heads=4, ttt_base_lr=args.block_base_lr,
                                        gate_init=args.block_gate_init))
    return model


def run_variant(name: str, args) -> dict:
    torch.manual_seed(args.seed)
    model = variant_model(name, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 30)
        codes, _, _ = make_batch(g, args.batch, args.seg, args.gap, args.tail, args.vocab, model.card, model.n_q)
        out = model(codes)
        loss, _ = moshi_loss(out, codes, text_padding_id=3, first_codebook_weight_multiplier=1.0,
                             text_padding_weight=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    model.eval()
    ge = torch.Generator().manual_seed(10_000 + args.seed)
    copy_nll, filler_nll = [], []
    for _ in range(args.eval_batches):
        codes, copy, filler = make_batch(ge, args.batch, args.seg, args.gap, args.tail, args.vocab, model.card,
                                         model.n_q)
        nll = frame_nll(model, codes, mode="parallel")[:, 0]  # text stream, [B, T]
        copy_nll.append(nll[:, copy].mean().item())
        filler_nll.append(nll[:, filler].nanmean().item())
    tokens = args.steps * args.batch * (2 * args.seg + args.gap + args.tail)
    return {"variant": name, "copy_nll": sum(copy_nll) / len(copy_nll),
            "filler_nll": sum(filler_nll) / len(filler_nll), "train_tokens_per_stream": tokens,
            "train_seconds": train_s, "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "loss_curve": losses[:: max(1, len(losses) // 100)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/recall"))
    ap.add_argument("--variants", nargs="+", default=["window", "full", "inplace", "block"])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seg", type=int, default=24, help="frames of the segment S")
    ap.add_argument("--gap", type=int, default=96, help="frames between S and its copy (> context)")
    ap.add_argument("--tail", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ttt-layers", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--inplace-lr", type=float, default=1.0)
    ap.add_argument("--inplace-conv", default="next", choices=["next", "centred"])
    ap.add_argument("--inplace-kernel", type=int, default=2, help="1 with centred: a causal target (token t only)")
    ap.add_argument("--block-base-lr", type=float, default=1.0, help="the TTT block's ttt_base_lr")
    ap.add_argument("--block-gate-init", type=float, default=0.1, help="the TTT block's tanh gate alpha at init")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.gap <= args.context:
        ap.error("--gap must exceed --context, or the window model can see S")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = []
    for name in args.variants:
        r = run_variant(name, args)
        results.append(r)
        print(f"{name:<8} copy NLL {r['copy_nll']:.3f}  filler NLL {r['filler_nll']:.3f}  "
              f"({r['train_seconds']:.0f} s)", flush=True)
    chance = math.log(args.vocab)
    print(f"\nchance (uniform over {args.vocab} tokens): {chance:.3f} nats; context {args.context} frames, "
          f"S at 0..{args.seg - 1}, copy at {args.seg + args.gap}..; {args.steps} steps x {args.batch} sequences "
          f"of {2 * args.seg + args.gap + args.tail} frames; seed {args.seed}")
    print(f"{'variant':<8} {'copy NLL':>9} {'filler NLL':>11} {'train s':>8}")
    for r in results:
        print(f"{r['variant']:<8} {r['copy_nll']:>9.3f} {r['filler_nll']:>11.3f} {r['train_seconds']:>8.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recall.json").write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                               for k, v in vars(args).items()},
                                                      "chance_nll": chance, "results": results}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["variant"] for r in results]
    a.bar(names, [r["copy_nll"] for r in results], label="copy of S (recall)")
    a.plot(names, [r["filler_nll"] for r in results], "k.", label="random filler")
    a.axhline(chance, ls=":", color="gray", label="chance")
    a.set_ylabel("text NLL (nats)")
    a.legend(fontsize=8)
    a.set_title(f"recall {args.gap} frames back, context {args.context}")
    for r in results:
        b.plot(r["loss_curve"], label=r["variant"])
    b.set_title("training loss (sampled)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "recall.png", dpi=110)
    print(f"wrote {args.out / 'recall.json'} and {args.out / 'recall.png'}")


if __name__ == "__main__":
    main()
