"""Benchmark the TTT ops (dual form against primal form), or our layers against ttt-lm-pytorch's.

Default: the ops. Prints a table and writes JSON (``--out``, default bench/ttt_ops.json): tokens/s of the forward
(no grad) and of forward + backward, the bytes autograd saves for the backward (all devices), and the peak allocated
memory (CUDA).

    PYTHONPATH=overlay python scripts/bench_ttt.py --quick                      # CPU, a minute or two
    PYTHONPATH=overlay python scripts/bench_ttt.py --device cuda --dtype bf16   # GPU

``--reference PATH``: PATH is a copy of ttt-lm-pytorch's ``ttt.py`` (it needs ``transformers``). Its ``TTTLinear`` /
``TTTMLP`` and ours are built with the same weights (its state_dict loads into ours with ``strict=True``) and timed
side by side on the issue's six shapes (B=1, T=1024, 8 heads; Linear/MLP; head_dim 64/128; mini-batch 16/64),
forward (no grad) and forward + backward, in interleaved repeats so that machine load hits both alike. Prints the
medians and the ratio reference / ours (> 1: ours is faster) and writes JSON (default bench/ttt_vs_reference.json).

    PYTHONPATH=overlay python scripts/bench_ttt.py --reference /tmp/ref/ttt.py --threads 2
    PYTHONPATH=overlay python scripts/bench_ttt.py --reference /tmp/ref/ttt.py --threads 1 --clock cpu

``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine shared with other jobs it
does not count the time they hold the cores (on one thread it is the steadier measure; with more threads it also
counts threads spinning at a barrier). The JSON is rewritten after every row (``complete: false`` until the end).

Targets from the issue: dual >= 5x primal on CPU at b=16; >= 1.5x on GPU at 64 heads, head_dim 128, b=16; ours
>= 1.5x the reference on CPU on all six shapes, forward and forward + backward.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "overlay"))

from ttt_speech.nn.ttt import TTTConfig, build_ttt_layer  # noqa: E402
from ttt_speech.ops.ttt import chunk_ttt_linear, chunk_ttt_mlp, recurrent_ttt_linear, recurrent_ttt_mlp  # noqa: E402

OPS = {
    ("linear", "dual"): chunk_ttt_linear,
    ("linear", "primal"): recurrent_ttt_linear,
    ("mlp", "dual"): chunk_ttt_mlp,
    ("mlp", "primal"): recurrent_ttt_mlp,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (inner, head_dim, mini_batch) of the comparison with ttt-lm-pytorch
REFERENCE_SHAPES = [("linear", 64, 16), ("linear", 64, 64), ("linear", 128, 16), ("mlp", 64, 16), ("mlp", 64, 64),
                    ("mlp", 128, 16)]


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

def load_reference(path):
    """Import ttt-lm-pytorch's ``ttt.py`` from ``path`` (a user's copy; never part of this repository)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--reference {path}: no such file (expected a copy of ttt-lm-pytorch's ttt.py)")
    spec = importlib.util.spec_from_file_location("ttt_lm_pytorch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("TTTConfig", "TTTLinear", "TTTMLP"):
        if not hasattr(module, name):
            raise SystemExit(f"--reference {path}: has no {name}; is it ttt-lm-pytorch's ttt.py?")
    return module


def build_pair(ref, inner, H, D, b, seed):
    """The reference layer and ours with the same weights (the reference's state_dict, ``strict=True``)."""
    torch.manual_seed(seed)
    C = H * D
    cfg = ref.TTTConfig(hidden_size=C, num_attention_heads=H, ttt_layer_type=inner, mini_batch_size=b)
    theirs = (ref.TTTLinear if inner == "linear" else ref.TTTMLP)(cfg, layer_idx=0)
    ours = build_ttt_layer(TTTConfig(hidden_size=C, num_heads=H, layer_type=inner, mini_batch_size=b))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def reference_call(theirs, ours, x, backward, clock="wall"):
    """``call(which)`` runs one layer once (forward, or forward + backward of ``mean(y^2)``) and returns seconds of
    ``clock``: ``wall``, or ``cpu`` (this process's CPU time: on a shared machine it does not count the time other
    processes hold the cores; with more than one thread it also counts threads spinning at a barrier)."""
    B, T, _ = x.shape
    pos = torch.arange(T).expand(B, T)
    now = CLOCKS[clock]

    def call(which):
        xi = x.detach().requires_grad_(backward)
        start = now()
        with torch.set_grad_enabled(backward):
            y = theirs(xi, position_ids=pos) if which == "theirs" else ours(xi)[0]
            if backward:
                y.square().mean().backward()
        return now() - start

    return call


def compare_reference(a, partial=None):
    """The side-by-side table; ``partial(rows)`` is called after every row (the JSON so far)."""
    ref = load_reference(a.reference)
    H, T, B = a.heads or 8, (a.seq_lens or [1024])[0], a.batch
    shapes = [s for s in REFERENCE_SHAPES if a.inner is None or s[0] in a.inner]
    if a.shapes:
        shapes = [(i, int(d), int(m)) for i, d, m in (s.split(":") for s in a.shapes)]
    load = os.getloadavg()
    print(
        f"ours vs ttt-lm-pytorch ({a.reference}): B={B} T={T} H={H}, fp32, {torch.get_num_threads()} threads, "
        f"{a.clock} clock, {a.warmup} warm-up + {a.reps} interleaved repeats; load average {load[0]:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    header = (
        f"{'inner':6} {'D':>4} {'b':>3} {'pass':8} {'theirs ms':>10} {'ours ms':>9} {'ratio':>7} {'paired':>7} "
        f"{'max|dy|':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for inner, D, b in shapes:
        theirs, ours = build_pair(ref, inner, H, D, b, seed=0)
        x = torch.randn(B, T, H * D, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (theirs(x, position_ids=torch.arange(T).expand(B, T)) - ours(x)[0]).abs().max().item()
        for backward in (False, True):
            call = reference_call(theirs, ours, x, backward, a.clock)
            for _ in range(a.warmup):
                call("theirs"), call("ours")
            t_theirs, t_ours = [], []
            for r in range(a.reps):
                # back to back, in alternating order: a change of machine load hits both alike
                got = {w: call(w) for w in (("theirs", "ours") if r % 2 == 0 else ("ours", "theirs"))}
                t_theirs.append(got["theirs"])
                t_ours.append(got["ours"])
            m_theirs, m_ours = statistics.median(t_theirs), statistics.median(t_ours)
            paired = statistics.median(t / o for t, o in zip(t_theirs, t_ours, strict=True))
            row = {
                "inner": inner, "head_dim": D, "mini_batch": b, "heads": H, "seq_len": T, "batch": B,
                "pass": "fwd+bwd" if backward else "fwd", "theirs_s": t_theirs, "ours_s": t_ours,
                "theirs_median_s": m_theirs, "ours_median_s": m_ours, "ratio": m_theirs / m_ours,
                "paired_ratio_median": paired, "max_abs_output_diff": diff, "clock": a.clock,
                "loadavg_1min": os.getloadavg()[0],
            }  # fmt: skip
            rows.append(row)
            print(
                f"{inner:6} {D:4d} {b:3d} {row['pass']:8} {1e3 * m_theirs:10.1f} {1e3 * m_ours:9.1f} "
                f"{m_theirs / m_ours:6.2f}x {paired:6.2f}x {diff:9.1e}",
                flush=True,
            )
            if partial is not None:
                partial(rows)
    load_end = os.getloadavg()
    worst = min(r["ratio"] for r in rows)
    print(
        f"\nratio = median(theirs) / median(ours); paired = median of the per-repeat ratios. Worst ratio "
        f"{worst:.2f}x (target >= 1.5x). Load average at the end {load_end[0]:.1f}."
    )
    return rows, {"loadavg_start": load, "loadavg_end": load_end}


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
    p.add_argument("--reps", type=int, default=None, help="timed repeats (default 3; 7 with --reference)")
    p.add_argument("--gate", action="store_true", help="add the production row: 64 heads, head_dim 128, b=16")
    p.add_argument("--reference", default=None, metavar="PATH", help="ttt-lm-pytorch's ttt.py: compare layers")
    p.add_argument("--shapes", nargs="+", default=None, metavar="INNER:D:b", help="--reference shapes (linear:64:16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="--reference timer: wall, or cpu (process CPU time; steadier on a shared machine)")
    p.add_argument("--out", default=None, help="JSON (default bench/ttt_ops.json, or bench/ttt_vs_reference.json)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.reference is not None:
        if a.device != "cpu" or a.dtype != "fp32":
            raise SystemExit("--reference runs on the CPU in fp32")
        a.reps = a.reps or 7
        out = a.out or "bench/ttt_vs_reference.json"
        rows, load = compare_reference(
            a, lambda rows: write_json(out, a, torch.device("cpu"), dict(results=rows, complete=False), quiet=True))
        write_json(out, a, torch.device("cpu"), dict(results=rows, complete=True, **load))
        return
    a.reps = a.reps or 3
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

    write_json(a.out or "bench/ttt_ops.json", a, device, dict(results=rows, speedup=speedups))


def write_json(path, a, device, payload, quiet=False):
    meta = dict(
        date=time.strftime("%Y-%m-%d"),
        device=str(device),
        device_name=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        dtype=a.dtype,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        # file arguments by name only: a path of this machine says nothing to a reader of the JSON
        args={k: Path(v).name if k in ("reference", "out") and v else v for k, v in vars(a).items()},
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, **payload), indent=2) + "\n")
    if not quiet:
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
