#!/usr/bin/env python3
"""Benchmark: Moshi with In-Place TTT against plain gating.

Prefill throughput (frames/s of `LMModel.forward_text` over a whole sequence) and per-frame streaming latency
(one `forward_text` call per frame inside `model.streaming`), for a tiny and a mid-size config. The variants are
measured interleaved (each repeat, and each streamed frame, runs every variant in turn), and the prefill overhead is
the median of the per-repeat ratios to the base model. Prints a table and writes JSON. Random weights; timings
only. Variants: "none" (the base model), "inplace" (In-Place TTT, the product with the fast weight in float32) and,
in bf16, "inplace_split" (`split_product`: the base model's bf16 product plus the float32 delta's, the prefill fast
path). Overheads are against "none" of the same config.

    python scripts/bench_moshi_ttt.py [--out bench/moshi_ttt.json] [--device cpu|cuda] [--dtype fp32|bf16]
                                      [--variants none inplace inplace_split] [--threads N] [--clock wall|cpu]
                                      [--configs tiny mid 7b] [--lmgen [--no-cuda-graph]]

On a GPU, issue 16's targets: `--device cuda --dtype bf16 --configs mid 7b --lmgen` (per-frame latency under CUDA
graphs, at most 1.10x the base model's) and `--device cuda --dtype bf16 --configs mid` (prefill overhead of
inplace_split at most 10%).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

import ttt_speech  # noqa: E402
from ttt_speech.integrations.moshi import (  # noqa: E402
    MoshiTTTConfig,
    apply_ttt,
    build_lm,
    make_lm_gen,
    tiny_lm_kwargs,
)
from ttt_speech.integrations.moshi_lm import moshi_7b_lm_kwargs  # noqa: E402

CONFIGS = {
    "tiny": dict(lm=tiny_lm_kwargs(), frames=512, chunk=64, stream_frames=128),
    "mid": dict(lm=tiny_lm_kwargs(dim=512, num_heads=8, num_layers=12, context=750, depformer_dim=128,
                                  depformer_dim_feedforward=528), frames=1024, chunk=256, stream_frames=300),
    # Moshi 7B's shapes with random weights (about 16 GB in bf16): a GPU config, never a default
    "7b": dict(lm=moshi_7b_lm_kwargs(), frames=1024, chunk=512, stream_frames=200),
}
DEFAULT_CONFIGS = ["tiny", "mid"]


VARIANTS = {"none": None, "inplace": False, "inplace_split": True}  # variant -> MoshiTTTConfig.split_product
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prefill_times(models: dict, seq: torch.Tensor, device: str, repeats: int, clock) -> dict[str, list[float]]:
    """Seconds per whole-sequence `forward_text`, variants interleaved (order rotated each repeat), so that a change
    of load hits every variant alike."""
    times: dict[str, list[float]] = {v: [] for v in models}
    names = list(models)
    with torch.no_grad():
        for model in models.values():
            model.forward_text(seq)  # warm-up
        for r in range(repeats):
            for v in names[r % len(names):] + names[:r % len(names)]:
                sync(device)
                t0 = clock()
                models[v].forward_text(seq)
                sync(device)
                times[v].append(clock() - t0)
    return times


def stream_times_ms(models: dict, seq: torch.Tensor, device: str, clock) -> dict[str, list[float]]:
    """Milliseconds per streamed frame, every variant stepping the same frame in turn (rotated), the first 5
    frames dropped."""
    lat: dict[str, list[float]] = {v: [] for v in models}
    names = list(models)
    with contextlib.ExitStack() as stack, torch.no_grad():
        for model in models.values():
            stack.enter_context(model.streaming(seq.shape[0]))
        for t in range(seq.shape[-1]):
            for v in names[t % len(names):] + names[:t % len(names)]:
                sync(device)
                t0 = clock()
                models[v].forward_text(seq[:, :, t:t + 1])
                sync(device)
                lat[v].append((clock() - t0) * 1e3)
    return {v: x[5:] for v, x in lat.items()}


def lmgen_times_ms(models: dict, seq: torch.Tensor, device: str, clock) -> dict[str, list[float]]:
    """Milliseconds per `LMGen.step` (greedy; the user's audio codebooks of `seq` fed one frame at a time), the
    variants stepping in turn as in `stream_times_ms`. On CUDA moshi captures the step in a CUDA graph unless
    NO_CUDA_GRAPH is set (`--no-cuda-graph`); the first 5 frames (warm-up and capture) are dropped."""
    lat: dict[str, list[float]] = {v: [] for v in models}
    names = list(models)
    gens = {v: make_lm_gen(m, use_sampling=False) for v, m in models.items()}
    user = seq[:, next(iter(models.values())).dep_q + 1:]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for gen in gens.values():
            stack.enter_context(gen.streaming(seq.shape[0]))
        for t in range(seq.shape[-1]):
            for v in names[t % len(names):] + names[:t % len(names)]:
                sync(device)
                t0 = clock()
                gens[v].step(user[:, :, t:t + 1])
                sync(device)
                lat[v].append((clock() - t0) * 1e3)
    return {v: x[5:] for v, x in lat.items()}


def paired_overhead_pct(times: list[float], base: list[float]) -> dict:
    """Median and range of the per-repeat (or per-frame) ratios to the base model, as overhead percentages."""
    ratios = sorted(100 * (a / b - 1) for a, b in zip(times, base, strict=True))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/moshi_ttt.json"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                    help="default: none inplace, and inplace_split in bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared CPU; not for CUDA)")
    ap.add_argument("--lmgen", action="store_true",
                    help="stream through moshi's LMGen.step (CUDA graphs on CUDA) instead of forward_text")
    ap.add_argument("--no-cuda-graph", action="store_true", help="set NO_CUDA_GRAPH=1 (LMGen without graphs)")
    args = ap.parse_args()
    if args.no_cuda_graph:
        os.environ["NO_CUDA_GRAPH"] = "1"
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    variants = args.variants or ["none", "inplace"] + (["inplace_split"] if args.dtype == "bf16" else [])
    if "none" not in variants:
        ap.error("--variants needs none (the overheads are against it)")
    rows = []
    for name in args.configs:
        spec = CONFIGS[name]
        models = {}
        for variant in variants:
            model = build_lm(spec["lm"], seed=0, device=args.device, dtype=dtype).eval()
            if variant != "none":
                split = {"split_product": True} if VARIANTS[variant] else {}  # (runs on code without the knob)
                apply_ttt(model, MoshiTTTConfig(chunk_size=spec["chunk"], every=6, **split))
            models[variant] = model
        g = torch.Generator().manual_seed(0)
        seq = torch.randint(0, model.card, (1, model.num_codebooks, spec["frames"]), generator=g)
        seq[:, 0] = torch.randint(0, model.text_card, (1, spec["frames"]), generator=g)
        seq = seq.to(args.device)
        prefill = prefill_times(models, seq, args.device, args.repeats, clock)
        streamer = lmgen_times_ms if args.lmgen else stream_times_ms
        stream = streamer(models, seq[:, :, :spec["stream_frames"]], args.device, clock)
        for variant, model in models.items():
            lat = sorted(stream[variant])
            row = {"config": name, "ttt": variant, "dim": model.dim, "layers": len(model.transformer.layers),
                   "chunk": spec["chunk"] if variant != "none" else None, "prefill_frames": spec["frames"],
                   "prefill_fps": spec["frames"] / statistics.median(prefill[variant]),
                   "prefill_s": prefill[variant], "median_ms": statistics.median(lat),
                   "p99_ms": lat[int(0.99 * (len(lat) - 1))], "max_ms": lat[-1]}
            if variant != "none":
                row["prefill_overhead_pct"] = paired_overhead_pct(prefill[variant], prefill["none"])["median"]
                row["prefill_overhead_range_pct"] = paired_overhead_pct(prefill[variant], prefill["none"])
                row["stream_overhead_pct"] = 100 * (row["median_ms"] / statistics.median(stream["none"]) - 1)
                row["stream_overhead_paired_pct"] = paired_overhead_pct(stream[variant], stream["none"])
            rows.append(row)
    header = f"{'config':<6} {'ttt':<13} {'dim':>4} {'L':>3} {'chunk':>5} {'prefill f/s':>12} {'overhead':>9} " \
             f"{'stream ms (med/p99/max)':>24} {'overhead':>9}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(ttt_speech.__file__).parent).stdout.strip() or None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"device {args.device} dtype {args.dtype} torch {torch.__version__} threads {torch.get_num_threads()} "
          f"clock {args.clock} commit {commit} load {load} streaming {'LMGen.step' if args.lmgen else 'forward_text'}")
    print(header)
    for r in rows:
        ov = f"{r.get('prefill_overhead_pct', 0):+.1f}%" if r["ttt"] != "none" else ""
        so = f"{r.get('stream_overhead_pct', 0):+.1f}%" if r["ttt"] != "none" else ""
        print(f"{r['config']:<6} {r['ttt']:<13} {r['dim']:>4} {r['layers']:>3} {r['chunk'] or '':>5} "
              f"{r['prefill_fps']:>12.0f} {ov:>9} "
              f"{r['median_ms']:>8.2f}/{r['p99_ms']:>6.2f}/{r['max_ms']:>7.2f} {so:>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "machine": platform.machine(),
                                    "clock": args.clock, "commit": commit, "load_avg_1min": load,
                                    "repeats": args.repeats,
                                    "streaming": "LMGen.step" if args.lmgen else "forward_text",
                                    "cuda_graph": args.lmgen and args.device == "cuda"
                                    and os.environ.get("NO_CUDA_GRAPH", "") in ("", "0"),
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
