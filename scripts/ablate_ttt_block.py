#!/usr/bin/env python3
"""The TTT-Linear / TTT-MLP block ablation on the fair recall benchmark (`ttt_speech.eval.recall`).

    python scripts/ablate_ttt_block.py run VARIANT --seed S [--steps N] [--out bench/ttt_block_ablation]
    python scripts/ablate_ttt_block.py summary [--out bench/ttt_block_ablation] [--variants ...]

A variant is a recall benchmark variant (`window`, `full`, `inplace`, `ttt_linear`, ...) or a block built from
option tokens, `linear+TOKEN+TOKEN...` / `mlp+...` (see `TOKENS`), e.g. `linear+l2+centre+norope+sum+h1+conv4`;
the tokens add to ttt-lm-pytorch's layer with the benchmark's heads (`linear` alone is the reference).
Every run uses the benchmark's `RecallConfig` (the same model, initialisation, data order and evaluation sequences
per seed; `--steps` changes only the training length) and its `run_one`, so a run is one
`<out>/runs/<variant>-s<seed>.json` and an interrupted ablation resumes. `summary` pairs seeds against `window` and
`full` with the benchmark's `summarize` (per-seed paired differences, gap closed, t-intervals over seeds), prints the
table as in `docs/eval.md`, and writes `ablation.json` and `ablation.png` (training curves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported

from ttt_speech.eval import recall  # noqa: E402
from ttt_speech.integrations.moshi import MoshiTTTConfig  # noqa: E402

# option token -> (MoshiTTTConfig fields, TTTConfig options); "hN" sets the heads, "convN" the short convs, ...
TOKENS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "l2": ({}, {"qk_norm": "l2"}),
    "centre": ({}, {"centre": True}),
    "norope": ({}, {"use_rope": False}),
    "sum": ({}, {"eta_schedule": "sum"}),
    "preconv": ({}, {"pre_conv": True}),
    "sqk": ({"ttt_share_qk": True}, {}),
}


def parse_block(variant: str, cfg: recall.RecallConfig) -> MoshiTTTConfig | None:
    """The block config of an option-token variant; None for a benchmark variant."""
    layer_type, *tokens = variant.split("+")
    if layer_type not in ("linear", "mlp"):
        return None
    # tokens add options to the reference layer (not to MoshiTTTConfig's recall defaults)
    fields: dict[str, Any] = {"ttt_num_heads": cfg.num_heads, "ttt_mini_batch_size": cfg.chunk,
                              "ttt_base_lr": cfg.block_base_lr, "gate_init": cfg.block_gate_init,
                              "ttt_share_qk": False}
    options: dict[str, Any] = {}
    for token in tokens:
        if token in TOKENS:
            fields.update(TOKENS[token][0])
            options.update(TOKENS[token][1])
        elif token.startswith("h") and token[1:].isdigit():
            fields["ttt_num_heads"] = int(token[1:])
        elif token.startswith("conv") and token[4:].isdigit():
            options["conv_size"] = int(token[4:])
        elif token.startswith("mb") and token[2:].isdigit():
            fields["ttt_mini_batch_size"] = int(token[2:])
        elif token.startswith("lr") and token[2:].replace(".", "", 1).isdigit():
            fields["ttt_base_lr"] = float(token[2:])
        elif token.startswith("gate") and token[4:].replace(".", "", 1).isdigit():
            fields["gate_init"] = float(token[4:])
        else:
            raise ValueError(f"{variant}: unknown option token {token!r}; known: {sorted(TOKENS)}, hN, convN, mbN, "
                             "lrX, gateX")
    return MoshiTTTConfig(kind="block", layers=list(cfg.ttt_layers), ttt_layer_type=layer_type,
                          ttt_options=options, **fields)


@dataclasses.dataclass
class AblationConfig(recall.RecallConfig):
    """`RecallConfig` whose `ttt_config` also knows the option-token block variants (no new fields, so its runs
    record the benchmark's own config)."""

    def ttt_config(self, variant: str) -> MoshiTTTConfig | None:
        block = parse_block(variant, self)
        return block if block is not None else super().ttt_config(variant)


def cmd_run(args: argparse.Namespace) -> None:
    cfg = AblationConfig(**({"steps": args.steps} if args.steps else {}))
    cfg.ttt_config(args.variant)  # a bad token fails before training
    result = recall.run_one(args.variant, args.seed, cfg, args.out, threads=args.threads, progress=True)
    print(f"{args.variant} seed {args.seed}: copy NLL {sum(result['copy_nll']) / len(result['copy_nll']):.3f} "
          f"({result['train_seconds']:.0f} s)")


def cmd_summary(args: argparse.Namespace) -> dict[str, Any]:
    """Runs from `--runs` folders (default `<out>/runs`); a run trained for other than the benchmark's steps is
    named `<variant>@<steps>`."""
    default_steps = recall.RecallConfig().steps
    runs = []
    for folder in args.runs or [args.out / "runs"]:
        for path in sorted(Path(folder).glob("*.json")):
            run = json.loads(path.read_text())
            if run["config"]["steps"] != default_steps:
                run["variant"] = f"{run['variant']}@{run['config']['steps']}"
            runs.append(run)
    if args.variants:
        order = {v: i for i, v in enumerate(args.variants)}
        runs = sorted((r for r in runs if r["variant"] in order), key=lambda r: (order[r["variant"]], r["seed"]))
    else:
        runs = sorted(runs, key=lambda r: (r["variant"] not in ("window", "full"), r["variant"], r["seed"]))
    summary = recall.summarize(runs)
    steps = {r["variant"]: r["config"]["steps"] for r in runs}
    cfg = AblationConfig(**{k: v for k, v in runs[0]["config"].items() if k != "steps"})
    other = sorted({k for r in runs for k, v in r["config"].items() if k != "steps" and v != cfg.to_dict()[k]})
    if other:
        raise ValueError(f"runs differ in more than their steps: {other}")
    print(recall.format_table(summary, cfg.chance))
    print()
    print(markdown(summary, steps))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"config": cfg.to_dict(), "steps": steps, "summary": summary,
              "ci_method": "per-seed means over the fixed evaluation sequences, then Student t over seeds; paired "
                           "differences and gap closed computed per seed first"}
    (args.out / "ablation.json").write_text(json.dumps(report, indent=1) + "\n")
    recall.plot(runs, summary, cfg, args.out / "ablation.png")
    print(f"wrote {args.out / 'ablation.json'} and {args.out / 'ablation.png'}")
    return report


