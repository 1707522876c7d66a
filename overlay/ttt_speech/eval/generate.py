"""`ttt-speech eval generate`: free-running generation for minutes, the "gibberish after minutes" detector.

Teacher-forced NLL (`eval librilight`) feeds the model real tokens; it cannot see a model that drifts once it reads
its own output. Here every checkpoint runs `LMGen` from the same prompt, with the same user stream and the same
sampling seeds, for N frames, and per time window of the generated stream:
- `text_entropy`: the entropy (nats) of the distribution of its word tokens (text tokens other than padding) in
  the window; collapse into a loop drives it down, noise drives it up;
- `text_repeat_rate`: the repeated n-gram rate of its word tokens, 1 - distinct / total n-grams in the window
  (0: no n-gram repeats; near 1: a loop);
- `text_pad_rate`: the fraction of frames whose text token is padding (silence, or a model that stopped talking);
- `text_pred_entropy`: the mean entropy of the model's text distribution (logits at temperature 1);
- `audio{k}_entropy`: the entropy of codebook k's codes in the window, and `audio_entropy` their mean;
- `audio0_repeat_rate`: the repeated n-gram rate of the semantic codebook (audio loops).
Per window, means over samples (seeds x batch rows) with Student-t 95% CIs (null below 3 samples), and the paired
difference of each checkpoint to the reference (default `base`, else the first) sample by sample: the same seed,
prompt and user stream.

Outputs in `out`: `generate.json` (below), `generate.csv` (one row per checkpoint, sample, window, metric),
`generate.png` (each metric over time), `tokens_<checkpoint>.npy` (the generated streams, [S, 1 + dep_q, T]).
    {"version": 1, "frames": int, "frame_rate": 12.5, "window_frames": int, "ngram": int, "prompt_frames": int,
     "prompt": str | null, "user_stream": str, "seeds": [int], "batch_size": int, "sampling": dict,
     "reference": str, "metrics": [str], "windows": [{"start": int, "end": int, "in_prompt": bool}],
     "checkpoints": {name: {"path": str, "ttt": dict | null, "seconds": float,
                            "metrics": {metric: [EST per window]},
                            "paired": null | {"reference": str, "metrics": {metric: [EST per window]}}}}}
    EST = {"mean": float | null, "ci95": [lo, hi] | null, "n": int}
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ttt_speech.constants import DTYPES, FRAME_RATE, FRAME_SIZE
from ttt_speech.errors import ConfigError
from ttt_speech.eval.stats import MIN_CLUSTERS, t_interval


def empirical_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the empirical distribution of `tokens`; NaN if empty."""
    if len(tokens) == 0:
        return math.nan
    counts = np.asarray(list(Counter(int(t) for t in tokens).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def repeated_ngram_rate(tokens: Sequence[int], n: int) -> float:
    """1 - distinct / total over the n-grams of `tokens` (0: none repeats); NaN with fewer than n tokens."""
    grams = [tuple(int(x) for x in tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else math.nan


def metric_names(dep_q: int) -> list[str]:
    return ["text_entropy", "text_repeat_rate", "text_pad_rate", "text_pred_entropy", "audio_entropy",
            "audio0_repeat_rate", *[f"audio{k}_entropy" for k in range(dep_q)]]


def window_metrics(tokens: np.ndarray, text_entropy: np.ndarray, windows: list[tuple[int, int]],
                   pad_ids: Sequence[int], ngram: int) -> dict[str, list[float]]:
    """Every metric per window for one generated stream.

    Args:
        tokens: of shape [1 + dep_q, T] (text, then the audio codebooks).
        text_entropy: the text logits' entropy per frame, of shape [T].
    """
    dep_q = tokens.shape[0] - 1
    out: dict[str, list[float]] = {m: [] for m in metric_names(dep_q)}
    for lo, hi in windows:
        text = tokens[0, lo:hi]
        words = text[~np.isin(text, pad_ids)]
        out["text_entropy"].append(empirical_entropy(words))
        out["text_repeat_rate"].append(repeated_ngram_rate(words, ngram))
        out["text_pad_rate"].append(float(np.isin(text, pad_ids).mean()))
        out["text_pred_entropy"].append(float(text_entropy[lo:hi].mean()))
        per_codebook = [empirical_entropy(tokens[1 + k, lo:hi]) for k in range(dep_q)]
        for k, h in enumerate(per_codebook):
            out[f"audio{k}_entropy"].append(h)
        out["audio_entropy"].append(float(np.mean(per_codebook)))
        out["audio0_repeat_rate"].append(repeated_ngram_rate(tokens[1, lo:hi], ngram))
    return out


def time_windows(frames: int, window_frames: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) windows; a last partial window is kept if at least half a window long."""
    edges = [(lo, min(lo + window_frames, frames)) for lo in range(0, frames, window_frames)]
    if len(edges) > 1 and edges[-1][1] - edges[-1][0] < window_frames / 2:
        edges = edges[:-1]
    return edges


def _est(values: Sequence[float]) -> dict:
    e = t_interval(values)
    return {"mean": e.mean, "ci95": e.ci95, "n": e.n}


def generate(models: dict[str, tuple[str, torch.nn.Module]], user_codes: torch.Tensor, frames: int,
             out_dir: str | Path, prompt: torch.Tensor | None = None, seeds: Sequence[int] = (0, 1, 2),
             batch_size: int = 1, window_frames: int = 125, ngram: int = 4, reference: str | None = None,
             sampling: dict | None = None, device: str = "cpu", describe: dict | None = None) -> dict:
    """Run every model from the same prompt and user stream for every seed; write the report.

    Args:
        models: name -> (path, model).
        user_codes: the user's audio codes of shape [n_user, T] (cycled), shared by all rows.
        prompt: the model's stream to force first, of shape [1 + dep_q, P], shared by all rows.
        seeds: one generation of `batch_size` rows per seed; samples are (seed, row) pairs.
        describe: "prompt" and "user_stream" descriptions recorded in the report.
    """
    from ttt_speech.integrations.moshi_gen import free_run

    if not models:
        raise ValueError("no checkpoints to generate from")
    reference = reference or ("base" if "base" in models else next(iter(models)))
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not among the checkpoints {sorted(models)}")
    if frames < 1 or window_frames < 1 or not seeds or batch_size < 1:
        raise ValueError(f"need frames, window_frames, batch_size >= 1 and a seed, got {frames}, {window_frames}, "
                         f"{batch_size}, {list(seeds)}")
    P = 0 if prompt is None else int(prompt.shape[-1])
    windows = time_windows(frames, window_frames)
    sampling = dict(sampling or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dep_q = next(iter(models.values()))[1].dep_q
    names = metric_names(dep_q)
    report = {"version": 1, "frames": frames, "frame_rate": FRAME_RATE, "window_frames": window_frames,
              "ngram": ngram, "prompt_frames": P, **{"prompt": None, "user_stream": "given", **(describe or {})},
              "seeds": list(seeds), "batch_size": batch_size, "sampling": sampling, "reference": reference,
              "metrics": names, "windows": [{"start": lo, "end": hi, "in_prompt": lo < P} for lo, hi in windows],
              "checkpoints": {}}
    samples: dict[str, dict[str, np.ndarray]] = {}  # name -> metric -> [S, n_windows]
    rows = []
    total = sum(len(seeds) * (frames + max(m.delays)) for _, m in models.values())  # LMGen steps
    with tqdm(total=total, desc="eval-generate", unit="frame", unit_scale=True) as bar:
        for name, (path, model) in models.items():
            if model.dep_q != dep_q:
                raise ValueError(f"{name}: {model.dep_q} audio codebooks, {reference} has {dep_q}")
            t0 = time.perf_counter()
            per_metric: dict[str, list[list[float]]] = {m: [] for m in names}
            streams = []
            for seed in seeds:
                user = user_codes[None].expand(batch_size, -1, -1)
                pr = None if prompt is None else prompt[None].expand(batch_size, -1, -1)
                gen = free_run(model, user, frames, prompt=pr, seed=seed, progress=bar.update, **sampling)
                for row in range(batch_size):
                    tokens = gen.tokens[row].numpy()
                    m = window_metrics(tokens, gen.text_entropy[row].numpy(), windows, gen.pad_ids, ngram)
                    for metric, values in m.items():
                        per_metric[metric].append(values)
                        rows += [[name, seed, row, lo / FRAME_RATE, hi / FRAME_RATE, lo < P, metric, v]
                                 for (lo, hi), v in zip(windows, values, strict=True)]
                    streams.append(tokens)
            np.save(out_dir / f"tokens_{name}.npy", np.stack(streams).astype(np.int32))
            samples[name] = {m: np.asarray(v, dtype=np.float64) for m, v in per_metric.items()}
            ttt = getattr(model, "ttt_config", None)
            report["checkpoints"][name] = {
                "path": str(path), "ttt": ttt.to_dict() if ttt is not None else None,
                "seconds": round(time.perf_counter() - t0, 2),
                "metrics": {m: [_est(v[:, w]) for w in range(len(windows))] for m, v in samples[name].items()},
                "paired": None}
    for name in models:
        if name != reference:
            report["checkpoints"][name]["paired"] = {"reference": reference, "metrics": {
                m: [_est(samples[name][m][:, w] - samples[reference][m][:, w]) for w in range(len(windows))]
                for m in names}}
    report = _nan_to_none(report)
    (out_dir / "generate.json").write_text(json.dumps(report, indent=1) + "\n")
    with (out_dir / "generate.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "seed", "row", "window_start_sec", "window_end_sec", "in_prompt", "metric",
                    "value"])
        w.writerows(rows)
    plot_generate(report, out_dir / "generate.png")
    return report


def _nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def plot_generate(report: dict, path: Path) -> Path:
    """One panel per metric: its mean over samples per window, per checkpoint, with the 95% CI as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["metrics"]
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), sharex=True, squeeze=False)
    centers = np.asarray([(w["start"] + w["end"]) / 2 / FRAME_RATE / 60 for w in report["windows"]])
    prompt_min = report["prompt_frames"] / FRAME_RATE / 60
    n_samples = len(report["seeds"]) * report["batch_size"]
    for ax, metric in zip(axes.flat, names, strict=False):
        for name, ck in report["checkpoints"].items():
            ests = ck["metrics"][metric]
            mean = np.asarray([np.nan if e["mean"] is None else e["mean"] for e in ests])
            (line,) = ax.plot(centers, mean, marker=".", label=name)
            ci = [(c, *e["ci95"]) for c, e in zip(centers, ests, strict=True) if e["ci95"] is not None]
            if ci:
                x, lo, hi = map(np.asarray, zip(*ci, strict=True))
                ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
        if prompt_min > 0:
            ax.axvspan(0, prompt_min, color="gray", alpha=0.15, lw=0)
        ax.set_title(metric, fontsize=9)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("time (minutes)")
    axes.flat[0].legend(fontsize=8)
    ci = "95% CI over samples" if n_samples >= MIN_CLUSTERS else f"no CI ({n_samples} samples < {MIN_CLUSTERS})"
    seconds = report["window_frames"] / FRAME_RATE
    fig.suptitle(f"free-running generation: {n_samples} sample{'s' * (n_samples != 1)} per checkpoint (seeds "
                 f"{report['seeds']} x {report['batch_size']} rows), windows of {seconds:g} s, {ci}; grey: prompt",
                 fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.92, hspace=0.35, wspace=0.25)  # tight_layout: slow
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def silence_codes(mimi_spec: str, num_codebooks: int, frames: int, device: str = "cpu") -> torch.Tensor:
    """Mimi's codes of `frames` frames of silence, of shape [num_codebooks, frames]."""
    from ttt_speech.integrations.mimi import encode, load_mimi

    mimi = load_mimi(mimi_spec, device=device, num_codebooks=num_codebooks)
    return encode(mimi, torch.zeros(1, frames * FRAME_SIZE))[0]


def run(checkpoints: list[str], out_dir: str, frames: int, manifest: str | None = None, index: int = 0,
        prompt_frames: int = 0, tokenizer: str | None = None, mimi: str = "tiny-random",
        codes_dir: str | None = None, seeds: Sequence[int] = (0, 1, 2), batch_size: int = 1,
        window_frames: int = 125, ngram: int = 4, reference: str | None = None, sampling: dict | None = None,
        device: str = "cpu", dtype: str = "float32", ttt: list[str] | None = None) -> dict:
    """`ttt-speech eval generate`. The user stream and prompt come from recording `index` of `manifest` (its user
    channel, cycled; its first `prompt_frames` frames of text and main audio as the prompt), else the user stream is
    Mimi's encoding of silence and there is no prompt. `ttt`: the `--ttt [NAME=]SPEC` the checkpoints are checked
    against (`librilight.parse_ttt_specs`; default: each its own)."""
    from ttt_speech.eval.librilight import (
        check_checkpoint_ttt,
        load_checkpoint,
        load_documents,
        parse_checkpoints,
        parse_ttt_specs,
    )

    torch_dtype = DTYPES[dtype]
    named = parse_checkpoints(checkpoints)
    ttt_of = parse_ttt_specs(ttt, [n for n, _ in named])
    for name, path in named:
        check_checkpoint_ttt(path, ttt_of.get(name))
    if reference is not None and reference not in dict(named):
        raise ConfigError(f"--reference {reference!r} is not among the checkpoints {[n for n, _ in named]}")
    if manifest is None and prompt_frames:
        raise ConfigError("--prompt-frames needs --manifest (the prompt is a recording's first frames)")
    if manifest is not None and tokenizer is None:
        raise ConfigError("--manifest needs --tokenizer (for the text stream of the prompt)")
    models = {name: (path, load_checkpoint(path, ttt_of.get(name), device, torch_dtype)) for name, path in named}
    model = next(iter(models.values()))[1]
    n_user, dep_q = model.num_codebooks - model.dep_q - 1, model.dep_q
    if manifest is None:
        user = silence_codes(mimi, n_user, min(frames + 2, 750), device)
        describe = {"prompt": None, "user_stream": f"silence encoded by Mimi ({mimi})"}
        prompt = None
    else:
        docs = load_documents(manifest, tokenizer, mimi, codes_dir, device=device)
        if not 0 <= index < len(docs):
            raise ConfigError(f"{manifest}: --index {index} out of range: {len(docs)} recordings")
        doc_id, stream = docs[index]
        if prompt_frames > min(frames, stream.shape[-1]):
            raise ConfigError(f"--prompt-frames {prompt_frames} exceeds the generation ({frames} frames) or "
                             f"{doc_id} ({stream.shape[-1]} frames)")
        user = stream[1 + dep_q:1 + dep_q + n_user]
        prompt = stream[:1 + dep_q, :prompt_frames] if prompt_frames else None
        describe = {"prompt": f"{doc_id}: first {prompt_frames} frames" if prompt_frames else None,
                    "user_stream": f"{doc_id}: user channel ({user.shape[-1]} frames, cycled)"}
    report = generate(models, user, frames, out_dir, prompt=prompt, seeds=seeds, batch_size=batch_size,
                      window_frames=window_frames, ngram=ngram, reference=reference, sampling=sampling,
                      device=device, describe=describe)
    print_summary(report)
    return report


def print_summary(report: dict, metrics: Sequence[str] = ("text_entropy", "text_repeat_rate", "text_pad_rate",
                                                          "audio_entropy", "audio0_repeat_rate")) -> None:
    """Per checkpoint and metric: the first generated window and the last; then the paired difference there."""
    windows = report["windows"]
    free = [i for i, w in enumerate(windows) if not w["in_prompt"]] or list(range(len(windows)))
    first, last = free[0], free[-1]
    span = lambda i: f"{windows[i]['start'] / FRAME_RATE:.1f}-{windows[i]['end'] / FRAME_RATE:.1f} s"
    fmt = lambda e: "-" if e["mean"] is None else (
        f"{e['mean']:.3f}" + (f" [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]" if e["ci95"] else ""))
    print(f"free-running generation, {len(report['seeds']) * report['batch_size']} samples per checkpoint; "
          f"first generated window {span(first)}, last {span(last)}")
    print(f"{'checkpoint':<14} {'metric':<20} {'first (95% CI)':>26} {'last (95% CI)':>26}")
    for name, ck in report["checkpoints"].items():
        for metric in metrics:
            est = ck["metrics"][metric]
            print(f"{name:<14} {metric:<20} {fmt(est[first]):>26} {fmt(est[last]):>26}")
        if ck["paired"]:
            for metric in metrics:
                est = ck["paired"]["metrics"][metric]
                label = f"{name} - {ck['paired']['reference']}"
                print(f"{label:<14} {metric:<20} {fmt(est[first]):>26} {fmt(est[last]):>26}")
