"""Coverage of eval-librilight's 95% CIs on null data, by number of speakers.

Each simulated evaluation has G speakers with 3 documents each: a document's value is its speaker's effect
(N(0, 1)) plus its own noise (N(0, 0.5)), so the true mean is 0 and documents of one speaker are correlated
(`--skewed`: effects Exp(1) - 1, still mean 0, and 1 to 5 documents per speaker). For
each interval, the fraction of simulations whose CI contains 0 (the target is 0.95):
- `percentile`: the plain percentile cluster bootstrap (`cluster_bootstrap(widen=False)`);
- `widened`: the interval eval-librilight reports (`cluster_bootstrap()`, small-sample widening);
- `t_speaker_means`: a Student-t interval over the speakers' means (exact for this design);
- `t_documents_naive`: a Student-t interval over documents, as if they were independent (the old report).

    python scripts/bench_cluster_ci.py --sims 1000 --out bench/cluster_ci.json   # ~5 min on 2 busy cores
    python scripts/bench_cluster_ci.py --sims 1000 --skewed --out bench/cluster_ci_skewed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ttt_speech.eval.stats import cluster_bootstrap, t_interval

METHODS = ["percentile", "widened", "t_speaker_means", "t_documents_naive"]


def coverage(n_speakers: int, sims: int, skewed: bool = False, n_boot: int = 2000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    hits = dict.fromkeys(METHODS, 0)
    for i in range(sims):
        sizes = rng.integers(1, 6, n_speakers) if skewed else np.full(n_speakers, 3)
        effects = rng.exponential(1.0, n_speakers) - 1.0 if skewed else rng.normal(0.0, 1.0, n_speakers)
        values = np.repeat(effects, sizes) + rng.normal(0.0, 0.5, int(sizes.sum()))
        speakers = np.repeat(np.arange(n_speakers), sizes).tolist()
        means = [values[np.asarray(speakers) == g].mean() for g in range(n_speakers)]
        estimates = {"percentile": cluster_bootstrap(values, speakers, n_boot=n_boot, seed=i, widen=False),
                     "widened": cluster_bootstrap(values, speakers, n_boot=n_boot, seed=i),
                     "t_speaker_means": t_interval(means),
                     "t_documents_naive": t_interval(values)}
        for name, est in estimates.items():
            hits[name] += est.lo <= 0.0 <= est.hi
    return {name: hits[name] / sims for name in METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sims", type=int, default=1000)
    parser.add_argument("--speakers", type=int, nargs="+", default=[3, 4, 6, 10, 20, 40])
    parser.add_argument("--skewed", action="store_true",
                        help="speaker effects Exp(1) - 1 and 1 to 5 documents per speaker, instead of N(0, 1) and 3")
    parser.add_argument("--out", default="bench/cluster_ci.json")
    args = parser.parse_args()
    design = "skewed effects, 1-5 documents per speaker" if args.skewed else "normal effects, 3 documents per speaker"
    print(f"coverage of 95% CIs on null data, {design} ({args.sims} simulations each; MC standard error ~0.007)")
    print(f"{'speakers':>8} " + " ".join(f"{m:>18}" for m in METHODS))
    results = {}
    for g in args.speakers:
        results[g] = coverage(g, args.sims, skewed=args.skewed, seed=g)
        print(f"{g:>8} " + " ".join(f"{results[g][m]:>18.3f}" for m in METHODS), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sims": args.sims, "design": design, "coverage": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
