#!/usr/bin/env python3
"""Can the TTT block's fast weights store and retrieve the recall benchmark's pairs? A diagnosis at initialisation.

    python scripts/diagnose_ttt_recall.py [--seeds 0 1 2] [--sequences 64] [--out bench/ttt_block_diagnosis.json]

For each combination of `TTTConfig` options, the block at layer 1 of the recall benchmark's model
(`ttt_speech.eval.recall`, window variant, initialisation of `seed`) gets hand-wired keys: `k_proj = q_proj`, and
short convs (`conv_size` 2) with `q_conv`, `v_conv` the identity and `k_conv` a one-frame delay (with `share_qk`:
`conv_q` the identity and `conv_k` the delay, biases 0), so the key at position p encodes token p - 1 and the
target `v_p - k_p` holds token p: the pair "s_(i) -> s_(i+1)" is stored at p = i + 1, and the query at the copy of
s_i should retrieve it. This isolates the memory from the question whether
training finds such keys. Measured on the fixed evaluation sequences, with the fast weights read just before the copy
(after S and the filler were written), per copy position i and candidate pair p of S:

- key cos: cos(q_copy(i), k_p), matching (p = i + 1) vs the other pairs of S;
- retrieval cos: cos(LN(f(q_copy(i); W)), v_p - k_p), matching vs others (the issue's measurement);
- top-1: how often the matching pair is the best match of the centred retrieval among the centred targets of S
  (chance 1 / (seg - 1)); "top-1 gain" is the same with the fast weights read *before* S was written subtracted,
  i.e. what the memory added.

Prints a table and writes JSON (mean and 95% t-interval over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ttt_speech.eval import recall  # noqa: E402
from ttt_speech.eval.stats import t_interval  # noqa: E402
from ttt_speech.integrations.moshi import MoshiTTTConfig, apply_ttt, build_lm, ttt_modules  # noqa: E402
from ttt_speech.ops.ttt import gelu_tanh, layer_norm  # noqa: E402

# name -> (layer type, heads (None: the model's), MoshiTTTConfig fields, TTTConfig options)
COMBOS: dict[str, tuple[str, int | None, dict, dict]] = {
    "reference": ("linear", None, {}, {}),
    "l2": ("linear", None, {}, {"qk_norm": "l2"}),
    "centre": ("linear", None, {}, {"centre": True}),
    "no_rope": ("linear", None, {}, {"use_rope": False}),
    "sum": ("linear", None, {}, {"eta_schedule": "sum"}),
    "1_head": ("linear", 1, {}, {}),
    "lr10": ("linear", None, {"ttt_base_lr": 10.0}, {}),
    "pre_conv": ("linear", None, {}, {"pre_conv": True}),
    "l2+centre": ("linear", None, {}, {"qk_norm": "l2", "centre": True}),
    "l2+centre+no_rope": ("linear", None, {}, {"qk_norm": "l2", "centre": True, "use_rope": False}),
    "l2+centre+no_rope+sum": ("linear", None, {}, {"qk_norm": "l2", "centre": True, "use_rope": False,
                                                   "eta_schedule": "sum"}),
    "l2+centre+no_rope+1_head": ("linear", 1, {}, {"qk_norm": "l2", "centre": True, "use_rope": False}),
    "l2+centre+no_rope+sum+1_head": ("linear", 1, {}, {"qk_norm": "l2", "centre": True, "use_rope": False,
                                                       "eta_schedule": "sum"}),
    "l2+centre+no_rope+sum+1_head+mb8": ("linear", 1, {"ttt_mini_batch_size": 8},
                                         {"qk_norm": "l2", "centre": True, "use_rope": False, "eta_schedule": "sum"}),
    "l2+centre+no_rope+sum+1_head+lr10": ("linear", 1, {"ttt_base_lr": 10.0},
                                          {"qk_norm": "l2", "centre": True, "use_rope": False, "eta_schedule": "sum"}),
    "sqk+l2+centre+no_rope+sum+1_head": ("linear", 1, {"ttt_share_qk": True},
                                         {"qk_norm": "l2", "centre": True, "use_rope": False, "eta_schedule": "sum"}),
    "mlp:reference": ("mlp", None, {}, {}),
    "mlp:l2+centre+no_rope+sum+1_head": ("mlp", 1, {}, {"qk_norm": "l2", "centre": True, "use_rope": False,
                                                        "eta_schedule": "sum"}),
}


def block_model(cfg: recall.RecallConfig, seed: int, layer_type: str, heads: int | None, fields: dict,
                options: dict) -> torch.nn.Module:
    """The window model of `seed` with a TTT block at layer 1 whose keys are hand-wired as described above."""
    model = build_lm(cfg.lm_kwargs("window"), seed=seed)
    fields = {"ttt_mini_batch_size": cfg.chunk, "ttt_share_qk": False, **fields}
    share_qk = fields.get("ttt_share_qk", False)
    options = {**options, "conv_kernel": 2} if share_qk else {**options, "conv_size": 2}
    ttt = MoshiTTTConfig(kind="block", layers=[1], ttt_layer_type=layer_type, ttt_num_heads=heads or cfg.num_heads,
                         ttt_options=options, **fields)
    torch.manual_seed(seed)
    apply_ttt(model, ttt)
    layer = ttt_modules(model)[1].ttt
    with torch.no_grad():  # taps (x_(t-1), x_t): the key of position t is token t - 1, the query token t
        if share_qk:
            layer.conv_q.weight.zero_()[..., 1] = 1.0
            layer.conv_k.weight.zero_()[..., 0] = 1.0
            layer.conv_q.bias.zero_()
            layer.conv_k.bias.zero_()
        else:
            layer.k_proj.weight.copy_(layer.q_proj.weight)
            layer.k_conv.weight.zero_()[..., 0] = 1.0
    return model.eval()


def read_weights(state, token_idx: torch.Tensor) -> list[torch.Tensor]:
    """The weights the last token written into `state` read, ``W - token_idx[pos - 1] * G``: the memory as it is
    before a query adds a gradient of its own."""
    pos = int(state.position[0])
    scale = token_idx[pos - 1] if pos else token_idx[-1] * 0
    return [p - scale * g for p, g in zip(state.params.values(), state.grads.values(), strict=True)]


def inner(layer, x: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
    """f(x; w) of the layer's inner model; x [B, H, n, D]."""
    if layer.layer_type == "linear":
        return x @ w[0] + w[1]
    return gelu_tanh(x @ w[0] + w[1]) @ w[2] + w[3]


