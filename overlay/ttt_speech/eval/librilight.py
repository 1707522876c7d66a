"""`make eval-librilight`: does long-form NLL stay flat past the attention window?

For every checkpoint and every document (state reset per document), the teacher-forced NLL of each stream at each
frame (`eval.nll.frame_nll`), then:
- binned means at chosen positions (default bins around 1k, 2k, 4k, 8k, 16k, 24k frames), with 95% confidence
  intervals across documents (Student t on the per-document bin means);
- a least-squares slope of NLL against log(position), per document, averaged with its 95% CI;
- a finer log-spaced curve for the plot.

Report schema (`report.json`, version 1):
    {"version": 1, "mode": str, "step": int, "bins": [[lo, hi], ...], "n_documents": int,
     "checkpoints": {name: {"path": str, "attention_context": int | null, "ttt": dict | null,
                            "bins": [{"lo": int, "hi": int, "center": int,
                                      "streams": {stream: {"mean": float, "ci95": float, "n_docs": int}}}],
                            "slope_vs_log_pos": {stream: {"mean": float, "ci95": float, "n_docs": int}},
                            "curve": [{"center": float, "streams": {stream: {"mean": float, "ci95": float}}}]}}}
streams: "text", "audio0".."audio7", and "audio" (the mean of the audio codebooks). NaN means no data (e.g. a bin
past the documents' end) and is written as null. `report.csv` has one row per (checkpoint, stream, bin).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ttt_speech.eval.nll import STREAMS, frame_nll

DEFAULT_BINS = [1000, 2000, 4000, 8000, 16000, 24000]
ALL_STREAMS = [*STREAMS, "audio"]


@dataclass
class Aggregates:
    """Per-document per-frame NLL of one checkpoint, of shape [9 streams, T] each."""

    docs: list[np.ndarray] = field(default_factory=list)


def bin_edges(centers: list[int], rel_width: float = 0.25) -> list[tuple[int, int]]:
    """Bins [c (1 - w), c (1 + w)) around each center."""
    return [(int(round(c * (1 - rel_width))), int(round(c * (1 + rel_width)))) for c in centers]


def with_audio_mean(nll: np.ndarray) -> np.ndarray:
    """[9, T] -> [10, T]: the streams plus "audio", the nan-mean over the audio codebooks."""
    with np.errstate(invalid="ignore"), _quiet():
        audio = np.nanmean(nll[1:], axis=0, keepdims=True)
    return np.concatenate([nll, audio], axis=0)


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def mean_ci95(values: list[float]) -> tuple[float, float, int]:
    """Mean and the half-width of its 95% confidence interval (Student t), ignoring NaN; (nan, nan, 0) if empty."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    if v.size == 1:
        return float(v[0]), math.nan, 1
    return float(v.mean()), float(t975(v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)), int(v.size)


_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(dof: int) -> float:
    """The 97.5% quantile of Student's t: a table up to 30 degrees of freedom, then the Cornish-Fisher expansion
    around the normal quantile (error < 1e-3)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def slope_vs_log_position(nll: np.ndarray) -> float:
    """Least-squares slope of NLL against log(position + 1) over the valid frames of one stream, [T] -> float."""
    pos = np.arange(nll.shape[0], dtype=np.float64)
    ok = ~np.isnan(nll)
    if ok.sum() < 2:
        return math.nan
    x, y = np.log1p(pos[ok]), nll[ok].astype(np.float64)
    x = x - x.mean()
    denom = (x * x).sum()
    return float((x * (y - y.mean())).sum() / denom) if denom > 0 else math.nan


def summarize(agg: Aggregates, bins: list[tuple[int, int]], curve_points: int = 24) -> dict:
    docs = [with_audio_mean(d) for d in agg.docs]
    max_t = max(d.shape[1] for d in docs)

    def stats(lo: int, hi: int) -> dict:
        out = {}
        for s, name in enumerate(ALL_STREAMS):
            with _quiet():
                per_doc = [float(np.nanmean(d[s, lo:hi])) if d.shape[1] > lo else math.nan for d in docs]
            m, ci, n = mean_ci95(per_doc)
            out[name] = {"mean": m, "ci95": ci, "n_docs": n}
        return out

    result = {"bins": [{"lo": lo, "hi": hi, "center": (lo + hi) // 2, "streams": stats(lo, hi)} for lo, hi in bins]}
    result["slope_vs_log_pos"] = {}
    for s, name in enumerate(ALL_STREAMS):
        m, ci, n = mean_ci95([slope_vs_log_position(d[s]) for d in docs])
        result["slope_vs_log_pos"][name] = {"mean": m, "ci95": ci, "n_docs": n}
    edges = np.unique(np.geomspace(1, max_t + 1, curve_points + 1).astype(int) - 1)
    result["curve"] = [{"center": float(math.sqrt((lo + 1) * hi)), "streams": {
        k: {"mean": v["mean"], "ci95": v["ci95"]} for k, v in stats(int(lo), int(hi)).items()}}
        for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]
    return result


def evaluate(models: dict[str, tuple[str, torch.nn.Module]], documents: list[tuple[str, torch.Tensor]],
             out_dir: str | Path, mode: str = "streaming", step: int = 1, bins: list[int] | None = None,
             device: str = "cpu") -> dict:
    """Run every model over every document and write report.json, report.csv and nll_vs_position.png.

    Args:
        models: name -> (path, model).
        documents: (id, codes of shape [K, T]).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    edges = bin_edges(bins or DEFAULT_BINS)
    report = {"version": 1, "mode": mode, "step": step, "bins": [list(e) for e in edges],
              "n_documents": len(documents), "checkpoints": {}}
    total = len(models) * sum(int(c.shape[-1]) for _, c in documents)
    with tqdm(total=total, desc="eval-librilight", unit="frame", unit_scale=True) as bar:
        for name, (path, model) in models.items():
            model.eval()
            agg = Aggregates()
            for _doc_id, codes in documents:
                nll = frame_nll(model, codes[None].to(device), mode=mode, step=step)[0]  # fresh state per doc
                agg.docs.append(nll.cpu().numpy())
                bar.update(int(codes.shape[-1]))
            ttt = getattr(model, "ttt_config", None)
            report["checkpoints"][name] = {"path": str(path), "attention_context": model.context,
                                           "ttt": ttt.to_dict() if ttt is not None else None,
                                           **summarize(agg, edges)}
    (out_dir / "report.json").write_text(json.dumps(_nan_to_none(report), indent=1) + "\n")
    write_csv(report, out_dir / "report.csv")
    plot_report(report, out_dir / "nll_vs_position.png")
    return report