def markdown(summary: dict[str, Any], steps: dict[str, int]) -> str:
    def ci(e: dict | None) -> str:
        if e is None or e["mean"] is None:
            return ""
        if e["ci95"] is None:
            return f"{e['mean']:.3f}"
        return f"{e['mean']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"

    lines = ["| variant | steps | copy NLL | vs window | gap closed | filler NLL | flat |",
             "|---|---:|---|---|---|---:|---:|"]
    for v, row in summary.items():
        lines.append(f"| `{v}` | {steps[v]} | {ci(row['copy_nll'])} | {ci(row.get('diff_vs_window'))} | "
                     f"{ci(row.get('gap_closed'))} | {row['filler_nll']['mean']:.3f} | "
                     f"{sum(row['flattened'])}/{len(row['flattened'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train and evaluate one (variant, seed)")
    run.add_argument("variant")
    run.add_argument("--seed", type=int, required=True)
    run.add_argument("--steps", type=int, default=None, help="training steps (default: the benchmark's)")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--out", type=Path, default=Path("bench/ttt_block_ablation"))
    summ = sub.add_parser("summary", help="table, JSON and curves of every run under --out")
    summ.add_argument("--out", type=Path, default=Path("bench/ttt_block_ablation"))
    summ.add_argument("--variants", nargs="+", default=None, help="only these (named as printed), in this order")
    summ.add_argument("--runs", nargs="+", type=Path, default=None, help="folders of run JSONs (default <out>/runs)")
    args = ap.parse_args(argv)
    cmd_run(args) if args.cmd == "run" else cmd_summary(args)


if __name__ == "__main__":
    main(sys.argv[1:])