@torch.no_grad()
def diagnose(cfg: recall.RecallConfig, seed: int, combo: tuple, sequences: int) -> dict[str, float]:
    model = block_model(cfg, seed, *combo)
    block = ttt_modules(model)[1]
    layer = block.ttt
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        captured["x"] = args[0]

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    codes = recall.make_batch(torch.Generator().manual_seed(cfg.eval_seed), cfg, sequences)
    model(codes)
    handle.remove()
    x = captured["x"]  # [B, T, C], the TTT layer's input
    ops = {}
    chunk_op, recurrent_op = layer._ops()

    def spy(*args, **kwargs):
        ops["q"], ops["k"], ops["v"] = args[0], args[1], args[2]
        return chunk_op(*args, **kwargs)

    layer._ops = lambda: (spy, recurrent_op)
    layer(x)
    B, T, H, D = ops["q"].shape
    q, k, v = (ops[n].transpose(1, 2) for n in "qkv")  # [B, H, T, D]
    c, seg = cfg.copy_start, cfg.seg
    del layer._ops
    _, before = layer(x[:, :1])  # written: token 0 only (its key holds the zero history)
    _, after = layer(x[:, :c])  # written: S and the filler
    gamma, beta = layer.ttt_norm_weight[:, None, :], layer.ttt_norm_bias[:, None, :]
    queries = q[:, :, c : c + seg - 1]  # copy of s_0 .. s_(seg-2)
    pairs = torch.arange(1, seg)  # p = i + 1 stores s_i -> s_(i+1)
    keys, targets = k[:, :, pairs], (v - k)[:, :, pairs]
    token_idx = layer._eta(x)[1]
    ret = layer_norm(inner(layer, queries, read_weights(after, token_idx)), gamma, beta)
    ret0 = layer_norm(inner(layer, queries, read_weights(before, token_idx)), gamma, beta)
    eye = torch.eye(seg - 1, dtype=torch.bool)

    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [B, H, n, D] x [B, H, m, D] -> [B, H, n, m]
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).mT

    def match_vs_other(m: torch.Tensor) -> tuple[float, float]:
        return m[..., eye].mean().item(), m[..., ~eye].mean().item()

    def top1(r: torch.Tensor) -> float:
        sim = cos(r - r.mean(-2, keepdim=True), targets - targets.mean(-2, keepdim=True))
        return (sim.argmax(-1) == torch.arange(seg - 1)).float().mean().item()

    kc, ko = match_vs_other(cos(queries, keys))
    rc, ro = match_vs_other(cos(ret, targets))
    return {"key_cos_match": kc, "key_cos_other": ko, "ret_cos_match": rc, "ret_cos_other": ro,
            "top1": top1(ret), "top1_gain": top1(ret - ret0), "chance": 1 / (seg - 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--combos", nargs="+", default=list(COMBOS), choices=list(COMBOS))
    ap.add_argument("--out", type=Path, default=Path("bench/ttt_block_diagnosis.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = recall.RecallConfig()
    rows = {}
    metrics = ["key_cos_match", "key_cos_other", "ret_cos_match", "ret_cos_other", "top1", "top1_gain"]
    print(f"{'combination':<36}" + "".join(f"{m:>15}" for m in metrics), flush=True)
    for name in args.combos:
        per_seed = [diagnose(cfg, s, COMBOS[name], args.sequences) for s in args.seeds]
        rows[name] = {}
        for m in metrics:
            e = t_interval([r[m] for r in per_seed])
            rows[name][m] = {"mean": e.mean, "ci95": e.ci95, "per_seed": [r[m] for r in per_seed]}
        print(f"{name:<36}" + "".join(f"{rows[name][m]['mean']:>15.3f}" for m in metrics), flush=True)
    print(f"top-1 chance: {1 / (cfg.seg - 1):.3f}; {len(args.seeds)} seeds x {args.sequences} sequences")
    report = {"config": cfg.to_dict(), "seeds": args.seeds, "sequences": args.sequences, "rows": rows,
              "combos": {n: {"layer_type": c[0], "heads": c[1], "fields": c[2], "options": c[3]}
                         for n, c in COMBOS.items() if n in rows}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
