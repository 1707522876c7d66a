#!/usr/bin/env python3
"""Benchmark: one streamed frame of In-Place TTT's gating against the plain gating, at given layer shapes.

The per-frame cost of streaming is memory traffic over the [D, H] fast weight (the base gating reads its W_down once
per frame), so this times the gating module alone, batch 1, at Moshi-like shapes: a frame inside a chunk, the frame
that completes one, and as a unit the time of one float32 read of a [D, H] tensor (`sum`), so that a time reads as a
number of passes. Run it on older code with PYTHONPATH=<checkout>/overlay to compare. Prints a table, writes JSON.

    python scripts/bench_inplace_step.py [--shapes 512x2112 4096x11264] [--chunk 512] [--decay 0.9]
                                         [--frames 30] [--threads 1] [--out bench/inplace_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import ttt_speech  # noqa: E402
from ttt_speech.integrations.moshi_inplace import InPlaceTTTConfig, InPlaceTTTGating  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls (CPU time of this process; one thread)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def measure(D: int, H: int, chunk: int, decay: float | None, frames: int) -> dict:
    g = torch.Generator().manual_seed(0)
    linear_in, linear_out = nn.Linear(D, 2 * H, bias=False), nn.Linear(H, D, bias=False)
    with torch.no_grad():
        linear_in.weight.copy_(torch.randn(2 * H, D, generator=g) / D**0.5)
        linear_out.weight.copy_(torch.randn(D, H, generator=g) / H**0.5)
    gating = InPlaceTTTGating(linear_in, linear_out, nn.functional.silu,
                              InPlaceTTTConfig(chunk_size=chunk, target="layer_input", decay=decay)).eval()
    x = torch.randn(1, 1, D, generator=g)

    def base_frame():
        h = linear_in(x).view(1, 1, 2, H)
        return linear_out(nn.functional.silu(h[..., 0, :]) * h[..., 1, :])

    w = linear_out.weight.detach().float().clone()
    row = {"D": D, "H": H, "chunk": chunk, "decay": decay, "pass_mb": w.numel() * 4 / 2**20}
    with torch.no_grad():
        row["pass_ms"] = 1e3 * timed(lambda: w.sum(), frames)
        row["base_ms"] = 1e3 * timed(base_frame, frames)
        with gating.streaming(1):
            state = gating._streaming_state
            gating(x)  # warm-up
            state.pos.fill_(1)
            row["ttt_ms"] = 1e3 * timed(lambda: (state.pos.fill_(1), gating(x)), frames)  # inside a chunk

            def completing():
                state.pos.fill_(chunk - 1)
                gating(x)

            row["ttt_completing_ms"] = 1e3 * timed(completing, max(3, frames // 5))
    row["ttt_over_base"] = row["ttt_ms"] / row["base_ms"]
    row["extra_passes"] = (row["ttt_ms"] - row["base_ms"]) / row["pass_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["512x2112", "2048x5632", "4096x11264"], help="DxH")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--decay", type=float, default=None)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/inplace_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(*map(int, s.split("x")), args.chunk, args.decay, args.frames) for s in args.shapes]
    code = Path(ttt_speech.__file__).parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=code).stdout.strip() or None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"cpu fp32 torch {torch.__version__} threads {args.threads} commit {commit} load {load} "
          f"chunk {args.chunk} decay {args.decay}; process CPU time, median of {args.frames}")
    print(f"{'D':>5} {'H':>6} {'pass MB':>8} {'pass ms':>8} {'base ms':>8} {'ttt ms':>8} {'ttt/base':>9} "
          f"{'extra passes':>13} {'completing ms':>14}")
    for r in rows:
        print(f"{r['D']:>5} {r['H']:>6} {r['pass_mb']:>8.1f} {r['pass_ms']:>8.2f} {r['base_ms']:>8.2f} "
              f"{r['ttt_ms']:>8.2f} {r['ttt_over_base']:>9.2f} {r['extra_passes']:>13.1f} "
              f"{r['ttt_completing_ms']:>14.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": "cpu", "torch": torch.__version__, "threads": args.threads,
                                    "machine": platform.machine(), "commit": commit,
                                    "load_avg_1min": load, "clock": "cpu", "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
