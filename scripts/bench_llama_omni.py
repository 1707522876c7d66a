"""Decode latency and cache memory of a small Llama with TTT layers, at long contexts.

Three layouts of the same model: all attention, TTT-Linear replacing attention in the top quarter of the layers
(LLaMA-Omni's plan: 24-31 of 32), and TTT in every layer. For each context length the cache is filled to that
length (random KV for attention layers, a TTT state that has seen that many tokens: its size and the decode cost do
not depend on the values), then single-token steps go through the model's forward with a `TTTDynamicCache`, the
same path `generate` takes. Reported: median ms per token, and the bytes the cache holds (KV, TTT states).

    PYTHONPATH=overlay python scripts/bench_llama_omni.py --quick
    PYTHONPATH=overlay python scripts/bench_llama_omni.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from ttt_speech.integrations.llama_omni import LlamaTTTForCausalLM, TTTDynamicCache, ttt_modules

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(args: argparse.Namespace, variant: str) -> LlamaTTTForCausalLM:
    L = args.layers
    layers = {"attention": [], "ttt_top_quarter": list(range(L - L // 4, L)), "all_ttt": list(range(L))}[variant]
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=L, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(args.contexts) + args.steps + args.warmup + 1,
                         use_ttt=bool(layers), ttt_layers=layers or None, ttt_mode="replace",
                         ttt_mini_batch_size=args.mini_batch, ttt_check_finite=False)
    torch.manual_seed(0)
    return LlamaTTTForCausalLM(config).to(device=args.device, dtype=DTYPES[args.dtype]).eval()


def filled_cache(model: LlamaTTTForCausalLM, context: int) -> TTTDynamicCache:
    """A cache in the state a forward over `context` tokens leaves (values random)."""
    cfg, device, dtype = model.config, model.device, model.dtype
    ttt = ttt_modules(model)
    cache = TTTDynamicCache()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        if i in ttt:
            state = ttt[i].init_state(1, device)
            state.position.fill_(context % ttt[i].mini_batch_size)
            cache.update_ttt(i, state, context)
        else:
            kv = torch.randn(2, 1, cfg.num_key_value_heads, context, head_dim, device=device, dtype=dtype)
            cache.update(kv[0], kv[1], i)
    return cache


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode(model: LlamaTTTForCausalLM, context: int, steps: int, warmup: int) -> dict:
    cache = filled_cache(model, context)
    token = torch.ones(1, 1, dtype=torch.long, device=model.device)
    times = []
    for s in range(warmup + steps):
        pos = torch.tensor([context + s], device=model.device)
        sync(str(model.device))
        t0 = time.perf_counter()
        model(token, past_key_values=cache, use_cache=True, cache_position=pos, position_ids=pos[None])
        sync(str(model.device))
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    mem = cache.memory_bytes()
    return {"ms_per_token": 1e3 * statistics.median(times), "kv_mib": mem["kv"] / 2**20, "ttt_mib": mem["ttt"] / 2**20,
            "cache_mib": (mem["kv"] + mem["ttt"]) / 2**20, "seq_length": cache.get_seq_length()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per point")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: 6 steps, 1 warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--mini-batch", type=int, default=64)
    ap.add_argument("--variants", nargs="+", default=["attention", "ttt_top_quarter", "all_ttt"])
    ap.add_argument("--out", default="bench/llama_omni.json")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = 6, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    print(f"{'variant':<16} {'context':>8} {'ms/token':>9} {'KV MiB':>9} {'TTT MiB':>8} {'cache MiB':>10}")
    models = {variant: build(args, variant) for variant in args.variants}
    for context in args.contexts:  # variants interleaved, so load drifts on a shared machine hit them alike
        for variant, model in models.items():
            r = {"variant": variant, "context": context, **decode(model, context, args.steps, args.warmup)}
            rows.append(r)
            print(f"{variant:<16} {context:>8} {r['ms_per_token']:>9.2f} {r['kv_mib']:>9.2f} {r['ttt_mib']:>8.2f} "
                  f"{r['cache_mib']:>10.2f}", flush=True)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "args": vars(args), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
