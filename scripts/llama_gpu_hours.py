"""GPU-hours of LLaMA-Omni TTT distillation per curriculum stage, computed from FLOPs (no GPU measured).

Model: Llama-3.1-8B (hidden 4096, 32 layers, 32 heads / 8 KV heads of 128, FFN 14336, vocab 128256), TTT-Linear
replacing attention in layers 24-31 (mini-batch 64), by default as `LlamaTTTConfig`'s defaults (the recall preset:
one head of 4096, q and k from one shared projection; `--ttt-heads 32 --no-share-qk` for ttt-lm-pytorch's layer).
Per training token:

- teacher forward (attention in every layer, no grad): 2 x matmul parameters + causal attention (2 x 2 x d x L/2
  per layer: QK^T and AV over L/2 keys on average);
- student forward: the same with 8 TTT layers (q (and k), v, o projections of d x d, plus the inner loop,
  ~6 D^2 + 4 b D per head of width D and token);
- student backward: only TTT parameters train, so it runs from the loss down to layer 24: activation gradients
  through lm_head and layers 24-31 (1x their forward) and weight gradients of the TTT projections (1x); with
  gradient checkpointing those 8 layers' forward once more.

GPU-hours = tokens x FLOPs per token / (peak x MFU). Prints a table and writes JSON.

    python scripts/llama_gpu_hours.py --tokens 2e9 1e9 5e8 5e8 --mfu 0.4 --out bench/llama_gpu_hours.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

D, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 4096, 32, 32, 8, 128, 14336, 128256
TTT_LAYERS, MINI_BATCH = 8, 64
H100_BF16_DENSE = 989e12  # FLOP/s, SXM


def flops_per_token(context: int, checkpointing: bool, ttt_heads: int = 1, share_qk: bool = True) -> dict[str, float]:
    attn_params = D * D * 2 + D * KV_HEADS * HEAD_DIM * 2  # q, o + k, v
    ttt_params = (3 if share_qk else 4) * D * D  # q (k from q's convs when shared), v, o
    mlp_params = 3 * D * FFN
    attention = 2 * 2 * D * context / 2  # per layer and token: QK^T and AV over L/2 keys (causal)
    width = D // ttt_heads
    inner = ttt_heads * (6 * width**2 + 4 * MINI_BATCH * width)  # TTT-Linear dual form, per layer and token
    lm_head = 2 * D * VOCAB
    attn_layer = 2 * (attn_params + mlp_params) + attention
    ttt_layer = 2 * (ttt_params + mlp_params) + inner
    teacher = LAYERS * attn_layer + lm_head
    student = (LAYERS - TTT_LAYERS) * attn_layer + TTT_LAYERS * ttt_layer + lm_head
    backward = lm_head + TTT_LAYERS * ttt_layer + TTT_LAYERS * (2 * ttt_params + 2 * inner)
    recompute = TTT_LAYERS * ttt_layer if checkpointing else 0
    return {"teacher_forward": teacher, "student_forward": student, "student_backward": backward,
            "recompute": recompute, "total": teacher + student + backward + recompute}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--tokens", type=float, nargs="+", default=[2e9, 1e9, 5e8, 5e8],
                   help="training tokens per stage (one per context)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed")
    p.add_argument("--peak", type=float, default=H100_BF16_DENSE, help="peak FLOP/s of one GPU (H100 SXM bf16)")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--ttt-heads", type=int, default=1, help="TTT heads (LlamaTTTConfig's default: 1)")
    p.add_argument("--no-share-qk", action="store_true", help="separate q and k projections (ttt-lm-pytorch)")
    p.add_argument("--out", default="bench/llama_gpu_hours.json")
    args = p.parse_args(argv)
    if len(args.tokens) != len(args.contexts):
        p.error(f"--tokens needs one value per context ({len(args.contexts)}), got {len(args.tokens)}")
    rows = []
    for context, tokens in zip(args.contexts, args.tokens, strict=True):
        f = flops_per_token(context, not args.no_checkpointing, args.ttt_heads, not args.no_share_qk)
        per_billion = 1e9 * f["total"] / (args.peak * args.mfu) / 3600
        rows.append({"context": context, "tokens": tokens, "gflop_per_token": f["total"] / 1e9,
                     **{f"gflop_{k}": v / 1e9 for k, v in f.items() if k != "total"},
                     "gpu_hours_per_1b_tokens": per_billion, "gpu_hours": per_billion * tokens / 1e9})
    result = {"computed_from": "FLOPs (no GPU measured)", "mfu": args.mfu, "peak_flops": args.peak,
              "gradient_checkpointing": not args.no_checkpointing, "ttt_heads": args.ttt_heads,
              "share_qk": not args.no_share_qk, "stages": rows,
              "total_gpu_hours": sum(r["gpu_hours"] for r in rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"computed from FLOPs, MFU {args.mfu:.0%} of {args.peak / 1e12:.0f} TFLOP/s")
    print("| stage context | GFLOP / token (teacher fwd + student fwd + bwd + recompute) | GPU-h / 1B tokens | "
          "tokens | GPU-h |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        parts = " + ".join(f"{r[f'gflop_{k}']:.1f}" for k in ("teacher_forward", "student_forward",
                                                               "student_backward", "recompute"))
        print(f"| {r['context']} | {r['gflop_per_token']:.1f} ({parts}) | {r['gpu_hours_per_1b_tokens']:.1f} | "
              f"{r['tokens']:.2g} | {r['gpu_hours']:.0f} |")
    print(f"total {result['total_gpu_hours']:.0f} GPU-hours; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
