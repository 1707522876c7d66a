"""Time one TTT-Linear/MLP decode step (T = 1), as streaming runs it: eager, and on CUDA also replayed from a
captured CUDA graph.

Prints a table and writes JSON (``--out``, default bench/ttt_decode.json): the median time of a step over whole
mini-batches (so commit and non-commit positions both count), for the functional step (``y, state = layer(x,
state)``) and for the step plus the in-place write of the new state that the Moshi block does
(``state.copy_(new, exec_mask)``; only where ``TTTState.copy_`` exists). With ``--device cuda``, also the step
captured in a CUDA graph and replayed.

    PYTHONPATH=overlay python scripts/bench_ttt_decode.py --threads 1 --clock cpu     # CPU, ~1 minute
    PYTHONPATH=overlay python scripts/bench_ttt_decode.py --device cuda               # GPU: eager vs graph

The script imports the ``overlay/`` beside it, so a copy of it in an older checkout times that checkout's step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "overlay"))

from ttt_speech.nn.ttt import TTTConfig, TTTState, build_ttt_layer  # noqa: E402

# (name, layer_type, hidden size, heads, mini-batch, preset)
SHAPES = [
    ("linear C64 H1 recall", "linear", 64, 1, 16, "recall"),  # the tiny Moshi's block (default preset)
    ("mlp C64 H1 recall", "mlp", 64, 1, 16, "recall"),
    ("linear C512 H1 recall", "linear", 512, 1, 16, "recall"),
    ("linear C1024 H8", "linear", 1024, 8, 16, "reference"),
    ("mlp C512 H1 recall", "mlp", 512, 1, 16, "recall"),
    ("mlp C1024 H8", "mlp", 1024, 8, 16, "reference"),
]
QUICK = [("linear C256 H4", "linear", 256, 4, 16, "reference"), ("mlp C256 H4", "mlp", 256, 4, 16, "reference")]


def build(layer_type: str, C: int, H: int, b: int, preset: str, device: str):
    make = TTTConfig.recall if preset == "recall" else TTTConfig.reference
    torch.manual_seed(0)
    return build_ttt_layer(make(C, H, layer_type=layer_type, mini_batch_size=b)).to(device).eval()


def timer(clock: str, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    return time.process_time() if clock == "cpu" else time.perf_counter()


def time_steps(step, n_steps: int, repeats: int, clock: str, device: str) -> float:
    """Median over ``repeats`` of the mean time of one of ``n_steps`` consecutive calls of ``step(t)``, in ms."""
    step(0)  # warm up
    times = []
    for _ in range(repeats):
        start = timer(clock, device)
        for t in range(n_steps):
            step(t)
        times.append((timer(clock, device) - start) / n_steps * 1e3)
    return statistics.median(times)


def bench_shape(shape, args) -> dict:
    name, layer_type, C, H, b, preset = shape
    device, B = args.device, args.batch
    layer = build(layer_type, C, H, b, preset, device)
    n_steps = b * args.minibatches
    x = torch.randn(B, n_steps, C, device=device)
    row = {"name": name, "layer_type": layer_type, "hidden_size": C, "num_heads": H, "mini_batch_size": b,
           "preset": preset, "batch": B}
    with torch.no_grad():
        holder = {"state": layer.init_state(B, device)}

        def functional(t):
            _, holder["state"] = layer(x[:, t : t + 1], holder["state"])

        row["step_ms"] = time_steps(functional, n_steps, args.repeats, args.clock, device)
        keep = torch.ones(B, dtype=torch.bool, device=device)
        if hasattr(TTTState, "copy_"):
            state = layer.init_state(B, device)

            def in_place(t):
                _, new = layer(x[:, t : t + 1], state)
                state.copy_(new, keep)

            row["step_in_place_ms"] = time_steps(in_place, n_steps, args.repeats, args.clock, device)
        if device == "cuda":
            state, x_step = layer.init_state(B, device), x[:, :1].clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                layer(x_step, layer.init_state(B, device))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _, new = layer(x_step, state)
                state.copy_(new, keep)

            def replay(t):
                x_step.copy_(x[:, t : t + 1])
                graph.replay()

            row["graph_step_in_place_ms"] = time_steps(replay, n_steps, args.repeats, "wall", device)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the process's CPU time (steadier on a shared machine, one thread)")
    p.add_argument("--minibatches", type=int, default=4, help="mini-batches of steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="two small shapes")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "ttt_decode.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    command = " ".join(["python scripts/bench_ttt_decode.py", *sys.argv[1:]])  # no path of this machine
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "commit": commit,
            "machine": platform.processor() or platform.machine(), "device": args.device, "threads": args.threads,
            "clock": args.clock, "torch": torch.__version__, "load_avg": os.getloadavg()}
    rows = []
    cols = ["step_ms", "step_in_place_ms", "graph_step_in_place_ms"]
    print(f"{'shape':<24}" + "".join(f"{c:>24}" for c in cols))
    for shape in QUICK if args.quick else SHAPES:
        rows.append(bench_shape(shape, args))
        r = rows[-1]
        print(f"{r['name']:<24}" + "".join(f"{r[c]:>24.3f}" if c in r else f"{'-':>24}" for c in cols), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
