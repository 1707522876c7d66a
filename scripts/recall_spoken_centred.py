"""Does the chunk-centred In-Place update (`ttt.centre_update`) cost memory? The spoken-recall benchmark in small
(`ttt_speech.eval.recall_spoken`, the quickstart's step 6 setting: 250 steps, chunk 16), In-Place with
`centre_update` against the plain In-Place and window runs already in `bench/recall-spoken` (target
token_embeddings) and `bench/recall-spoken-input` (input_embeddings), seeds 0-2, paired by document per seed
(cluster bootstrap over voices), then the mean of the per-seed differences with a 95% t half-width over seeds.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/recall_spoken_centred.py --out runs/recall-centred \
        --json bench/quickstart_bound/recall_centred.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLAIN = {"token_embeddings": REPO / "bench" / "recall-spoken",
         "input_embeddings": REPO / "bench" / "recall-spoken-input"}
SCORES = ("text_repeat", "text_first", "audio_repeat")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the centred runs and the Mimi word banks (reused)")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()

    import numpy as np
    import torch

    from ttt_speech.eval import recall_spoken as rs
    from ttt_speech.eval.recall import receptive_field
    from ttt_speech.eval.stats import mean_ci95

    class CentredConfig(rs.SpokenRecallConfig):
        def ttt_config(self, variant: str):
            config = super().ttt_config(variant)
            if config is not None and config.kind == "inplace":
                config.centre_update = True
            return config

    torch.set_num_threads(1)
    out = Path(args.out)
    banks = rs.Banks(REPO / "data" / "samples", cache=out / "codes")
    summary = {}
    for target, plain_dir in PLAIN.items():
        cfg = CentredConfig(steps=250, target=target)
        docs = banks.heldout(receptive_field(cfg.lm_kwargs("window")))
        diffs: dict[str, list] = {}
        for seed in args.seeds:
            plain = {v: json.loads((plain_dir / "runs" / f"{v}-s{seed}.json").read_text())
                     for v in ("window", "inplace")}
            if plain["inplace"]["config"]["target"] != target or plain["inplace"]["config"]["steps"] != cfg.steps:
                raise ValueError(f"{plain_dir}: its runs are not target={target}, steps={cfg.steps}")
            centred = rs.run_one("inplace", seed, cfg, banks, docs, out / target, progress=True)
            for name, a, b in (("centred - inplace", centred, plain["inplace"]),
                               ("inplace - window", plain["inplace"], plain["window"]),
                               ("centred - window", centred, plain["window"])):
                for score in SCORES:
                    e = rs.paired_by_document(a, b, score)
                    diffs.setdefault(f"{name} {score}", []).append([e.mean, e.lo, e.hi])
        for key, rows in diffs.items():
            mean, half, n = mean_ci95([r[0] for r in rows])
            summary[f"{target}: {key}"] = {"per_seed": rows, "mean": mean,
                                           "ci95_half": None if math.isnan(half) else half, "n_seeds": n}
            print(f"{target:16s} {key:30s} per seed " + ", ".join(f"{r[0]:+.3f} [{r[1]:+.3f}, {r[2]:+.3f}]"
                                                              for r in rows) +
                  f"; mean {mean:+.3f}" + ("" if math.isnan(half) else f" +- {half:.3f}"))
        summary[f"{target}: means"] = {
            "centred": {s: float(np.mean([json.loads((out / target / "runs" / f"inplace-s{seed}.json").read_text())[s]
                                          for seed in args.seeds])) for s in SCORES}}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
