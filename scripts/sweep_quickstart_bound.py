"""Past the training length on the quickstart's setting, over seeds: TTT minus the base model in the last bin.

Steps 3-4 of the quickstart (`ttt_speech.quickstart.run`) without submitit or plots: per seed, the tiny base model
and the tiny TTT model are fine-tuned on the sample dialogues the same way (same seed, crops and data order), then
`eval librilight` scores both on the 2900-frame sample audiobook (parallel mode: equal to the quickstart's frame-by-
frame streaming; streaming in steps of several frames is not, with a window this short). Per seed and variant it
records the paired TTT - base difference per bin (the last bin, 1200-2000 frames, is the quickstart's claim) and the
slope per log-frame past the window; the summary gives the mean over seeds with the half-width of the 95% t interval
(one document: the spread is training noise between two fine-tunes, not document sampling).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/sweep_quickstart_bound.py --out bench/quickstart_bound \
        --seeds 0 1 2 --variant decay0.9 --ttt.decay=0.9

Base runs are shared by every variant of a seed (they do not see `ttt.*`); finished runs and evals are reused.
`--paired-with VARIANT` also summarises this variant minus VARIANT per seed (same seeds, same base runs: the
difference of the two TTT models on the same document). Each seed records the chunk updates' top-direction energy
share at the last monitored step, per layer (`update_top_share`, from the run's `ttt_stats.csv`). `--norms` also
measures, per seed and layer, the In-Place update sizes of the trained TTT model on the audiobook (the eval) and on
the first 100 frames (a training crop) of each dialogue: per chunk ||lr dW_i||_F / ||W0||_F (mean, 95th
percentile) and the largest ||W - W0||_F / ||W0||_F along the sequence.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
BINS = [50, 100, 200, 400, 800, 1600]


def summarise(values: list[float]) -> dict:
    from ttt_speech.eval.stats import mean_ci95

    mean, half, n = mean_ci95(values)
    return {"mean": mean, "ci95_half": None if math.isnan(half) else half, "n": n, "values": [float(v) for v in values]}


def last_top_share(run_dir: Path) -> dict[str, float]:
    """The top-direction energy share of the chunk updates at the last monitored step, by layer."""
    rows = list(csv.DictReader((run_dir / "ttt_stats.csv").open()))
    last = max(int(r["step"]) for r in rows)
    return {r["layer"]: float(r["update_top_share"]) for r in rows if int(r["step"]) == last and r["update_top_share"]}


def update_norms(export: Path, codes: dict[str, Path], crop: int) -> dict:
    """Per layer and sequence kind ("eval": the audiobook; "train": each dialogue's first `crop` frames), the chunk
    updates' relative size and the largest relative ||W - W0|| (the fast weight as the parallel forward builds it)."""
    import torch

    from ttt_speech.eval.librilight import load_checkpoint, load_documents
    from ttt_speech.integrations.moshi import ttt_modules
    from ttt_speech.ops.inplace_ttt import advance_fast_weight

    model = load_checkpoint(str(export), "from_checkpoint", "cpu", torch.float32).eval()
    seen: dict[int, list] = {}

    def hook(m, args, kwargs, out):
        x, x0 = args[0], kwargs["input_embeddings"]
        h = m.linear_in(x).view(*x.shape[:2], 2, -1)
        z = m.activation(h[..., 0, :]) * h[..., 1, :]
        C, cfg = m.config.chunk_size, m.config
        n = x.shape[1] // C * C
        dw = torch.einsum("bncd,bnch->bndh", m.targets(x0[:, :n]).unflatten(1, (n // C, C)),
                          z[:, :n].unflatten(1, (n // C, C)))  # [B, n/C, D, H]
        w0 = m.linear_out.weight.float()
        w, deltas = w0[None], []
        for i in range(dw.shape[1]):
            w = advance_fast_weight(w, w0, dw[:, i], cfg.lr, cfg.clip_tau, cfg.decay, cfg.max_delta)
            deltas.append((torch.linalg.matrix_norm(w - w0) / w0.norm()).max().item())
        seen.setdefault(m.layer_idx, []).append(((cfg.lr * torch.linalg.matrix_norm(dw) / w0.norm()).flatten(),
                                                 max(deltas, default=0.0)))

    for module in ttt_modules(model).values():
        module.register_forward_hook(hook, with_kwargs=True)
    result: dict[str, dict] = {}
    with torch.no_grad():
        for kind, name in (("eval", "audiobook"), ("train", "dialogues")):
            for _, stream in load_documents(SAMPLES / f"{name}.jsonl", SAMPLES / "tokenizer.model",
                                            codes_dir=codes[name]):
                model(stream[None, :, :crop] if kind == "train" else stream[None])
            for layer, rows in sorted(seen.items()):
                sizes = torch.cat([r[0] for r in rows])
                result.setdefault(str(layer), {})[kind] = {
                    "chunk_update_mean": sizes.mean().item(), "chunk_update_p95": sizes.quantile(0.95).item(),
                    "max_delta": max(r[1] for r in rows)}
            seen.clear()
    return result


def last_bins(report: dict) -> dict[str, float]:
    return {s: report["checkpoints"]["ttt"]["paired"]["bins"][-1]["streams"][s]["mean"] for s in ("text", "audio")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/quickstart_bound")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variant", required=True, help="name of the TTT setting (a folder under --out)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--duration-sec", type=float, default=8.0, help="training crops (the quickstart's: 8 s)")
    p.add_argument("--mode", choices=["parallel", "streaming"], default="parallel",
                   help="eval mode; parallel equals the quickstart's frame-by-frame streaming")
    p.add_argument("--eval-step", type=int, default=1, help="frames per streaming call (moshi's ring KV cache "
                   "makes a step > 1 differ from frame by frame when the window is short)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the quickstart uses torch's default)")
    p.add_argument("--norms", action="store_true", help="also measure the update sizes, eval against training")
    p.add_argument("--paired-with", default=None, help="a variant already run on these seeds: summarise this "
                   "variant minus it, per seed, in the last bin")
    args, overrides = p.parse_known_args()

    import torch

    from ttt_speech.config import load_config
    from ttt_speech.data.codes import pre_encode
    from ttt_speech.eval import librilight
    from ttt_speech.train.config import TrainConfig
    from ttt_speech.train.trainer import train

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    codes = {}
    for name in ("dialogues", "audiobook"):
        codes[name] = out / "codes" / name
        if not (codes[name] / "index.json").is_file():
            pre_encode(SAMPLES / f"{name}.jsonl", codes[name], mimi="tiny-random")
    config = REPO / "configs" / "tiny.yaml"
    results = {}
    for seed in args.seeds:
        common = [f"--data.train_data={SAMPLES / 'dialogues.jsonl'}", f"--data.tokenizer={SAMPLES / 'tokenizer.model'}",
                  f"--data.codes_dir={codes['dialogues']}", f"--duration_sec={args.duration_sec}",
                  f"--max_steps={args.steps}", f"--ckpt_freq={max(1, args.steps // 2)}", "--log_freq=1",
                  f"--seed={seed}"]
        base_dir = out / f"base-{args.duration_sec:g}s-{args.steps}" / f"seed{seed}"
        ttt_dir = out / args.variant / f"seed{seed}"
        for run_dir, extra in ((base_dir, ["--ttt=null"]), (ttt_dir, overrides)):
            if not (run_dir / "export" / "model.safetensors").is_file():
                t0 = time.perf_counter()
                train(load_config(TrainConfig, config, [*common, f"--run_dir={run_dir}", *extra]))
                print(f"trained {run_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
        eval_dir = ttt_dir / ("eval-parallel" if args.mode == "parallel" else f"eval-step{args.eval_step}")
        report_file = eval_dir / "report.json"
        if report_file.is_file():
            report = json.loads(report_file.read_text())
        else:
            t0 = time.perf_counter()
            report = librilight.run([f"base={base_dir / 'export'}", f"ttt={ttt_dir / 'export'}"],
                                    str(SAMPLES / "audiobook.jsonl"), str(SAMPLES / "tokenizer.model"),
                                    str(eval_dir), codes_dir=str(codes["audiobook"]), mode=args.mode,
                                    step=args.eval_step, bins=BINS, print_paired=False, n_boot=200)
            print(f"evaluated {ttt_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
        paired = report["checkpoints"]["ttt"]["paired"]
        results[seed] = {
            "bins": {s: [b["streams"][s]["mean"] for b in paired["bins"]] for s in ("text", "audio")},
            "slope_past_window": {s: paired["slope_past_window"][s]["mean"] for s in ("text", "audio")},
            "base_last_bin": {s: report["checkpoints"]["base"]["bins"][-1]["streams"][s]["mean"]
                              for s in ("text", "audio")},
            "update_top_share": last_top_share(ttt_dir),
        }
        if args.norms:
            results[seed]["update_norms"] = update_norms(ttt_dir / "export", codes, round(args.duration_sec * 12.5))
        if args.paired_with:
            ref_report = out / args.paired_with / f"seed{seed}" / eval_dir.name / "report.json"
            if not ref_report.is_file():
                raise FileNotFoundError(f"--paired-with {args.paired_with}: no eval for seed {seed} at {ref_report}; "
                                        "run that variant on the same seeds first")
            ref = last_bins(json.loads(ref_report.read_text()))
            results[seed]["minus_" + args.paired_with] = {s: results[seed]["bins"][s][-1] - ref[s] for s in ref}
        r = results[seed]
        print(f"seed {seed} {args.variant}: last bin text {r['bins']['text'][-1]:+.3f} audio "
              f"{r['bins']['audio'][-1]:+.3f}; per bin text {[round(x, 3) for x in r['bins']['text']]} audio "
              f"{[round(x, 3) for x in r['bins']['audio']]}", flush=True)
    summary = {"variant": args.variant, "overrides": overrides, "steps": args.steps, "eval_mode": args.mode,
               "eval_step": args.eval_step,
               "duration_sec": args.duration_sec, "bins": [list(b) for b in librilight.bin_edges(BINS)],
               "per_seed": results}
    for stream in ("text", "audio"):
        summary[f"last_bin_{stream}"] = summarise([r["bins"][stream][-1] for r in results.values()])
        summary[f"slope_{stream}"] = summarise([r["slope_past_window"][stream] for r in results.values()])
    if args.paired_with:
        summary["paired_with"] = args.paired_with
        for stream in ("text", "audio"):
            summary[f"last_bin_{stream}_minus_{args.paired_with}"] = summarise(
                [r["minus_" + args.paired_with][stream] for r in results.values()])
    name = f"{args.variant}-seeds{'_'.join(map(str, args.seeds))}.json"
    (out / name).write_text(json.dumps(summary, indent=1) + "\n")
    fmt = lambda e: f"{e['mean']:+.3f} +- {e['ci95_half']:.3f}" if e["ci95_half"] is not None else f"{e['mean']:+.3f}"
    print(f"{args.variant} over seeds {args.seeds}: last bin text {fmt(summary['last_bin_text'])}, audio "
          f"{fmt(summary['last_bin_audio'])}; slope text {fmt(summary['slope_text'])}, audio "
          f"{fmt(summary['slope_audio'])} -> {out / name}")
    if args.paired_with:
        print(f"  paired, {args.variant} - {args.paired_with}, last bin: text "
              f"{fmt(summary[f'last_bin_text_minus_{args.paired_with}'])}, audio "
              f"{fmt(summary[f'last_bin_audio_minus_{args.paired_with}'])}")


if __name__ == "__main__":
    main()