def _nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_csv(report: dict, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "stream", "bin_lo", "bin_hi", "mean_nll", "ci95", "n_docs", "slope_vs_log_pos"])
        for name, ck in report["checkpoints"].items():
            for stream in ALL_STREAMS:
                slope = ck["slope_vs_log_pos"][stream]["mean"]
                for b in ck["bins"]:
                    s = b["streams"][stream]
                    w.writerow([name, stream, b["lo"], b["hi"], s["mean"], s["ci95"], s["n_docs"], slope])


def plot_report(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, stream in zip(axes, ["text", "audio"], strict=True):
        for name, ck in report["checkpoints"].items():
            pts = [(c["center"], c["streams"][stream]["mean"], c["streams"][stream]["ci95"]) for c in ck["curve"]]
            pts = [(x, m, 0.0 if math.isnan(ci) else ci) for x, m, ci in pts if not math.isnan(m)]
            if not pts:
                continue
            x, m, ci = map(np.asarray, zip(*pts, strict=True))
            (line,) = ax.plot(x, m, label=name)
            ax.fill_between(x, m - ci, m + ci, alpha=0.2, color=line.get_color())
            if ck["attention_context"]:
                ax.axvline(ck["attention_context"], color=line.get_color(), ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("position (frames, 12.5 Hz)")
        ax.set_ylabel("NLL (nats)")
        ax.set_title(f"{stream}: mean over {report['n_documents']} documents, 95% CI"
                     + ("" if stream == "text" else " (mean of codebooks)"))
        ax.legend(fontsize=8)
    fig.suptitle(f"NLL by position ({report['mode']}); dotted: attention context")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_documents(manifest: str | Path, tokenizer: str | Path, mimi: str = "tiny-random",
                   codes_dir: str | Path | None = None, max_frames: int | None = None,
                   device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """Every recording of `manifest` as whole token streams [17, F] (text, then the 16 codebooks)."""
    from ttt_speech.data import DataConfig, build_loader

    loader = build_loader(DataConfig(train_manifest=str(manifest), duration_sec=10.0, shuffle=False,
                                     random_crop=False, tokenizer=str(tokenizer), mimi=mimi,
                                     codes_dir=str(codes_dir) if codes_dir else None, device=device, cache_files=1))
    docs = []
    for i, entry in enumerate(tqdm(loader.entries, desc="encoding documents", unit="doc")):
        stream = loader.recording_stream(i).long()
        docs.append((str(entry.path), stream[:, :max_frames] if max_frames else stream))
    return docs


def run(checkpoints: list[str], manifest: str, tokenizer: str, out_dir: str, mimi: str = "tiny-random",
        codes_dir: str | None = None, mode: str = "streaming", step: int = 1, bins: list[int] | None = None,
        max_frames: int | None = None, device: str = "cpu", dtype: str = "float32") -> dict:
    """`ttt-speech eval librilight`: checkpoints are `NAME=PATH` or `PATH` (named by its folder)."""
    from ttt_speech.integrations.moshi import load_any_lm

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    models = {}
    for spec in checkpoints:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).name
        if name in models:
            raise ValueError(f"two checkpoints named {name!r}; name them NAME=PATH")
        models[name] = (path, load_any_lm(path, device=device, dtype=torch_dtype))
    docs = load_documents(manifest, tokenizer, mimi, codes_dir, max_frames, device)
    report = evaluate(models, docs, out_dir, mode=mode, step=step, bins=bins, device=device)
    print_summary(report)
    return report


def print_summary(report: dict) -> None:
    print(f"{'checkpoint':<14} {'stream':<6} " + " ".join(f"{f'{lo}-{hi}':>11}" for lo, hi in report["bins"])
          + f" {'slope/log':>10}")
    for name, ck in report["checkpoints"].items():
        for stream in ("text", "audio"):
            cells = []
            for b in ck["bins"]:
                s = b["streams"][stream]
                cells.append(f"{'-':>11}" if math.isnan(s["mean"]) else f"{s['mean']:>11.3f}")
            slope = ck["slope_vs_log_pos"][stream]["mean"]
            print(f"{name:<14} {stream:<6} " + " ".join(cells) + f" {slope:>+10.4f}")
