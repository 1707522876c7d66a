"""Benchmark the TTT ops: dual form (chunk_*) against primal form (recurrent_*).

Prints a table and writes JSON (``--out``, default bench/ttt_ops.json): tokens/s of the forward (no grad) and of
forward + backward, the bytes autograd saves for the backward (all devices), and the peak allocated memory (CUDA).

    PYTHONPATH=overlay python scripts/bench_ttt.py --quick                      # CPU, a minute or two
    PYTHONPATH=overlay python scripts/bench_ttt.py --device cuda --dtype bf16   # GPU

Targets from the issue: dual >= 5x primal on CPU at b=16; >= 1.5x on GPU at 64 heads, head_dim 128, b=16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "overlay"))

from ttt_speech.ops.ttt import chunk_ttt_linear, chunk_ttt_mlp, recurrent_ttt_linear, recurrent_ttt_mlp  # noqa: E402

OPS = {
    ("linear", "dual"): chunk_ttt_linear,
    ("linear", "primal"): recurrent_ttt_linear,
    ("mlp", "dual"): chunk_ttt_mlp,
    ("mlp", "primal"): recurrent_ttt_mlp,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_args(inner, B, T, H, D, b, device, dtype, grad):
    """Inputs as a TTT layer feeds them: q/k/v in the model dtype, eta/token_idx/state in fp32."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rn(*shape, std=1.0, dt=torch.float32):
        return (std * torch.randn(*shape, generator=g)).to(device=device, dtype=dt).requires_grad_(grad)

    F = 4 * D
    shapes = [(H, D, D), (H, 1, D)] if inner == "linear" else [(H, D, F), (H, 1, F), (H, F, D), (H, 1, D)]
    w0 = [rn(*s, std=0.02) for s in shapes]
    args = dict(
        q=rn(B, T, H, D, dt=dtype),
        k=rn(B, T, H, D, dt=dtype),
        v=rn(B, T, H, D, dt=dtype),
        eta=(torch.rand(B, T, H, generator=g) / D).to(device).requires_grad_(grad),
        token_idx=(1.0 / torch.arange(1, b + 1)).to(device).requires_grad_(grad),
        ln_weight=torch.ones(H, D, device=device, requires_grad=grad),
        ln_bias=torch.zeros(H, D, device=device, requires_grad=grad),
    )
    return args, w0


def run_once(fn, inner, B, T, H, D, b, device, dtype, backward):
    args, w0 = make_args(inner, B, T, H, D, b, device, dtype, backward)
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    sync(device)
    start = time.perf_counter()
    if backward:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            params = [w.unsqueeze(0).expand(B, *w.shape).clone() for w in w0]
            o, params, _ = fn(**args, params=params)
        (o.float().square().mean() + sum(p.sum() for p in params)).backward()
    else:
        with torch.no_grad():
            params = [w.unsqueeze(0).expand(B, *w.shape).clone() for w in w0]
            fn(**args, params=params)
    sync(device)
    return time.perf_counter() - start, sum(saved.values())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, inner, B, T, H, D, b, device, dtype, backward, warmup, reps):
    for _ in range(warmup):
        run_once(fn, inner, B, T, H, D, b, device, dtype, backward)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times, saved = [], 0
    for _ in range(reps):
        t, saved = run_once(fn, inner, B, T, H, D, b, device, dtype, backward)
        times.append(t)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return B * T / statistics.median(times), saved / 2**20, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--quick", action="store_true", help="small CPU-sized sweep")
    p.add_argument("--inner", nargs="+", choices=["linear", "mlp"], default=None)
    p.add_argument("--modes", nargs="+", choices=["dual", "primal"], default=["dual", "primal"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--mini-batches", nargs="+", type=int, default=[16, 64])
    p.add_argument("--seq-lens", nargs="+", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gate", action="store_true", help="add the production row: 64 heads, head_dim 128, b=16")
    p.add_argument("--out", default="bench/ttt_ops.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype]
    inner = a.inner or (["linear"] if a.quick else ["linear", "mlp"])
    seq_lens = a.seq_lens or ([128, 512] if a.quick else [1024, 4096])
    heads = a.heads or (4 if a.quick else 16)

    cases = [(i, D, b, T, heads) for i in inner for D in a.head_dims for b in a.mini_batches for T in seq_lens]
    if a.gate:
        cases.append(("linear", 128, 16, seq_lens[-1], 64))
    rows = []
    header = (
        f"{'inner':6} {'mode':6} {'D':>4} {'b':>3} {'T':>6} {'H':>3} "
        f"{'fwd tok/s':>11} {'f+b tok/s':>11} {'saved MiB':>10} {'peak MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for i, D, b, T, H in cases:
        for mode in a.modes:
            fn = OPS[(i, mode)]
            fwd, _, peak_f = measure(fn, i, a.batch, T, H, D, b, device, dtype, False, a.warmup, a.reps)
            fb, saved, peak_fb = measure(fn, i, a.batch, T, H, D, b, device, dtype, True, a.warmup, a.reps)
            row = dict(
                inner=i,
                mode=mode,
                head_dim=D,
                mini_batch=b,
                seq_len=T,
                heads=H,
                batch=a.batch,
                fwd_tok_s=fwd,
                fwd_bwd_tok_s=fb,
                saved_for_backward_mib=saved,
                peak_fwd_mib=peak_f,
                peak_fwd_bwd_mib=peak_fb,
            )
            rows.append(row)
            peak = "-" if peak_fb is None else f"{peak_fb:9.1f}"
            print(
                f"{i:6} {mode:6} {D:4d} {b:3d} {T:6d} {H:3d} {fwd:11.0f} {fb:11.0f} {saved:10.1f} {peak:>9}", flush=True
            )

    speedups = []
    for i, D, b, T, H in cases:
        sel = {
            r["mode"]: r
            for r in rows
            if (r["inner"], r["head_dim"], r["mini_batch"], r["seq_len"], r["heads"]) == (i, D, b, T, H)
        }
        if "dual" in sel and "primal" in sel:
            speedups.append(
                dict(
                    inner=i,
                    head_dim=D,
                    mini_batch=b,
                    seq_len=T,
                    heads=H,
                    fwd=sel["dual"]["fwd_tok_s"] / sel["primal"]["fwd_tok_s"],
                    fwd_bwd=sel["dual"]["fwd_bwd_tok_s"] / sel["primal"]["fwd_bwd_tok_s"],
                )
            )
    if speedups:
        print(f"\n{'dual / primal':14} {'D':>4} {'b':>3} {'T':>6} {'H':>3} {'fwd':>7} {'f+b':>7}")
        for s in speedups:
            shape = f"{s['head_dim']:4d} {s['mini_batch']:3d} {s['seq_len']:6d} {s['heads']:3d}"
            print(f"{s['inner']:14} {shape} {s['fwd']:6.1f}x {s['fwd_bwd']:6.1f}x")

    meta = dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        dtype=a.dtype,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        args=vars(a),
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=rows, speedup=speedups), indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
